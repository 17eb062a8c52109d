"""Nothing is lost when things go wrong: a full disk, SIGKILL of `ablate` and `run`, and
determinism (the same command twice gives the same bytes)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, fixture_path, run_cli

PY_CLI = [sys.executable, "-c", "import sys; from patcher.cli import main; sys.argv[0] = 'patcher'; main()"]


def digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def looks_complete(parent, name):
    """Only the target name counts as an output; hidden .NAME.partial-* folders are scratch."""
    return (parent / name).exists()


def test_disk_full_mid_write_leaves_nothing_and_rerun_succeeds(tmp_path, direction64):
    import resource

    src = fixture_path("mixtral")
    before = digests(src)
    out = tmp_path / "out"

    def small_disk():  # every file this process writes is capped at 64 KiB: the shards do not fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    p = subprocess.run(
        [*PY_CLI, "ablate", str(src), "-d", str(direction64), "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
    )
    assert p.returncode == 1, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines[0].startswith("error:") and "File too large" in p.stderr and "Traceback" not in p.stderr
    assert not looks_complete(tmp_path, "out") and not list(tmp_path.glob(".out.*"))
    assert digests(src) == before
    run_cli("ablate", src, "-d", direction64, "-o", out)
    assert (out / "patcher-manifest.json").exists()


def _kill_when_writing(cmd, watch_dir, pattern, tmp_path):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(watch_dir.glob(pattern)):
        time.sleep(0.01)
    assert list(watch_dir.glob(pattern)), "never started writing"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    return p.returncode


def test_sigkill_of_ablate(tmp_path, direction64):
    src = fixture_path("qwen2_moe")
    before = digests(src)
    slow = (
        "import time, patcher.io.writer as w\norig = w._write_produced\n"
        "def slow(*a):\n    time.sleep(0.05); return orig(*a)\nw._write_produced = slow\n"
        "import sys; from patcher.cli import main; sys.argv[0] = 'patcher'; main()\n"
    )
    rc = _kill_when_writing(
        [sys.executable, "-c", slow, "ablate", str(src), "-d", str(direction64), "-o", str(tmp_path / "out")],
        tmp_path,
        ".out.partial-*/*.safetensors",
        tmp_path,
    )
    assert rc == -signal.SIGKILL
    assert not looks_complete(tmp_path, "out")
    assert digests(src) == before
    # re-run succeeds, stale partial removed
    run_cli("ablate", src, "-d", direction64, "-o", tmp_path / "out")
    assert not list(tmp_path.glob(".out.partial-*"))


def test_sigkill_of_run_then_resume(tmp_path, direction64):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''[[model]]
path = "{fixture_path("llama")}"
output = "out"

[[step]]
op = "ablate"
direction = "{direction64}"

[[step]]
op = "inject"
direction = "{direction64}"
layer = 1
alpha = 2.0

[[step]]
op = "export"
''')
    src_before = digests(fixture_path("llama"))
    slow = (
        "import time, patcher.io.writer as w\norig = w._write_produced\n"
        "def slow(*a):\n    time.sleep(0.2); return orig(*a)\nw._write_produced = slow\n"
        "import sys; from patcher.cli import main; sys.argv[0] = 'patcher'; main()\n"
    )
    (tmp_path / "out").mkdir()
    rc = _kill_when_writing(
        [sys.executable, "-c", slow, "run", str(recipe)],
        tmp_path / "out",
        ".02-injected.partial-*/*.safetensors",
        tmp_path,
    )
    assert rc == -signal.SIGKILL
    assert (tmp_path / "out" / "01-ablated" / "patcher-manifest.json").exists()  # finished before the kill
    assert not looks_complete(tmp_path / "out", "02-injected")
    assert digests(fixture_path("llama")) == src_before
    res = run_cli("run", recipe)
    assert res.output.count("skipped (complete") == 1  # the ablation is kept, the rest re-done
    assert (tmp_path / "out" / "03-onnx" / "onnx" / "model.onnx").exists()


@pytest.mark.parametrize(
    "cmd", [["ablate", "--norm-preserve", "cols"], ["inject", "--layer", "1", "--alpha", "2"]]
)
def test_same_command_twice_gives_identical_bytes(tmp_path, direction64, cmd):
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        run_cli(cmd[0], fixture_path("gemma2"), "-d", direction64, "-o", out, *cmd[1:])
        d = digests(out)
        m = json.loads((out / "patcher-manifest.json").read_text())
        d.pop("patcher-manifest.json")
        outs.append((d, m["outputs"]))
    assert outs[0] == outs[1]


def test_export_is_deterministic(tmp_path):
    a = digests(
        __import__("patcher.onnx.export", fromlist=["export"]).export(fixture_path("phi3"), tmp_path / "a")
    )
    b = digests(
        __import__("patcher.onnx.export", fromlist=["export"]).export(fixture_path("phi3"), tmp_path / "b")
    )
    for d in (a, b):
        d.pop("patcher-manifest.json")
        d.pop("patcher-export.json")  # names its output folder
    assert a == b


def test_fuzz_driver_finds_no_crash():
    """scripts/fuzz_headers.py: 3000 damaged shards and indexes, each a clean read or a CheckpointError."""
    p = subprocess.run(
        [
            sys.executable,
            str(FIXTURES.parent / "scripts" / "fuzz_headers.py"),
            "--cases",
            "3000",
            "--seed",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "3000 cases" in p.stdout and "crashes: 0" in p.stdout


def test_digest_cache_hits_and_misses_on_any_rewrite(tmp_path, monkeypatch):
    """Re-hashing is skipped for an unchanged file, never for a rewritten one, even when the
    rewrite keeps size and mtime (ctime cannot be forged from user space)."""
    from patcher.io import manifest

    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 1000)
    c = manifest.DigestCache()
    first = c.sha256(f)
    c.save()
    calls = []
    monkeypatch.setattr(manifest, "sha256_file", lambda p: calls.append(p) or "recomputed")
    assert manifest.DigestCache().sha256(f) == first and not calls  # a later run: from the cache
    st = os.stat(f)
    time.sleep(0.01)
    f.write_bytes(b"b" * 1000)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime restored
    assert manifest.DigestCache().sha256(f) == "recomputed" and calls
