"""`patcher convert`: GGUF -> HF safetensors folder, HF safetensors -> GGUF."""

from __future__ import annotations

from pathlib import Path

import typer

from patcher.cli.common import ARCH_TABLE_HELP, command_line, guard, human, open_model, out, progress


def register(app) -> None:

    @app.command()
    def convert(
        model: str = typer.Argument(..., help="A .gguf file, or an HF model folder / hub repo id"),
        output: Path = typer.Option(..., "-o", "--output", help="New folder (to hf) or .gguf file (to gguf)"),
        to: str | None = typer.Option(None, "--to", help="hf or gguf (default: the other format)"),
        dtype: str = typer.Option("bf16", "--dtype", help="HF weights: bf16, fp16 or fp32"),
        qtype: str = typer.Option(
            "F16", "--type", help="GGUF matrices: F32, F16, BF16 or Q8_0 (1-D tensors stay F32)"
        ),
        force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
        no_hash: bool = typer.Option(False, "--no-hash", help="Manifest records sizes, not sha256"),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
    ):
        """Convert a GGUF to an HF safetensors folder (config, tokenizer, chat template) or an HF model to
        GGUF, one tensor at a time."""

        def body():
            from patcher.pipelines import convert as cv

            cv.check_hf_dtype(dtype)
            cv.check_gguf_type(qtype)
            ck = open_model(model, arch_table)
            with ck:
                fmt = cv.target_format(ck, to)
                with progress() as prog:
                    prog.add_task(f"converting to {fmt}", total=None)
                    if fmt == "hf":
                        rep = cv.to_hf(
                            ck, output, dtype, force=force, command=command_line(), hash_files=not no_hash
                        )
                    else:
                        rep = cv.to_gguf(ck, output, qtype, force=force, command=command_line())
            out.print(
                f"wrote {rep.out}: {rep.tensors} tensors, {human(rep.bytes_written)} in {rep.seconds:.2f} s"
            )
            for n in rep.notes:
                out.print(f"[yellow]note:[/] {n}")

        guard(body)
