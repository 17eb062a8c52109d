"""`patcher export`, `patcher generate` and `patcher verify`."""

import sys
from pathlib import Path

import typer

from patcher import validate as V
from patcher.cli.common import ARCH_TABLE_HELP, DIRECTION_HELP_SHORT, command_line, err, guard, human, out
from patcher.errors import PatcherError
from patcher.io.jsonsafe import dumps
from patcher.io.paths import check_output


def _onnx_folder(model: Path, dtype: str) -> Path:
    from patcher.io.hub import locate
    from patcher.onnx.verify import cached_export, is_onnx_folder

    path = locate(model)[0]
    if is_onnx_folder(path):
        return path
    return cached_export(path, dtype, announce=lambda m: err.print(f"[cyan]{m}[/]"))


def _print_verify(rep) -> None:
    from rich.table import Table

    from patcher.onnx.quality import FIT

    ok = "[green]ok[/]" if rep.parity_ok else "[bold red]FAILED[/]"
    t = Table(show_header=False, box=None, title="verify", title_justify="left")
    t.add_row(
        "graph parity",
        f"max |Δ logits| {rep.max_abs_diff:.3g} (logits up to {rep.max_abs_logit:.3g}; tolerance "
        f"{rep.tolerance:g} relative, {rep.dtype}) {ok}",
    )
    t.add_row(
        "graph top-1",
        f"{rep.top1_agreement:.1%} of prompt positions agree with numpy on the weights the file stores",
    )
    if rep.tokens_compared:
        t.add_row(
            "graph greedy",
            f"{rep.generation_match:.1%} of {rep.tokens_compared} tokens identical "
            "(onnxruntime with KV cache vs numpy, same weights)",
        )
    q = rep.quality
    if q is not None:
        t.add_row(
            "vs fp32: KL",
            f"first-token KL(fp32 ‖ {rep.dtype}) {q.first_token_kl:.3g} nats, mean of "
            f"{q.prompts} prompts (max {q.max_first_token_kl:.3g})",
        )
        t.add_row(
            "vs fp32: top-1", f"{q.top1:.1%} of prompt positions ({q.first_top1:.1%} of first answer tokens)"
        )
        t.add_row("vs fp32: greedy", f"{q.greedy:.1%} of {q.prompts} × {q.tokens} greedy tokens identical")
        color = "green" if q.fit else "bold red"
        t.add_row(
            "ship",
            f"[{color}]{rep.dtype}: {q.verdict()}[/] (docs/onnx.md: KL ≤ "
            f"{FIT['first_token_kl']:g}, top-1 ≥ {FIT['top1']:.0%}, "
            f"greedy ≥ {FIT['greedy']:.0%})",
        )
    leak = rep.leakage.get("summary", {}) if rep.leakage else {}
    if "stored_of_original_max" in leak:
        t.add_row(
            "leakage along r̂",
            f"stored weights keep {leak['stored_of_original_max']:.2%} of the "
            f"original's component (worst of {leak['tensors']} edited tensors; the "
            f"checkpoint itself {leak.get('exact_of_original_max', 0):.2%})",
        )
    elif "stored_generic_max" in leak:
        t.add_row(
            "leakage along r̂",
            f"|Qᵀ W_stored| {leak['stored_generic_max']:.2%} of a "
            f"generic weight's (worst of {leak['tensors']} edited tensors; the "
            f"checkpoint itself {leak.get('exact_generic_max', 0):.2%})",
        )
    if rep.marker_rate:
        t.add_row("marker rate", ", ".join(f"{k} {v:.1%}" for k, v in rep.marker_rate.items()))
    if rep.first_token_kl is not None:
        t.add_row(
            "first-token KL", f"KL(original ‖ edited) = {rep.first_token_kl:.4g} nats (mean over prompts)"
        )
    out.print(t)
    if rep.projections:
        pt = Table(title="mean |r̂·h|/|h| per resid_pre layer", title_justify="left")
        pt.add_column("layer", justify="right")
        pt.add_column("edited", justify="right")
        if "original" in rep.projections[0]:
            pt.add_column("original", justify="right")
        for row in rep.projections:
            pt.add_row(
                str(row["layer"]),
                f"{row['edited']:.3g}",
                *([f"{row['original']:.3g}"] if "original" in row else []),
            )
        out.print(pt)


def register(app) -> None:
    @app.command()
    def export(
        model: Path = typer.Argument(..., help="Model folder (safetensors)"),
        output: Path = typer.Option(
            ..., "-o", "--output", help="Folder to write (onnx/model.onnx + config + tokenizer)"
        ),
        dtype: str = typer.Option(
            "fp32",
            "--dtype",
            help="Variants, comma-separated: fp32 (model.onnx), fp16 (model_fp16.onnx), int4 "
            "(model_q4.onnx), q4f16 (model_q4f16.onnx), int8 (model_quantized.onnx). An existing "
            "export of the same model gains the missing ones",
        ),
        opset: int = typer.Option(
            17, "--opset", help="ONNX opset (17: standard ops, correct with left padding)"
        ),
        int4_block: int = typer.Option(
            32,
            "--int4-block",
            help="MatMulNBits block size for int4/q4f16/int8 (power of two >= 16; int8 uses at least 32)",
        ),
        int4_accuracy: int | None = typer.Option(
            None,
            "--int4-accuracy",
            help="MatMulNBits accuracy_level (4: int8 activations on onnxruntime CPU; ignored by "
            "onnxruntime-web)",
        ),
        zero_points: bool = typer.Option(
            False,
            "--zero-points",
            help="Asymmetric blocks (a zero point per block): smaller rounding error, slightly larger files",
        ),
        direction: str | None = typer.Option(
            None,
            "--direction",
            "-d",
            help="The ablated direction(s), for orthogonal "
            "rounding when the checkpoint's provenance does not lead to them. " + DIRECTION_HELP_SHORT,
        ),
        force: bool = typer.Option(
            False, "--force", help="Replace OUTPUT if it exists (rebuild every variant)"
        ),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
    ):
        """Export to ONNX from the same forward description the numpy path runs, weights streamed."""

        def body():
            from patcher.onnx.export import export as run_export
            from patcher.onnx.export import parse_dtypes

            parse_dtypes(dtype)  # comma-separated variants, each checked
            V.number(int4_block, "int4_block", "--int4-block")
            if int4_accuracy is not None:
                V.number(int4_accuracy, "int4_accuracy", "--int4-accuracy")
            # an export of the same source gains the missing variants (export checks the source)
            check_output(output, [model], force=force, replace_ok=True)
            with err.status("exporting (weights stream from the checkpoint one tensor at a time)"):
                run_export(
                    model,
                    output,
                    dtype=dtype,
                    force=force,
                    opset=opset,
                    command=command_line(),
                    int4_block=int4_block,
                    int4_accuracy=int4_accuracy,
                    symmetric=not zero_points,
                    direction=direction,
                    arch_table=arch_table,
                    announce=lambda m: err.print(f"[yellow]note:[/] {m}", highlight=False),
                )
            files = sorted(p.relative_to(output) for p in output.rglob("*") if p.is_file())
            size = sum((output / f).stat().st_size for f in files)
            out.print(f"wrote {output} ({human(size)}): " + ", ".join(str(f) for f in files))

        guard(body)

    @app.command()
    def generate(
        model: Path = typer.Argument(
            ..., help="Exported folder, or a safetensors folder (exported to a cache first)"
        ),
        prompt: str | None = typer.Option(None, "--prompt", help="One prompt (tokens stream as they come)"),
        prompts: Path | None = typer.Option(
            None, "--prompts", help="Prompt file (.txt lines or .jsonl), batched"
        ),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
        provider: str = typer.Option("cpu", "--provider", help="cpu or cuda"),
        dtype: str = typer.Option("fp32", "--dtype", help="which export to run: fp32, fp16, int4"),
        sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy"),
        temperature: float = typer.Option(1.0, "--temperature"),
        top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0: all)"),
        seed: int = typer.Option(0, "--seed"),
        batch_size: int = typer.Option(8, "--batch-size", min=1),
        no_chat_template: bool = typer.Option(False, "--no-chat-template"),
        system: str | None = typer.Option(None, "--system"),
    ):
        """Chat-templated generation with KV cache through onnxruntime."""

        def body():
            from patcher.model.prompts import (
                check_lengths,
                encode_prompts,
                left_pad,
                load_tokenizer,
                read_prompt_file,
            )
            from patcher.onnx.export import variant_file
            from patcher.onnx.runtime import OnnxModel
            from patcher.onnx.verify import FILES, folder_config, stop_tokens, until_eos

            if (prompt is None) == (prompts is None):
                raise PatcherError(
                    "--prompt/--prompts", "give exactly one of --prompt TEXT or --prompts FILE"
                )
            V.choice(dtype, tuple(FILES), "--dtype")
            V.choice(provider, ("cpu", "cuda"), "--provider")
            V.number(max_new_tokens, "max_new_tokens", "--max-new-tokens")
            V.number(temperature, "temperature", "--temperature")
            V.number(top_k, "top_k", "--top-k")
            V.number(seed, "seed", "--seed")
            V.number(batch_size, "batch_size", "--batch-size")
            if prompt is not None and not prompt.strip():
                raise PatcherError("--prompt", "the prompt is empty")
            texts = [prompt] if prompt is not None else read_prompt_file(prompts)
            folder = _onnx_folder(model, dtype)
            cfg = folder_config(folder)
            vocab = cfg.get("vocab_size")
            if isinstance(vocab, int) and top_k > vocab:
                raise PatcherError("--top-k", f"must be <= the vocabulary size {vocab}, got {top_k}")
            m = OnnxModel(folder, variant_file(folder, dtype), provider)
            tok = load_tokenizer(folder)
            ids = encode_prompts(
                tok, texts, chat_template=not no_chat_template and tok.has_chat_template, system=system
            )
            if any(len(i) == 0 for i in ids):
                raise PatcherError(
                    "--prompt" if prompt is not None else prompts, "a prompt tokenizes to nothing"
                )
            check_lengths(ids, cfg, "--prompt" if prompt is not None else prompts, extra=max_new_tokens)
            eos = stop_tokens(folder, tok)
            kw = dict(eos_ids=eos, sample=sample, temperature=temperature, top_k=top_k, seed=seed)
            if prompt is not None:  # stream
                shown = []

                def show(t, done):
                    if not done[0] and t[0] not in eos:
                        shown.append(int(t[0]))
                        text = tok.decode(shown, skip_special_tokens=True)
                        sys.stdout.write(text[len(show.printed) :])
                        sys.stdout.flush()
                        show.printed = text

                show.printed = ""
                m.generate(*left_pad(ids, tok.pad_id), max_new_tokens, on_token=show, **kw)
                sys.stdout.write("\n")
                return
            for s in range(0, len(ids), batch_size):
                new = m.generate(*left_pad(ids[s : s + batch_size], tok.pad_id), max_new_tokens, **kw)
                for text, row in zip(texts[s : s + batch_size], new):
                    out.print(f"[bold]> {text}[/]", highlight=False)
                    out.print(tok.decode(until_eos(row, eos), skip_special_tokens=True), highlight=False)

        guard(body)

    @app.command()
    def verify(
        onnx_dir: Path = typer.Argument(..., help="Folder written by `patcher export`"),
        reference: Path = typer.Option(
            ..., "--reference", help="The safetensors folder it was exported from"
        ),
        original: Path | None = typer.Option(
            None, "--original", help="The unedited model, for behaviour and projections"
        ),
        prompts: Path | None = typer.Option(
            None, "--prompts", help="Prompt file (default: built-in neutral prompts)"
        ),
        direction: str | None = typer.Option(None, "--direction", "-d", help=DIRECTION_HELP_SHORT),
        dtype: str = typer.Option(
            "fp32", "--dtype", help="which variant to check: fp32, fp16, int4, q4f16, int8"
        ),
        tokens: int = typer.Option(
            8, "--tokens", help="Greedy tokens compared between onnxruntime and numpy"
        ),
        quality_tokens: int = typer.Option(
            32,
            "--quality-tokens",
            help="Greedy tokens per prompt compared with the fp32 model (quality; 0: skip it)",
        ),
        provider: str = typer.Option("cpu", "--provider", help="cpu or cuda"),
        no_chat_template: bool = typer.Option(False, "--no-chat-template"),
        as_json: bool = typer.Option(False, "--json"),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
    ):
        """Parity of the export with the numpy forward, and what the edit did. Exit 1 when parity fails."""

        def body():
            from patcher.onnx.verify import FILES
            from patcher.onnx.verify import verify as run_verify

            V.choice(dtype, tuple(FILES), "--dtype")
            V.choice(provider, ("cpu", "cuda"), "--provider")
            V.number(tokens, "tokens", "--tokens")
            V.number(quality_tokens, "tokens", "--quality-tokens")
            from patcher.edit.directions import load_direction
            from patcher.io.hub import locate
            from patcher.model.opened import Model

            ref = Model.open(reference, arch_table)
            d = load_direction(direction, ref.d_model) if direction else None
            rep = run_verify(
                locate(onnx_dir)[0],
                reference,
                dtype=dtype,
                prompts=prompts,
                original=original,
                direction=d,
                tokens=tokens,
                quality_tokens=quality_tokens,
                provider=provider,
                chat_template=not no_chat_template,
                arch_table=arch_table,
                announce=lambda m: err.print(f"[cyan]{m}[/]"),
            )
            if as_json:
                print(dumps(rep.as_dict(), indent=2))
            else:
                _print_verify(rep)
            if not rep.parity_ok:
                raise typer.Exit(1)

        guard(body)
