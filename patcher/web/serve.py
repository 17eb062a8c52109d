"""A local static file server for a built site: 127.0.0.1 only, the MIME types browsers insist on for
ES modules and WebAssembly streaming compilation, no directory listings, quiet logs."""

import functools
import http.server
import threading
from collections.abc import Callable
from pathlib import Path

from patcher.errors import PatcherError

MIME = {
    ".wasm": "application/wasm",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css",
    ".jinja": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        **MIME,
        "": "application/octet-stream",
    }

    def list_directory(self, path):  # a site serves files, not folder listings
        self.send_error(404, "no listing")
        return None

    def end_headers(self):
        self.send_header("Cache-Control", "no-cache")  # a rebuilt site reuses its URLs
        # cross-origin isolation: SharedArrayBuffer, so onnxruntime-web's WASM runs multi-threaded
        # (credentialless still lets the --cdn build's scripts load)
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "credentialless")
        super().end_headers()

    def log_message(self, fmt, *args):
        if self.server.log:
            self.server.log(fmt % args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    log: Callable[[str], None] | None = None  # where request lines go (None: nowhere)

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the browser closed a connection (page closed, download cancelled): nothing to report
        super().handle_error(request, client_address)


class Server:
    """`with Server(folder) as s: s.url` — a background-thread server, closed on exit. The port is taken
    at construction, the folder only read when it starts: `patcher web --serve` holds the port first, so a
    busy port is reported before the site is built."""

    def __init__(
        self,
        folder: str | Path,
        port: int = 0,
        host: str = "127.0.0.1",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        handler = functools.partial(_Handler, directory=str(self.folder))
        try:
            self.httpd = _HTTPServer((host, port), handler)
        except OSError as e:
            raise PatcherError(f"{host}:{port}", f"cannot listen: {e.strerror or e}") from None
        self.httpd.log = log
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        # server_address, not the socket: the URL is still known after the server closed
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> "Server":
        if not (self.folder / "index.html").is_file():
            raise PatcherError(self.folder, "not a site built by `patcher web` (no index.html)")
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self.thread.start()
        return self

    def close(self) -> None:
        if self.thread:
            self.httpd.shutdown()
            self.thread.join(timeout=5)
        self.httpd.server_close()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()
