"""`patcher web`: a static chat site that runs an export in the browser (transformers.js)."""

from pathlib import Path

import typer

from patcher.cli.common import command_line, err, escape_markup, guard, human, out

DEFAULT_TOKENS, DEFAULT_PORT = 128, 8000


def register(app) -> None:
    @app.command()
    def web(
        export: Path = typer.Argument(..., help="Folder written by `patcher export` (the edited model)"),
        output: Path = typer.Option(..., "-o", "--output", help="Site folder to write"),
        compare: Path | None = typer.Option(
            None, "--compare", help="Export of the original model: both answer side by side"
        ),
        js: Path | None = typer.Option(
            None,
            "--js",
            help="node_modules/@huggingface/transformers/dist to copy (default: the pinned runtime, fetched "
            "once from the npm registry into ~/.cache/patcher/web-runtime)",
        ),
        cdn: bool = typer.Option(
            False,
            "--cdn",
            help="Load transformers.js and onnxruntime-web from pinned jsDelivr URLs instead of copying them",
        ),
        max_new_tokens: int = typer.Option(
            DEFAULT_TOKENS, "--max-new-tokens", min=1, help="Default answer length"
        ),
        serve: bool = typer.Option(False, "--serve", help="Then serve the site on 127.0.0.1 (Ctrl-C stops)"),
        port: int = typer.Option(
            DEFAULT_PORT, "--port", min=0, max=65535, help="Port for --serve (0: any free one)"
        ),
        force: bool = typer.Option(
            False, "--force", help="Replace OUTPUT if it is an earlier patcher output"
        ),
    ):
        """A static site (no server code) with a chat box that runs the export in the visitor's browser:
        WebGPU when available, WASM otherwise, in a Web Worker (tokens stream, stop and new chat work
        mid-answer); shows what the edit did."""

        def body():
            from patcher.web.serve import Server
            from patcher.web.site import build

            # take the port before any work: a busy one fails now, not after copying the whole site
            server = Server(output, port=port, log=_log) if serve else None
            try:
                build(
                    export,
                    output,
                    compare=compare,
                    js=js,
                    cdn=cdn,
                    force=force,
                    command=command_line(),
                    max_new_tokens=max_new_tokens,
                    say=lambda m: err.print(m, markup=False),
                )
                size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
                if server is None:
                    again = _command(export, output, compare, js, cdn, max_new_tokens, port)
                    out.print(
                        f"wrote {output} ({human(size)}): serve it with any static web server, e.g. "
                        f"`{again}`",
                        highlight=False,
                        soft_wrap=True,
                    )
                    return
                out.print(f"wrote {output} ({human(size)})")
                _serve(server)
            finally:
                if server is not None:
                    server.close()

        guard(body)


def _command(export, output, compare, js, cdn, max_new_tokens, port) -> str:
    """The same `patcher web` again, rebuilding and serving (every option the user gave kept)."""
    import shlex

    args = ["patcher", "web", str(export), "-o", str(output)]
    args += ["--compare", str(compare)] if compare else []
    args += ["--js", str(js)] if js else []
    args += ["--cdn"] if cdn else []
    args += ["--max-new-tokens", str(max_new_tokens)] if max_new_tokens != DEFAULT_TOKENS else []
    args += ["--port", str(port)] if port != DEFAULT_PORT else []
    return shlex.join([*args, "--force", "--serve"])


def _log(message: str) -> None:
    err.print(f"[dim]{escape_markup(message)}[/]", highlight=False)


def _serve(server) -> None:
    import threading

    from patcher.cli.common import Interrupted

    try:  # an interrupt from the moment the server listens (a client may already be served) stops it
        with server as s:
            out.print(f"serving {s.folder} at {s.url} (Ctrl-C stops)")
            threading.Event().wait()  # until Ctrl-C / SIGTERM raise Interrupted
    except (KeyboardInterrupt, Interrupted):
        out.print("stopped")
