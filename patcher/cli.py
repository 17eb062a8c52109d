"""The `patcher` command line (typer + rich). Every user-fixable problem is one line on stderr
and exit code 1; the input is never written."""
import json
import shlex
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from patcher import __version__
from patcher.apply import execute
from patcher.architectures import ROLES, Resolved, for_model_type, load_table, resolve
from patcher.checkpoint import Checkpoint
from patcher.diff import register as register_diff
from patcher.directions import load_direction
from patcher.edits import Plan, parse_layers, plan_ablation, plan_injection
from patcher.errors import PatcherError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Edit transformer checkpoints along residual-stream directions, streaming, without PyTorch.")
# piped output (scripts, CI logs) gets wide lines so tensor names are never cut
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _open(model: Path, arch_table: Optional[Path], need_arch: bool = True) -> tuple[Checkpoint, Optional[Resolved]]:
    ck = Checkpoint(model)
    if not need_arch and arch_table is None and not ck.model_type:
        return ck, None
    if not ck.config and ck.path.is_file():
        raise PatcherError(model, "editing needs a model folder with config.json, not a lone .safetensors file")
    arch = load_table(arch_table) if arch_table else for_model_type(ck.model_type, ck.folder / "config.json")
    return ck, resolve(arch, ck.tensors, ck.config, ck.folder / "config.json")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Not a KeyboardInterrupt, which click turns into 'Aborted!' and exit 1 when
    it lands outside a command body: this one always ends in cleanup and exit 130."""


def _guard(fn):
    """Run a command body: PatcherError -> one line + exit 1; Ctrl-C -> exit 130, nothing left."""
    try:
        return fn()
    except PatcherError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except (KeyboardInterrupt, Interrupted):
        err.print("[bold red]interrupted:[/] no output was written (partial files removed)")
        raise typer.Exit(130)
    except OSError as e:
        err.print(f"[bold red]error:[/] {e.filename or ''}: {e.strerror or e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)


# --- inspect ------------------------------------------------------------------------------------

def describe(ck: Checkpoint, res: Optional[Resolved]) -> dict:
    dtypes = Counter()
    for t in ck.tensors.values():
        dtypes[t.dtype] += t.nbytes
    info = {
        "path": str(ck.path), "model_type": ck.model_type, "shards": list(ck.files), "tensors": len(ck.tensors),
        "total_bytes": ck.total_bytes, "dtypes": dict(dtypes.most_common()),
    }
    if res is not None:
        roles = {r: [t.weight for t in res.targets if t.role == r] for r in ROLES}
        biases = {r: [t.bias for t in res.targets if t.role == r and t.bias] for r in ROLES}
        info.update({
            "architecture_table": res.arch.source, "layers": res.n_layers, "d_model": res.d_model,
            "tied_embeddings": res.tied, "post_norm_corrected": res.arch.post_norm_gain is not None,
            "roles": roles, "role_biases": biases,
            "missing": [{"role": r, "layer": l, "pattern": p} for r, l, p in res.missing],
        })
    from patcher import manifest
    made = manifest.read(ck.folder) if ck.path.is_dir() else None
    if made:
        info["manifest"] = made
    prov = {f: sf.metadata["patcher"] for f, sf in ck.files.items() if "patcher" in sf.metadata}
    if prov:
        first = next(iter(prov.values()))
        try:
            info["provenance"] = json.loads(first)
        except (ValueError, RecursionError):
            info["provenance"] = first
    return info


@app.command()
def inspect(model: Path = typer.Argument(..., help="Model folder, or one .safetensors file"),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
            arch_table: Optional[Path] = typer.Option(None, "--arch-table", help="Custom architecture table (TOML)")):
    """Architecture, layers, d_model, dtypes, shards, size, and which tensors each role maps to."""
    def body():
        ck, res = _open(model, arch_table, need_arch=False)
        info = describe(ck, res)
        if as_json:
            print(json.dumps(info, indent=2))
            return
        t = Table(show_header=False, box=None, pad_edge=False)
        t.add_row("model", str(ck.path))
        t.add_row("model_type", str(info["model_type"]))
        if res is not None:
            t.add_row("layers", str(res.n_layers))
            t.add_row("d_model", str(res.d_model))
            t.add_row("tied embeddings", "yes" if res.tied else "no")
            if res.arch.post_norm_gain:
                t.add_row("post-norm", f"writers corrected by g = {res.arch.post_norm_gain.replace('_', ' ')}")
        t.add_row("shards", f"{len(ck.files)} ({', '.join(list(ck.files)[:3])}{', …' if len(ck.files) > 3 else ''})")
        t.add_row("tensors", f"{len(ck.tensors)}, {_human(ck.total_bytes)}")
        t.add_row("dtypes", ", ".join(f"{d} {_human(b)}" for d, b in info["dtypes"].items()))
        out.print(t)
        if res is not None:
            rt = Table(title="residual writers", title_justify="left")
            for c in ("role", "tensors", "biases", "example", "residual axis"):
                rt.add_column(c)
            for role in ROLES:
                ts = [x for x in res.targets if x.role == role]
                rt.add_row(role, str(len(ts)), str(sum(1 for x in ts if x.bias)), ts[0].weight if ts else "—",
                           str(ts[0].residual_axis) if ts else "")
            out.print(rt)
            if res.missing:
                out.print("[yellow]missing:[/] " + "; ".join(
                    f"{r}{'' if l is None else f' layer {l}'} ({p})" for r, l, p in res.missing[:10])
                    + (f" … and {len(res.missing) - 10} more" if len(res.missing) > 10 else ""))
        if "provenance" in info:
            out.print(f"[cyan]edited by patcher:[/] {json.dumps(info['provenance'], sort_keys=True)}")
        if "manifest" in info:
            m = info["manifest"]
            out.print(f"[cyan]manifest:[/] patcher {m.get('patcher')}, {m.get('kind')}, {m.get('created')}; "
                      f"command: {m.get('command') or (m.get('recipe') or {}).get('file')}; "
                      f"{len(m.get('inputs', {}))} input and {len(m.get('outputs', {}))} output files with sha256")
    _guard(body)


# --- ablate / inject ---------------------------------------------------------------------------

def _print_plan(plan: Plan) -> None:
    t = Table(title=f"plan: {len(plan.all())} tensors, {_human(plan.bytes_edited)} rewritten", title_justify="left")
    for c in ("tensor", "role", "layer", "operation", "dtype", "bytes"):
        t.add_column(c, justify="right" if c in ("layer", "bytes") else "left", overflow="fold")
    for e in plan.all():
        t.add_row(e.name, e.role, "" if e.layer is None else str(e.layer), e.formula, e.dtype, _human(e.nbytes))
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
    with _progress() as prog:
        task = prog.add_task("writing", total=ck.total_bytes + sum(e.nbytes for e in plan.new))
        report = execute(plan, output, force=force, command=shlex.join(["patcher", *sys.argv[1:]]),
                         progress=lambda n: prog.advance(task, n),
                         on_shard=lambda f: prog.update(task, description=f"writing {f}"), hash_files=hash_files)
    _summary(plan, report)


def _summary(plan: Plan, report) -> None:
    t = Table(title=f"wrote {report.out}", title_justify="left", show_header=False, box=None)
    t.add_row("tensors edited", f"{len(plan.edits)} edited, {len(plan.new)} added")
    t.add_row("time", f"{report.seconds:.2f} s for {_human(report.bytes_written)}")
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


_DIRECTION_HELP = "FILE.npy, or FILE.safetensors[:LAYER] from `patcher extract`"
_NO_HASH_HELP = ("Record file sizes instead of sha256 in patcher-manifest.json (hashing reads every input and "
                 "output byte once more; on a 2-core machine it roughly doubles the time)")
_DIRECTION_HELP_SHORT = "Direction to measure per layer: " + _DIRECTION_HELP


@app.command()
def ablate(model: Path = typer.Argument(..., help="Model folder (safetensors, sharded or not)"),
           direction: str = typer.Option(..., "-d", "--direction", help=_DIRECTION_HELP),
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
           arch_table: Optional[Path] = typer.Option(None, "--arch-table", help="Custom architecture table (TOML)")):
    """Remove a direction from every selected residual writer (rank-1 or rank-k projection)."""
    def body():
        roles = tuple(r.strip() for r in targets.split(",") if r.strip())
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise PatcherError("--targets", f"unknown {bad}; choose from {', '.join(ROLES)}")
        if norm_preserve not in (None, "rows", "cols"):
            raise PatcherError("--norm-preserve", f"must be rows or cols, got {norm_preserve!r}")
        ck, res = _open(model, arch_table)
        d = load_direction(direction, res.d_model)
        plan = plan_ablation(ck, res, d, layers=parse_layers(layers, res.n_layers), roles=roles, scale=scale,
                             preserve=norm_preserve, untie=untie)
        _run(plan, output, force, dry_run, not no_hash)
    _guard(body)


@app.command()
def inject(model: Path = typer.Argument(..., help="Model folder"),
           direction: str = typer.Option(..., "-d", "--direction", help=_DIRECTION_HELP),
           output: Path = typer.Option(..., "-o", "--output", help="New folder to write"),
           layer: int = typer.Option(..., "--layer", help="Block whose output gets +alpha*r̂ (shows in resid_pre[layer+1])"),
           alpha: float = typer.Option(..., "--alpha", help="Strength, in residual-stream units"),
           target: str = typer.Option("mlp_out", "--target", help="mlp_out or attn_out"),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing"),
           force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
           no_hash: bool = typer.Option(False, "--no-hash", help=_NO_HASH_HELP),
           arch_table: Optional[Path] = typer.Option(None, "--arch-table", help="Custom architecture table (TOML)")):
    """Add alpha * r̂ to one writer's bias at one layer (creating the bias if needed)."""
    def body():
        if target not in ("mlp_out", "attn_out"):
            raise PatcherError("--target", f"must be mlp_out or attn_out, got {target!r}")
        ck, res = _open(model, arch_table)
        d = load_direction(direction, res.d_model)
        plan = plan_injection(ck, res, d, layer=layer if layer >= 0 else layer + res.n_layers, alpha=alpha,
                              target=target)
        _run(plan, output, force, dry_run, not no_hash)
    _guard(body)


def _score_table(result) -> Table:
    t = Table(title=f"layer scores (selected: {result.selected_layer}; rule: {result.metadata['selection_rule']})",
              title_justify="left")
    for c in ("layer", "|μ+ − μ−|", "SNR", "cos neighbours", "|μ+ − μ−| / |resid|"):
        t.add_column(c, justify="right")
    fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    for s in result.scores:
        style = "bold green" if s["layer"] == result.selected_layer else None
        t.add_row(str(s["layer"]), fmt(s.get("diff_norm")), fmt(s.get("snr")), fmt(s.get("neighbour_cos")),
                  fmt(s.get("relative_norm")), style=style)
    return t


@app.command()
def extract(model: Path = typer.Argument(..., help="Model folder"),
            positive: Path = typer.Option(..., "--positive", help="Prompts that show the behaviour (.txt lines or .jsonl with 'prompt')"),
            negative: Path = typer.Option(..., "--negative", help="Contrast prompts"),
            output: Path = typer.Option(..., "-o", "--output", help="directions .safetensors to write"),
            positions: str = typer.Option("-1", "--positions", help="Token positions from the end, e.g. -1,-2,-3"),
            batch_size: int = typer.Option(8, "--batch-size", min=1),
            max_prompts: Optional[int] = typer.Option(None, "--max-prompts", min=1, help="Use the first N of each file"),
            layers: Optional[str] = typer.Option(None, "--layers", help="resid_pre layers to compute, e.g. 0-20"),
            no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Tokenize raw prompts (base models)"),
            system: Optional[str] = typer.Option(None, "--system", help="System prompt for the chat template"),
            project_out_negative_mean: bool = typer.Option(False, "--project-out-negative-mean",
                                                           help="Orthogonalize each direction against the negative mean"),
            plot: Optional[Path] = typer.Option(None, "--plot", help="Write the score plot (.svg, or .png with matplotlib)"),
            force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists")):
    """Difference-in-means directions at every layer, streamed block by block, and a ranking."""
    def body():
        from patcher.extract import extract as run_extract
        from patcher.plot import plot_scores
        if output.exists() and not force:
            raise PatcherError(output, "already exists; pass --force to replace it")
        try:
            pos = [int(p) for p in positions.split(",") if p.strip()]
        except ValueError:
            raise PatcherError("--positions", f"cannot read {positions!r}; use e.g. -1,-2") from None
        with _progress() as prog:
            task = prog.add_task("prompts through the model", total=None)
            result = run_extract(model, positive, negative, positions=pos, batch_size=batch_size,
                                 max_prompts=max_prompts, layers=layers, chat_template=not no_chat_template,
                                 system=system, project_out_negative_mean=project_out_negative_mean,
                                 progress=lambda n: prog.advance(task, n))
        result.save(output)
        out.print(_score_table(result))
        counts = result.metadata["prompts"]
        out.print(f"wrote {output}: direction / positive_mean / negative_mean [{result.direction.shape[0]}, "
                  f"{result.direction.shape[1]}] from {counts['positive']['count']} + {counts['negative']['count']} "
                  f"prompts at positions {result.metadata['positions']}; use it as -d {output} "
                  f"(layer {result.selected_layer}) or -d {output}:LAYER")
        if plot:
            plot_scores(plot, result.scores, result.selected_layer, f"{model.name}: difference-in-means scores")
            out.print(f"plot: {plot}")
    _guard(body)


@app.command()
def export(model: Path = typer.Argument(..., help="Model folder (safetensors)"),
           output: Path = typer.Option(..., "-o", "--output", help="Folder to write (onnx/model.onnx + config + tokenizer)"),
           dtype: str = typer.Option("fp32", "--dtype", help="fp32 (model.onnx), fp16 (model_fp16.onnx: fp16 weights), "
                                                           "int4 (model_q4.onnx via MatMulNBits, plus model.onnx)"),
           opset: int = typer.Option(17, "--opset", help="ONNX opset (17: standard ops, correct with left padding)"),
           int4_block: int = typer.Option(32, "--int4-block", help="int4 quantization block size (power of two)"),
           int4_accuracy: Optional[int] = typer.Option(None, "--int4-accuracy",
                                                       help="MatMulNBits accuracy_level (4: int8 compute, faster on CPU)"),
           force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists")):
    """Export to ONNX from the same forward description the numpy path runs, weights streamed."""
    def body():
        from patcher.onnx_export import export as run_export
        with err.status("exporting (weights stream from the checkpoint one tensor at a time)"):
            run_export(model, output, dtype=dtype, force=force, opset=opset,
                       command=shlex.join(["patcher", *sys.argv[1:]]), int4_block=int4_block, int4_accuracy=int4_accuracy)
        files = sorted(p.relative_to(output) for p in output.rglob("*") if p.is_file())
        size = sum((output / f).stat().st_size for f in files)
        out.print(f"wrote {output} ({_human(size)}): " + ", ".join(str(f) for f in files))
    _guard(body)


def _onnx_folder(model: Path, dtype: str) -> Path:
    from patcher.verify import cached_export, is_onnx_folder
    if is_onnx_folder(model):
        return model
    return cached_export(model, dtype, announce=lambda m: err.print(f"[cyan]{m}[/]"))


@app.command()
def generate(model: Path = typer.Argument(..., help="Exported folder, or a safetensors folder (exported to a cache first)"),
             prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt (tokens stream as they come)"),
             prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file (.txt lines or .jsonl), batched"),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
             provider: str = typer.Option("cpu", "--provider", help="cpu or cuda"),
             dtype: str = typer.Option("fp32", "--dtype", help="which export to run: fp32, fp16, int4"),
             sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy"),
             temperature: float = typer.Option(1.0, "--temperature"),
             top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0: all)"),
             seed: int = typer.Option(0, "--seed"),
             batch_size: int = typer.Option(8, "--batch-size", min=1),
             no_chat_template: bool = typer.Option(False, "--no-chat-template"),
             system: Optional[str] = typer.Option(None, "--system")):
    """Chat-templated generation with KV cache through onnxruntime."""
    def body():
        from patcher.onnx_runtime import OnnxModel
        from patcher.prompts import encode_prompts, left_pad, load_tokenizer, read_prompt_file
        from patcher.verify import FILES, _eos, _until_eos
        if (prompt is None) == (prompts is None):
            raise PatcherError("--prompt/--prompts", "give exactly one of --prompt TEXT or --prompts FILE")
        folder = _onnx_folder(model, dtype)
        m = OnnxModel(folder, FILES[dtype], provider)
        tok = load_tokenizer(folder)
        texts = [prompt] if prompt is not None else read_prompt_file(prompts)
        ids = encode_prompts(tok, texts, chat_template=not no_chat_template and tok.has_chat_template, system=system)
        eos = _eos(folder, tok)
        kw = dict(eos_ids=eos, sample=sample, temperature=temperature, top_k=top_k, seed=seed)
        if prompt is not None:  # stream
            shown = []

            def show(t, done):
                if not done[0] and t[0] not in eos:
                    shown.append(int(t[0]))
                    text = tok.decode(shown, skip_special_tokens=True)
                    sys.stdout.write(text[len(show.printed):])
                    sys.stdout.flush()
                    show.printed = text
            show.printed = ""
            m.generate(*left_pad(ids, tok.pad_id), max_new_tokens, on_token=show, **kw)
            sys.stdout.write("\n")
            return
        for s in range(0, len(ids), batch_size):
            new = m.generate(*left_pad(ids[s:s + batch_size], tok.pad_id), max_new_tokens, **kw)
            for text, row in zip(texts[s:s + batch_size], new):
                out.print(f"[bold]> {text}[/]", highlight=False)
                out.print(tok.decode(_until_eos(row, eos), skip_special_tokens=True), highlight=False)
    _guard(body)


@app.command()
def verify(onnx_dir: Path = typer.Argument(..., help="Folder written by `patcher export`"),
           reference: Path = typer.Option(..., "--reference", help="The safetensors folder it was exported from"),
           original: Optional[Path] = typer.Option(None, "--original", help="The unedited model, for behaviour and projections"),
           prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file (default: built-in neutral prompts)"),
           direction: Optional[str] = typer.Option(None, "--direction", "-d", help=_DIRECTION_HELP_SHORT),
           dtype: str = typer.Option("fp32", "--dtype", help="which export to check: fp32, fp16, int4"),
           tokens: int = typer.Option(8, "--tokens", help="Greedy tokens compared between onnxruntime and numpy"),
           provider: str = typer.Option("cpu", "--provider", help="cpu or cuda"),
           no_chat_template: bool = typer.Option(False, "--no-chat-template"),
           as_json: bool = typer.Option(False, "--json")):
    """Parity of the export with the numpy forward, and what the edit did. Exit 1 when parity fails."""
    def body():
        from patcher.verify import FILES, verify as run_verify
        if dtype not in FILES:
            raise PatcherError("--dtype", f"must be one of {', '.join(FILES)}")
        d = None
        if direction:
            with Checkpoint(reference) as ck:
                d_model = int(ck.config.get("hidden_size") or ck.config.get("n_embd"))
            d = load_direction(direction, d_model)
        rep = run_verify(onnx_dir, reference, dtype=dtype, prompts=prompts, original=original, direction=d,
                         tokens=tokens, provider=provider, chat_template=not no_chat_template,
                         announce=lambda m: err.print(f"[cyan]{m}[/]"))
        if as_json:
            print(json.dumps(rep.as_dict(), indent=2))
        else:
            _print_verify(rep)
        if not rep.parity_ok:
            raise typer.Exit(1)
    _guard(body)


def _print_verify(rep) -> None:
    ok = "[green]ok[/]" if rep.parity_ok else "[bold red]FAILED[/]"
    t = Table(show_header=False, box=None, title="verify", title_justify="left")
    t.add_row("parity", f"max |Δ logits| {rep.max_abs_diff:.3g} (logits up to {rep.max_abs_logit:.3g}; "
                        f"tolerance {rep.tolerance:g} relative, {rep.dtype}) {ok}")
    t.add_row("top-1 agreement", f"{rep.top1_agreement:.1%} of prompt positions")
    if rep.tokens_compared:
        t.add_row("greedy generation", f"{rep.generation_match:.1%} of {rep.tokens_compared} tokens identical "
                                       "(onnxruntime with KV cache vs numpy)")
    if rep.marker_rate:
        t.add_row("marker rate", ", ".join(f"{k} {v:.1%}" for k, v in rep.marker_rate.items()))
    if rep.first_token_kl is not None:
        t.add_row("first-token KL", f"KL(original ‖ edited) = {rep.first_token_kl:.4g} nats (mean over prompts)")
    out.print(t)
    if rep.projections:
        pt = Table(title="mean |r̂·h|/|h| per resid_pre layer", title_justify="left")
        pt.add_column("layer", justify="right")
        pt.add_column("edited", justify="right")
        if "original" in rep.projections[0]:
            pt.add_column("original", justify="right")
        for row in rep.projections:
            pt.add_row(str(row["layer"]), f"{row['edited']:.3g}", *([f"{row['original']:.3g}"] if "original" in row else []))
        out.print(pt)


@app.command("run")
def run_recipe(recipe: Path = typer.Argument(..., help="Recipe TOML: [[model]] tables and [[step]] tables"),
               dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the whole plan, write nothing"),
               jobs: int = typer.Option(1, "--jobs", min=1, help="Models run in N processes (same results as 1)")):
    """Run a batch of edits (extract, ablate, inject, export, verify) over one or more models."""
    def body():
        from patcher import recipe as rc
        plans = rc.validate(rc.load(recipe))
        if dry_run:
            total = 0
            for row in rc.describe(plans):
                out.print(f"[bold]{row['model']}[/] step {row['step']} {row['op']}: {row['input']} -> {row['output']}",
                          highlight=False)
                for name, formula, nbytes in row["tensors"]:
                    out.print(f"    {name}  {formula}  {_human(nbytes)}", highlight=False)
                total += row["bytes"]
            out.print(f"dry run: {sum(len(p.actions) for p in plans)} steps over {len(plans)} model(s), "
                      f"{_human(total)} of tensors rewritten; nothing written")
            return
        with err.status(f"running {recipe} ({len(plans)} model(s), jobs={jobs})"):
            results = rc.run(plans, str(recipe), jobs=jobs)
        t = Table(title=f"recipe {recipe}", title_justify="left")
        for col in ("model", "step", "op", "result"):
            t.add_column(col)
        for name, rows in results.items():
            for index, op, summary in rows:
                t.add_row(name, str(index), op, summary)
        out.print(t)
    _guard(body)


@app.command()
def demo(out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write the artefacts (default: a new temp folder)")):
    """The whole pipeline on the bundled planted-direction model: extract, rank, ablate, inject,
    export, verify, diff — with a short report of what each step measured."""
    def body():
        from patcher import demo as d
        t0 = time.perf_counter()
        describe = {
            "extract": lambda f: f"selected resid_pre layer {f['selected_layer']} of {f['layers']}; cosine with the "
                                 f"planted direction {f['cosine_with_planted']:.4f} (SNR {f['snr']:.1f})",
            "ablate": lambda f: f"{f['tensors']} tensors projected; leakage after bf16 rounding {f['leakage']:.2e}",
            "inject": lambda f: f"+{f['alpha']}·r̂ as {f['bias']} ({'live in HF transformers' if f['hf_loads'] else 'ONNX only'}"
                                f"{', config ' + json.dumps(f['config']) if f['config'] else ''})",
            "export": lambda f: f"{f['folder']}: {', '.join(f['files'][:4])}{', …' if len(f['files']) > 4 else ''}",
            "verify": lambda f: f"onnxruntime vs numpy: max |Δ logits| {f['parity_max_abs']:.2e} "
                                f"({'ok' if f['parity_ok'] else 'FAILED'}), top-1 {f['top1']:.0%}, greedy tokens {f['greedy_match']:.0%}",
            "diff": lambda f: f"original→ablated: “{f['original_vs_ablated']}”; ablated→injected: “{f['ablated_vs_injected']}”",
        }
        t = Table(title="patcher demo", title_justify="left", show_lines=False)
        for c in ("step", "seconds", "what it measured"):
            t.add_column(c, overflow="fold")

        def step(name, seconds, facts):
            t.add_row(name, f"{seconds:.2f}", describe[name](facts))
            err.print(f"[dim]{name} done ({seconds:.2f} s)[/]")
        facts = d.run(out_dir, step)
        out.print(t)
        pt = Table(title="mean |v·h|/|h| of the planted v per resid_pre layer (positive prompts)", title_justify="left")
        for c in ("layer", "original", "ablated"):
            pt.add_column(c, justify="right")
        for row in facts["verify"]["projections"]:
            pt.add_row(str(row["layer"]), f"{row['original']:.3f}", f"{row['edited']:.2e}")
        out.print(pt)
        out.print(f"artefacts in {facts['out']}; total {time.perf_counter() - t0:.1f} s")
    _guard(body)


@app.command()
def version():
    """Print the patcher version."""
    print(__version__)


register_diff(app, out, err, _guard)


def _interrupt(_signum, _frame):
    raise Interrupted


def main():
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except Interrupted:
        err.print("[bold red]interrupted[/]")
        sys.exit(130)
