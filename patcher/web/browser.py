"""Headless Chromium for tests and benchmarks: Playwright (Python) driving the system Chromium (Debian's
/usr/bin/chromium), never a downloaded browser, with every request off 127.0.0.1 refused (so a page that
works here works offline)."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from patcher.errors import PatcherError

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> Path | None:
    found = os.environ.get("PATCHER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return Path(found) if Path(found).is_file() else None


def missing() -> str | None:
    """Why a browser cannot run here, or None."""
    if chromium_path() is None:
        return "no chromium (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no playwright for Python (pip install -e '.[test]')"
    return None


@contextmanager
def chromium(offline: bool = True):
    """A Playwright browser context; with offline=True every non-localhost request is aborted and
    recorded in context.blocked."""
    why = missing()
    if why:
        raise PatcherError("browser", why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path()), headless=True, args=FLAGS)
        try:
            context = browser.new_context()
            blocked: list[str] = []
            context.blocked = blocked  # type: ignore[attr-defined]  # callers read what was refused here
            if offline:

                def route(r):
                    host = urlparse(r.request.url).hostname
                    if host in ("127.0.0.1", "localhost") or r.request.url.startswith(("data:", "blob:")):
                        r.continue_()
                    else:
                        blocked.append(r.request.url)
                        r.abort()

                context.route("**/*", route)
            yield context
        finally:
            browser.close()
