"""`patcher web`: a static chat site that runs an export in the browser (transformers.js)."""

from pathlib import Path
from typing import Optional

import typer

from patcher.cli.common import command_line, err, guard, human, out


def register(app) -> None:
    @app.command()
    def web(
        export: Path = typer.Argument(..., help="Folder written by `patcher export` (the edited model)"),
        output: Path = typer.Option(..., "-o", "--output", help="Site folder to write"),
        compare: Optional[Path] = typer.Option(
            None, "--compare", help="Export of the original model: both answer side by side"
        ),
        js: Optional[Path] = typer.Option(
            None,
            "--js",
            help="node_modules/@huggingface/transformers/dist to copy "
            "(default: the repository's web/node_modules)",
        ),
        cdn: bool = typer.Option(
            False,
            "--cdn",
            help="Load transformers.js and onnxruntime-web from pinned jsDelivr URLs instead of copying them",
        ),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Default answer length"),
        serve: bool = typer.Option(False, "--serve", help="Then serve the site on 127.0.0.1 (Ctrl-C stops)"),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port for --serve (0: any free one)"),
        force: bool = typer.Option(
            False, "--force", help="Replace OUTPUT if it is an earlier patcher output"
        ),
    ):
        """A static site (no server code) with a chat box that runs the export in the visitor's browser:
        WebGPU when available, WASM otherwise; streams tokens; shows what the edit did."""

        def body():
            from patcher.web.site import build

            build(
                export,
                output,
                compare=compare,
                js=js,
                cdn=cdn,
                force=force,
                command=command_line(),
                max_new_tokens=max_new_tokens,
            )
            size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
            out.print(
                f"wrote {output} ({human(size)}): open it through any static web server, e.g. "
                f"`patcher web {export} -o {output} --force --serve`"
            )
            if serve:
                _serve(output, port)

        guard(body)


def _serve(folder: Path, port: int) -> None:
    import threading
    from patcher.cli.common import Interrupted
    from patcher.web.serve import Server

    with Server(folder, port=port, log=lambda m: err.print(f"[dim]{m}[/]", highlight=False)) as s:
        out.print(f"serving {folder} at {s.url} (Ctrl-C stops)")
        try:
            threading.Event().wait()  # until Ctrl-C / SIGTERM raise Interrupted
        except (KeyboardInterrupt, Interrupted):
            out.print("stopped")
