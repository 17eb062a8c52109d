"""`patcher ablate` and `patcher inject`: plan, then write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from patcher import validate as V
from patcher.errors import PatcherError
from patcher.io.paths import check_output
from patcher.model.architectures import ROLES

if TYPE_CHECKING:
    from patcher.edit.plan import Plan

from patcher.cli.common import (
    ARCH_TABLE_HELP,
    DIRECTION_HELP,
    command_line,
    guard,
    human,
    open_model,
    out,
    progress,
)


def _print_plan(plan: Plan) -> None:
    from rich.table import Table

    t = Table(
        title=f"plan: {len(plan.all())} tensors, {human(plan.bytes_edited)} rewritten", title_justify="left"
    )
    for c in ("tensor", "role", "layer", "operation", "dtype", "bytes"):
        t.add_column(c, justify="right" if c in ("layer", "bytes") else "left", overflow="fold")
    for e in plan.all():
        t.add_row(
            e.name, e.role, "" if e.layer is None else str(e.layer), e.formula, e.dtype, human(e.nbytes)
        )
    out.print(t)
    for k, v in plan.config_updates.items():
        out.print(f"config.json: {k} = {json.dumps(v)}")
    for n in plan.notes:
        out.print(f"[yellow]note:[/] {n}")


def _is_gguf(plan: Plan) -> bool:
    return getattr(plan.ck, "is_gguf", False)


def _run(
    plan: Plan,
    output: Path,
    force: bool,
    dry_run: bool,
    hash_files: bool = True,
    requant: str | None = None,
    rounding: str = "orthogonal",
    jobs: int | None = None,
    rehash: bool = False,
) -> None:
    if _is_gguf(plan):
        return _run_gguf(plan, output, force, dry_run, requant, rounding)
    if dry_run:
        _print_plan(plan)
        out.print(f"dry run: nothing written (would write {output})")
        return
    ck = plan.ck
    with progress() as prog:
        task = prog.add_task("writing", total=ck.total_bytes + sum(e.nbytes for e in plan.new))
        from patcher.edit.apply import execute

        report = execute(
            plan,
            output,
            force=force,
            command=command_line(),
            progress=lambda n: prog.advance(task, n),
            on_shard=lambda f: prog.update(task, description=f"writing {f}"),
            hash_files=hash_files,
            shards_in_flight=jobs,
            rehash_inputs=rehash,
        )
    _summary(plan, report)


def _run_gguf(
    plan: Plan, output: Path, force: bool, dry_run: bool, requant: str | None, rounding: str
) -> None:
    from patcher.edit import gguf_apply

    if rounding not in ("orthogonal", "nearest"):
        raise PatcherError("--rounding", f"must be orthogonal or nearest, got {rounding!r}")
    gguf_apply.prepare(plan, requant.upper() if requant else None)
    if dry_run:
        _print_plan(plan)
        out.print(f"dry run: nothing written (would write {output})")
        return
    with progress() as prog:
        task = prog.add_task("writing", total=sum(t.nbytes for t in plan.ck.tensors.values()))
        report = gguf_apply.execute(
            plan,
            output,
            force=force,
            ortho=rounding == "orthogonal",
            progress=lambda n: prog.advance(task, n),
            command=command_line(),
        )
    _summary(plan, report)
    if report.rounding:
        from rich.table import Table

        t = Table(
            title=f"storage rounding ({rounding}) per tensor type: leakage |QᵀW'|/|QᵀW| and weight "
            f"error |W'−W*|/|W*| (W* = exact projection)",
            title_justify="left",
        )
        for c in ("type", "tensors", "leakage nearest", "leakage written", "error nearest", "error written"):
            t.add_column(c, justify="left" if c == "type" else "right")
        for src, dst, n, lp, lo, ep, eo, _ in gguf_apply.summary_rows(report):
            name = src if src == dst else f"{src}→{dst}"
            t.add_row(name, n, f"{lp:.2%}", f"{lo:.2%}", f"{ep:.2%}", f"{eo:.2%}")
        out.print(t)


_TIME_HINTS = {  # what the largest part means for the user
    "hash": "sha256 bound (--no-hash skips it; later edits of this base reuse its digests)",
    "write": "disk bound (a plain copy takes as long)",
}


def time_line(parts: dict[str, float], threads_busy: float) -> str:
    """'hash 5.1 s (42 %), write ...' largest first, with what the largest part means for the user."""
    wall = sum(parts.values()) or 1.0
    ranked = sorted(parts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} {v:.2f} s ({v / wall:.0%})" for k, v in ranked)
    text += f"; {threads_busy:.1f} threads busy while writing"
    hint = _TIME_HINTS.get(ranked[0][0])
    return text + (f": {hint}" if hint else "")


def _summary(plan: Plan, report) -> None:
    from rich.table import Table

    t = Table(title=f"wrote {report.out}", title_justify="left", show_header=False, box=None)
    t.add_row("tensors edited", f"{len(plan.edits)} edited, {len(plan.new)} added")
    t.add_row("time", f"{report.seconds:.2f} s for {human(report.bytes_written)}")
    if getattr(report, "time_parts", None):
        t.add_row("time went to", time_line(report.time_parts, report.threads_busy))
    if getattr(report, "digests_from_hub", None):
        t.add_row(
            "input digests",
            f"{len(report.digests_from_hub)} file(s) by their Hugging Face cache names (blobs/<sha256>), "
            "not re-read; --rehash-inputs checks them",
        )
    if report.leakage:
        worst = max(report.leakage, key=report.leakage.get)
        t.add_row(
            "leakage |QᵀW'|/|QᵀW|",
            f"{report.overall_leakage():.2e} overall, max "
            f"{report.leakage[worst]:.2e} "
            f"({worst}) — left by storage rounding",
        )
    for k, v in plan.config_updates.items():
        t.add_row("config.json", f"{k} = {json.dumps(v)}")
    if report.skipped_files:
        t.add_row(
            "not copied",
            ", ".join(report.skipped_files) + " (other weight files would carry unedited weights)",
        )
    out.print(t)
    for n in plan.notes:
        out.print(f"[yellow]note:[/] {n}")
    for w in report.warnings:
        out.print(f"[bold yellow]warning:[/] {w}", highlight=False)


def _out(output, alternative):
    """The path a command writes: -o, or the option that replaces it (--adapter, --control-vector)."""
    return output if output is not None else alternative


def _kind(path) -> str:
    return "file" if path is not None and str(path).endswith(".gguf") else "folder"


def _run_adapter(plan: Plan, target: Path, force: bool, dry_run: bool, hash_files: bool = True) -> None:
    from patcher.edit.adapter import adapter_bytes, adapter_format, check, write_adapter

    fmt = adapter_format(target)
    check(plan, fmt)  # refusals come before any work, dry run included
    if dry_run:
        _print_plan(plan)
        out.print(
            f"dry run: nothing written (would write a {fmt} LoRA adapter of rank "
            f"{plan.record['rank']}, ~{human(adapter_bytes(plan))}, to {target})"
        )
        return
    with progress() as prog:
        prog.add_task("computing B·A", total=None)
        report = write_adapter(
            plan, target, fmt=fmt, force=force, command=command_line(), hash_files=hash_files
        )
    from rich.table import Table

    t = Table(title=f"wrote {report.out}", title_justify="left", show_header=False, box=None)
    t.add_row("adapter", f"{report.fmt} LoRA, rank {report.rank}, scaling 1 (alpha = r)")
    t.add_row("modules", f"{report.modules} ({report.tensors} tensors)")
    t.add_row("size", f"{human(report.bytes_written)} in {report.seconds:.2f} s")
    out.print(t)
    for n in [*plan.notes, *report.notes]:
        out.print(f"[yellow]note:[/] {n}")


_REQUANT_HELP = (
    "GGUF: write edited K-quant and IQ tensors in this type (default: K-quants keep theirs, IQ "
    "become the nearest K type): q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0, q3_k, q2_k, "
    "f16, bf16, f32"
)
_ROUNDING_HELP = (
    "GGUF: orthogonal (default) chooses each element's rounding so the stored weights stay "
    "orthogonal to r̂; nearest is plain re-rounding, which puts back part of the removed "
    "component"
)
_CVEC_HELP = (
    "Write a llama.cpp control vector (GGUF, direction.LAYER = alpha*r̂, used with "
    "--control-vector) instead of a model; LAYER as for --layer (llama.cpp takes 1..L-1)"
)


def _control_vector(res, d, layer: int, alpha: float, path: Path, force: bool, dry_run: bool) -> None:
    from patcher.edit.gguf_apply import write_control_vector

    if d.vectors.shape[0] != 1:
        raise PatcherError(d.source, "a control vector takes one direction, not a rank-k set")
    layout = res.arch.gguf_layout
    hint = layout.arch if layout else res.arch.model_type
    vector = alpha * d.unit[0]
    if dry_run:
        out.print(
            f"dry run: would write {path}: direction.{layer} = {alpha} · r̂ "
            f"(|v| = {abs(alpha):.4g}), model hint {hint!r}"
        )
        return
    write_control_vector(path, vector, layer, res.n_layers, hint, force)
    out.print(
        f"wrote {path}: control vector direction.{layer} = {alpha} · r̂, added by llama.cpp to the "
        f"output of block {layer} (resid_pre[{layer + 1}]); run llama.cpp with --control-vector {path}"
    )


_JOBS_HELP = (
    "Shards written at once (default: from the cores, 2 to 4; each uses ~30 MiB of memory "
    "and helps when there are cores to hash beside the copy)"
)
_REHASH_HELP = (
    "Read and hash every input even when its sha256 is known (from an earlier run, or a Hugging Face "
    "cache blob name, which is then checked against the bytes)"
)
_NO_HASH_HELP = (
    "Record file sizes instead of sha256 in patcher-manifest.json (hashing reads every input "
    "and output byte once more; on a 2-core machine it roughly doubles the time)"
)


def register(app) -> None:
    @app.command()
    def ablate(
        model: Path = typer.Argument(..., help="Model folder (safetensors, sharded or not)"),
        direction: str | None = typer.Option(
            None,
            "-d",
            "--direction",
            help=DIRECTION_HELP + " (with --from-study: the study's directions file)",
        ),
        output: Path | None = typer.Option(
            None, "-o", "--output", help="New folder to write (a .gguf file for GGUF input)"
        ),
        adapter: Path | None = typer.Option(
            None,
            "--adapter",
            help="Write the edit as a LoRA adapter instead of a model (instead of -o): OUT.gguf = "
            "llama.cpp --lora file, any other name = PEFT folder (adapter_config.json + "
            "adapter_model.safetensors)",
        ),
        layers: str | None = typer.Option(
            None, "--layers", help="Blocks to edit, e.g. 4-20 or 3,5,7-9 (default all)"
        ),
        targets: str = typer.Option(
            "embed,attn_out,mlp_out", "--targets", help="Comma list of embed, attn_out, mlp_out"
        ),
        scale: float = typer.Option(1.0, "--scale", help="Strength: 1 removes the component, 0.5 halves it"),
        norm_preserve: str | None = typer.Option(
            None,
            "--norm-preserve",
            help="rows | cols, in nn.Linear orientation [d_model, fan_in]: cols keeps each written vector's "
            "norm (ablation stays exact); rows keeps each residual coordinate's row norm",
        ),
        untie: bool = typer.Option(
            False, "--untie-embeddings", help="Keep the original unembedding as lm_head"
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing"),
        force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
        no_hash: bool = typer.Option(False, "--no-hash", help=_NO_HASH_HELP),
        jobs: int | None = typer.Option(None, "--jobs", min=1, help=_JOBS_HELP),
        rehash_inputs: bool = typer.Option(False, "--rehash-inputs", help=_REHASH_HELP),
        requant: str | None = typer.Option(None, "--requant", help=_REQUANT_HELP),
        rounding: str = typer.Option("orthogonal", "--rounding", help=_ROUNDING_HELP),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
        from_study: Path | None = typer.Option(
            None,
            "--from-study",
            help="Write trial --trial of a `patcher search` study (its directions, kernels, options)",
        ),
        trial: int | None = typer.Option(None, "--trial", help="Trial number, with --from-study"),
    ):
        """Remove a direction from every selected residual writer (rank-1 or rank-k projection)."""

        def write(plan):
            if adapter is not None:
                _run_adapter(plan, adapter, force, dry_run, not no_hash)
            else:
                _run(plan, output, force, dry_run, not no_hash, requant, rounding, jobs, rehash_inputs)

        def body():
            if (output is None) == (adapter is None):
                raise PatcherError("-o/--adapter", "give exactly one: -o FOLDER (a model) or --adapter OUT")
            if from_study is not None or trial is not None:
                if from_study is None or trial is None:
                    raise PatcherError("--from-study", "give both --from-study S.db and --trial N")
                from patcher.search.run import plan_from_study

                m = open_model(model, arch_table)
                check_output(
                    _out(output, adapter),
                    [*m.input_paths, from_study, direction, arch_table],
                    force=force,
                    kind=_kind(_out(output, adapter)),
                )
                write(
                    plan_from_study(m, m.resolved, from_study, trial, Path(direction) if direction else None)
                )
                return
            if direction is None:
                raise PatcherError("--direction", "missing: give -d DIRECTION (or --from-study S --trial N)")
            roles = V.choices(targets, ROLES, "--targets")
            s = V.number(scale, "scale", "--scale")
            if norm_preserve is not None:
                V.choice(norm_preserve, ("rows", "cols"), "--norm-preserve")
            from patcher.edit.directions import load_direction, spec_file
            from patcher.edit.plan import parse_layers, plan_ablation

            m = open_model(model, arch_table)
            check_output(
                _out(output, adapter),
                [*m.input_paths, spec_file(direction), arch_table],
                force=force,
                kind=_kind(_out(output, adapter)),
            )
            res = m.resolved
            d = load_direction(direction, res.d_model, res.n_layers)
            write(
                plan_ablation(
                    m,
                    d,
                    layers=parse_layers(layers, res.n_layers),
                    roles=roles,
                    scale=s,
                    preserve=norm_preserve,
                    untie=untie,
                )
            )

        guard(body)

    @app.command()
    def inject(
        model: Path = typer.Argument(..., help="Model folder or .gguf file"),
        direction: str = typer.Option(..., "-d", "--direction", help=DIRECTION_HELP),
        output: Path | None = typer.Option(
            None, "-o", "--output", help="New folder to write (.gguf for GGUF input)"
        ),
        control_vector: Path | None = typer.Option(None, "--control-vector", help=_CVEC_HELP),
        layer: int = typer.Option(
            ..., "--layer", help="Block whose output gets +alpha*r̂ (shows in resid_pre[layer+1])"
        ),
        alpha: float = typer.Option(..., "--alpha", help="Strength, in residual-stream units"),
        target: str = typer.Option("mlp_out", "--target", help="mlp_out or attn_out"),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing"),
        force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
        no_hash: bool = typer.Option(False, "--no-hash", help=_NO_HASH_HELP),
        jobs: int | None = typer.Option(None, "--jobs", min=1, help=_JOBS_HELP),
        rehash_inputs: bool = typer.Option(False, "--rehash-inputs", help=_REHASH_HELP),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
    ):
        """Add alpha * r̂ to one writer's bias at one layer (creating the bias if needed), or write it as a
        llama.cpp control vector."""

        def body():
            V.choice(target, ("mlp_out", "attn_out"), "--target")
            a = V.number(alpha, "alpha", "--alpha")
            if (output is None) == (control_vector is None):
                raise PatcherError("inject", "give exactly one of -o/--output and --control-vector")
            from patcher.edit.directions import load_direction, spec_file
            from patcher.edit.plan import plan_injection

            m = open_model(model, arch_table)
            check_output(
                _out(output, control_vector),
                [*m.input_paths, spec_file(direction), arch_table],
                force=force,
                kind=_kind(_out(output, control_vector)),
            )
            res = m.resolved
            d = load_direction(direction, res.d_model, res.n_layers)
            if control_vector is not None:
                at = V.layer_index(layer, res.n_layers, "--layer")
                return _control_vector(res, d, at, a, control_vector, force, dry_run)
            if m.is_gguf and target not in res.arch.inject:
                raise PatcherError(
                    "--target",
                    f"llama.cpp's {m.storage.gguf_arch} loader has no bias at the "
                    f"{target} writer; write the injection as a control vector (--control-vector FILE)",
                )
            plan = plan_injection(
                m, d, layer=V.layer_index(layer, res.n_layers, "--layer"), alpha=a, target=target
            )
            _run(plan, output, force, dry_run, not no_hash, jobs=jobs, rehash=rehash_inputs)

        guard(body)
