"""patcher installed like any other tool: a wheel built from this checkout (`pip wheel --no-deps`),
installed in a fresh venv (its heavy dependencies from the system site-packages, patcher itself only from
the wheel), run with its working directory outside the repository and an empty runtime cache. Its
`patcher web` fetches the pinned runtime (npm registry), builds a site from an export it made itself, serves
it, and the page answers in Chromium as Python onnxruntime does. Needs npm and the browser: skips without
them, fails under CI."""

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import fixture_path
from test_web import NEW_TOKENS, PROMPT, free_port, need_browser, prompt_ids, python_greedy  # noqa: F401

pytestmark = pytest.mark.usefixtures("need_browser")  # test_web's: skips, or fails under CI, saying why


def test_wheel_patcher_web_outside_the_checkout(wheel, venv, tmp_path):
    import zipfile

    from patcher.web.browser import chromium

    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("index.html", "app.js", "worker.js", "style.css", "favicon.svg"):
        assert f"patcher/web/assets/{f}" in names
    assert "patcher/web/runtime.py" in names and not any(n.endswith(".wasm") for n in names)
    print(f"\nwheel {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB")
    env = venv
    work = tmp_path / "work"  # the commands' working directory: nowhere near the repository
    work.mkdir()
    run_env = {
        **os.environ,
        "PATCHER_WEB_RUNTIME": str(tmp_path / "runtime-cache"),
        "PATCHER_CACHE": str(tmp_path / "cache"),
    }
    run_env.pop("PYTHONPATH", None)

    def patcher(*args, **kw):
        return subprocess.run(
            [env / "bin" / "patcher", *map(str, args)],
            cwd=work,
            env=run_env,
            capture_output=True,
            text=True,
            **kw,
        )

    where = subprocess.run(
        [env / "bin" / "python", "-c", "import patcher; print(patcher.__file__)"],
        cwd=work,
        env=run_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Path(where.strip()).is_relative_to(env), f"patcher came from {where}, not the wheel"
    r = patcher("export", fixture_path("llama"), "-o", "x", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    t = time.perf_counter()
    r = patcher("web", "x", "-o", "site")
    first_run = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    assert "npm registry" in r.stderr  # the first run says it fetches, and from where
    t = time.perf_counter()
    r = patcher("web", "x", "-o", "site", "--force")
    print(f"patcher web: first run (runtime fetched) {first_run:.1f} s, next {time.perf_counter() - t:.1f} s")
    assert r.returncode == 0 and "npm" not in r.stderr, r.stderr
    port = free_port()
    server = subprocess.Popen(
        [env / "bin" / "patcher", "web", "x", "-o", "site", "--force", "--serve", "--port", str(port)],
        cwd=work,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "site.json", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.communicate()
                time.sleep(0.2)
        with chromium() as context:
            page = context.new_page()
            problems = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))
            page.goto(f"{url}?device=wasm&max_new_tokens={NEW_TOKENS}")
            page.wait_for_function("!document.querySelector('#send').disabled", timeout=60_000)
            page.fill("#prompt", PROMPT)
            page.press("#prompt", "Enter")
            page.wait_for_function("window.patcher.answered >= 1", timeout=60_000)
            last = page.evaluate("window.patcher.state.last.edited")
            assert not problems and not context.blocked
    finally:
        server.terminate()
        server.communicate(timeout=20)
    export = work / "x"
    assert last["ids"] == python_greedy(export, "model.onnx", prompt_ids(export))
