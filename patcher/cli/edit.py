"""`patcher ablate` and `patcher inject`: plan, then write."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from patcher.errors import PatcherError
from patcher.model.architectures import ROLES
if TYPE_CHECKING:
    from patcher.edit.plan import Plan

from patcher.cli.common import ARCH_TABLE_HELP, DIRECTION_HELP, command_line, guard, human, open_model, out, progress


def _print_plan(plan: Plan) -> None:
    from rich.table import Table
    t = Table(title=f"plan: {len(plan.all())} tensors, {human(plan.bytes_edited)} rewritten", title_justify="left")
    for c in ("tensor", "role", "layer", "operation", "dtype", "bytes"):
        t.add_column(c, justify="right" if c in ("layer", "bytes") else "left", overflow="fold")
    for e in plan.all():
        t.add_row(e.name, e.role, "" if e.layer is None else str(e.layer), e.formula, e.dtype, human(e.nbytes))
    out.print(t)
    for k, v in plan.config_updates.items():
        out.print(f"config.json: {k} = {json.dumps(v)}")
    for n in plan.notes:
        out.print(f"[yellow]note:[/] {n}")


def _run(plan: Plan, output: Path, force: bool, dry_run: bool, hash_files: bool = True) -> None:
    if dry_run:
        _print_plan(plan)
        out.print(f"dry run: nothing written (would write {output})")
        return
    ck = plan.ck
    with progress() as prog:
        task = prog.add_task("writing", total=ck.total_bytes + sum(e.nbytes for e in plan.new))
        from patcher.edit.apply import execute
        report = execute(plan, output, force=force, command=command_line(),
                         progress=lambda n: prog.advance(task, n),
                         on_shard=lambda f: prog.update(task, description=f"writing {f}"), hash_files=hash_files)
    _summary(plan, report)


def _summary(plan: Plan, report) -> None:
    from rich.table import Table
    t = Table(title=f"wrote {report.out}", title_justify="left", show_header=False, box=None)
    t.add_row("tensors edited", f"{len(plan.edits)} edited, {len(plan.new)} added")
    t.add_row("time", f"{report.seconds:.2f} s for {human(report.bytes_written)}")
    if report.leakage:
        worst = max(report.leakage, key=report.leakage.get)
        t.add_row("leakage |QᵀW'|/|QᵀW|", f"{report.overall_leakage():.2e} overall, max {report.leakage[worst]:.2e} "
                                            f"({worst}) — left by storage rounding")
    for k, v in plan.config_updates.items():
        t.add_row("config.json", f"{k} = {json.dumps(v)}")
    if report.skipped_files:
        t.add_row("not copied", ", ".join(report.skipped_files) + " (other weight files would carry unedited weights)")
    out.print(t)
    for n in plan.notes:
        out.print(f"[yellow]note:[/] {n}")
    for w in report.warnings:
        out.print(f"[bold yellow]warning:[/] {w}", highlight=False)


_NO_HASH_HELP = ("Record file sizes instead of sha256 in patcher-manifest.json (hashing reads every input and "
                 "output byte once more; on a 2-core machine it roughly doubles the time)")


def register(app) -> None:
    @app.command()
    def ablate(model: Path = typer.Argument(..., help="Model folder (safetensors, sharded or not)"),
               direction: Optional[str] = typer.Option(None, "-d", "--direction", help=DIRECTION_HELP +
                                                       " (with --from-study: the study's directions file)"),
               output: Path = typer.Option(..., "-o", "--output", help="New folder to write"),
               layers: Optional[str] = typer.Option(None, "--layers", help="Blocks to edit, e.g. 4-20 or 3,5,7-9 (default all)"),
               targets: str = typer.Option("embed,attn_out,mlp_out", "--targets", help="Comma list of embed, attn_out, mlp_out"),
               scale: float = typer.Option(1.0, "--scale", help="Strength: 1 removes the component, 0.5 halves it"),
               norm_preserve: Optional[str] = typer.Option(None, "--norm-preserve",
                   help="rows | cols, in nn.Linear orientation [d_model, fan_in]: cols keeps each written vector's norm "
                        "(ablation stays exact); rows keeps each residual coordinate's row norm"),
               untie: bool = typer.Option(False, "--untie-embeddings", help="Keep the original unembedding as lm_head"),
               dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing"),
               force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
               no_hash: bool = typer.Option(False, "--no-hash", help=_NO_HASH_HELP),
               arch_table: Optional[Path] = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
               from_study: Optional[Path] = typer.Option(None, "--from-study",
                   help="Write trial --trial of a `patcher search` study (its directions, kernels, options)"),
               trial: Optional[int] = typer.Option(None, "--trial", help="Trial number, with --from-study")):
        """Remove a direction from every selected residual writer (rank-1 or rank-k projection)."""
        def body():
            if from_study is not None or trial is not None:
                if from_study is None or trial is None:
                    raise PatcherError("--from-study", "give both --from-study S.db and --trial N")
                from patcher.search.run import plan_from_study
                ck, res = open_model(model, arch_table)
                plan = plan_from_study(ck, res, from_study, trial, Path(direction) if direction else None)
                _run(plan, output, force, dry_run, not no_hash)
                return
            if direction is None:
                raise PatcherError("--direction", "missing: give -d DIRECTION (or --from-study S --trial N)")
            roles = tuple(r.strip() for r in targets.split(",") if r.strip())
            bad = [r for r in roles if r not in ROLES]
            if bad or not roles:
                raise PatcherError("--targets", f"unknown {bad}; choose from {', '.join(ROLES)}")
            if norm_preserve not in (None, "rows", "cols"):
                raise PatcherError("--norm-preserve", f"must be rows or cols, got {norm_preserve!r}")
            from patcher.edit.directions import load_direction
            from patcher.edit.plan import parse_layers, plan_ablation
            ck, res = open_model(model, arch_table)
            d = load_direction(direction, res.d_model)
            plan = plan_ablation(ck, res, d, layers=parse_layers(layers, res.n_layers), roles=roles, scale=scale,
                                 preserve=norm_preserve, untie=untie)
            _run(plan, output, force, dry_run, not no_hash)
        guard(body)


    @app.command()
    def inject(model: Path = typer.Argument(..., help="Model folder"),
               direction: str = typer.Option(..., "-d", "--direction", help=DIRECTION_HELP),
               output: Path = typer.Option(..., "-o", "--output", help="New folder to write"),
               layer: int = typer.Option(..., "--layer", help="Block whose output gets +alpha*r̂ (shows in resid_pre[layer+1])"),
               alpha: float = typer.Option(..., "--alpha", help="Strength, in residual-stream units"),
               target: str = typer.Option("mlp_out", "--target", help="mlp_out or attn_out"),
               dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing"),
               force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
               no_hash: bool = typer.Option(False, "--no-hash", help=_NO_HASH_HELP),
               arch_table: Optional[Path] = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP)):
        """Add alpha * r̂ to one writer's bias at one layer (creating the bias if needed)."""
        def body():
            if target not in ("mlp_out", "attn_out"):
                raise PatcherError("--target", f"must be mlp_out or attn_out, got {target!r}")
            from patcher.edit.directions import load_direction
            from patcher.edit.plan import plan_injection
            ck, res = open_model(model, arch_table)
            d = load_direction(direction, res.d_model)
            plan = plan_injection(ck, res, d, layer=layer if layer >= 0 else layer + res.n_layers, alpha=alpha,
                                  target=target)
            _run(plan, output, force, dry_run, not no_hash)
        guard(body)
