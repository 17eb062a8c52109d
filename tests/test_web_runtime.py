"""The pinned browser runtime's first-run fetch (patcher/web/runtime.py), without the network: a stand-in
`npm` on PATH writes the tarballs `npm pack` would. What is checked: the sha512 pin, that only the listed
files are kept, that nothing is left behind when the fetch fails, and that a missing npm is one clear line."""

import base64
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import fixture_path, run_cli

from patcher.errors import PatcherError
from patcher.web import runtime

FAKE_NPM = """#!{python}
# stands in for `npm pack SPEC... --json --pack-destination DIR`: writes TARBALLS' files there
import json, shutil, sys
args = sys.argv[1:]
assert args[0] == "pack" and "--ignore-scripts" in args, args
dest = args[args.index("--pack-destination") + 1]
out = []
for name, path in json.loads({tarballs!r}).items():
    shutil.copy(path, dest)
    out.append({{"name": name, "filename": path.rsplit("/", 1)[1]}})
print(json.dumps(out))
"""


def _tarball(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    path = folder / f"{name.replace('@', '').replace('/', '-')}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for f, data in files.items():
            info = tarfile.TarInfo(f"package/{f}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sri(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """Tarballs holding every pinned file (plus one the site does not need), an `npm` that serves them,
    and an empty runtime cache. Returns (tarball paths, expected file contents)."""
    src = tmp_path / "tarballs"
    src.mkdir()
    tarballs, contents = {}, {}
    for pkg, pin in runtime.PINS.items():
        files = {f: f"{pkg} {f}".encode() for f in pin.files}
        files["dist/not-needed.js"] = b"x" * 1000
        tarballs[pkg] = str(_tarball(src, pkg, files))
        contents[pkg] = {f: files[f] for f in pin.files}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(FAKE_NPM.format(python=sys.executable, tarballs=json.dumps(tarballs)))
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("PATCHER_WEB_RUNTIME", str(tmp_path / "cache"))
    return tarballs, contents


def test_fetch_keeps_only_the_pinned_files(fake_npm, monkeypatch):
    tarballs, contents = fake_npm
    pins = {
        pkg: runtime.Pin(pin.version, _sri(Path(tarballs[pkg])), pin.files)
        for pkg, pin in runtime.PINS.items()
    }
    monkeypatch.setattr(runtime, "PINS", pins)
    said = []
    rt = runtime.cached(say=said.append)
    assert "npm registry" in said[0] and str(runtime.cached_folder()) in said[0]
    kept = sorted(
        p.relative_to(runtime.cached_folder()).as_posix()
        for p in runtime.cached_folder().rglob("*")
        if p.is_file()
    )
    layout = {
        pkg: d.relative_to(runtime.cached_folder()).as_posix()
        for pkg, d in runtime._layout(runtime.cached_folder()).items()
    }
    assert kept == sorted(f"{layout[pkg]}/{f}" for pkg, pin in pins.items() for f in pin.files)
    assert (rt.dist / runtime.TRANSFORMERS_MODULE).read_bytes() == contents[runtime.TRANSFORMERS_PKG][
        f"dist/{runtime.TRANSFORMERS_MODULE}"
    ]
    for f in runtime.WASM_FILES:
        assert (rt.wasm_dir / f).read_bytes() == contents[runtime.ORT_PKG][f"dist/{f}"]
        assert (rt.wasm_dir / f).stat().st_mode & 0o777 == 0o644
    assert [p.name for p in runtime.cache_root().iterdir()] == [runtime.cached_folder().name]
    said.clear()
    runtime.cached(say=said.append)  # the second time: from the cache, no npm
    assert said == []


def test_a_tarball_that_is_not_the_pinned_one_is_refused(fake_npm, tmp_path):
    export = tmp_path / "x"
    run_cli("export", fixture_path("llama"), "-o", export, "--dtype", "fp32")
    r = run_cli("web", export, "-o", tmp_path / "site", expect=1)
    assert "not the pinned tarball (sha512 differs)" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "site").exists()
    assert list(runtime.cache_root().iterdir()) == []  # no half-made runtime, no temp folder


def test_no_npm_is_one_clear_line(tmp_path, monkeypatch):
    export = tmp_path / "x"
    run_cli("export", fixture_path("llama"), "-o", export, "--dtype", "fp32")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("PATCHER_WEB_RUNTIME", str(tmp_path / "cache"))
    r = run_cli("web", export, "-o", tmp_path / "site", expect=1)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: npm: not found") and "--cdn" in lines[0]
    assert not (tmp_path / "site").exists()
    # --cdn needs no runtime files at all
    run_cli("web", export, "-o", tmp_path / "site", "--cdn")
    assert not (tmp_path / "cache").exists()


def test_a_damaged_cache_is_fetched_again(fake_npm, monkeypatch):
    tarballs, contents = fake_npm
    pins = {
        pkg: runtime.Pin(pin.version, _sri(Path(tarballs[pkg])), pin.files)
        for pkg, pin in runtime.PINS.items()
    }
    monkeypatch.setattr(runtime, "PINS", pins)
    rt = runtime.cached()
    (rt.wasm_dir / runtime.WASM_FILES[1]).unlink()
    said = []
    rt = runtime.cached(say=said.append)
    assert (
        said
        and (rt.wasm_dir / runtime.WASM_FILES[1]).read_bytes()
        == contents[runtime.ORT_PKG][f"dist/{runtime.WASM_FILES[1]}"]
    )


def test_npm_failure_is_npms_words_on_one_line(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(
        "#!/bin/sh\n"
        "echo 'npm error code E404' >&2\n"
        "echo 'npm error 404 Not Found - GET https://registry.example/onnxruntime-web' >&2\n"
        "echo 'npm error     at fetch (/usr/lib/node_modules/npm/x.js:1:1)' >&2\n"
        "echo 'npm error A complete log of this run can be found in: /root/.npm/_logs/x.log' >&2\n"
        "exit 1\n"
    )
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("PATCHER_WEB_RUNTIME", str(tmp_path / "cache"))
    with pytest.raises(PatcherError) as e:
        runtime.cached()
    msg = str(e.value)
    assert "code E404 404 Not Found - GET https://registry.example/onnxruntime-web" in msg
    assert "at fetch" not in msg and "complete log" not in msg and "--cdn" in msg
    assert list(runtime.cache_root().iterdir()) == []
