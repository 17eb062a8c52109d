"""One pass over the bytes: digests computed while streaming, shards overlapped, hub cache names,
and a light `patcher --version`. Every digest is checked against hashlib over the files on disk."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_path, run_cli

from patcher.edit import apply
from patcher.io import manifest, writer
from patcher.io.writer import InputDigest

SHARDED = ["llama", "mixtral", "qwen2_moe", "deepseek_v3", "gpt2"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny chunks, slices and buffer pool, so a KB-sized fixture runs through many chunks, reuses
    buffers and makes the queues wait."""
    monkeypatch.setattr(writer, "_CHUNK", 1000)
    monkeypatch.setattr(writer, "_HASH_SLICE", 333)
    monkeypatch.setattr(writer, "_BUFFERS", 2)
    monkeypatch.setattr(writer, "_IN_FLIGHT", 4096)
    monkeypatch.setattr(writer, "_COPY_PIECE", 3000)  # a copy thread gets many small ranges
    monkeypatch.setattr(writer, "_COPY_AHEAD", 7000)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "digest-cache"))


def test_input_digest_feeds_in_any_pattern(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    d = InputDigest(p)
    v = memoryview(data)
    d.feed(0, v[:100])
    d.feed(50, v[50:300])  # overlaps what passed: only the new part counts
    d.feed(1000, v[1000:2000])  # a gap: read from the file
    d.feed(1500, v[1500:1800])  # entirely seen already
    d.feed(9000, v[9000:9001])
    assert d.finish() == hashlib.sha256(data).hexdigest()  # the tail is read too
    assert d.reread == (1000 - 300) + (9000 - 2000) + (50_000 - 9001)
    d.close()


@pytest.mark.parametrize("model_type", SHARDED)
def test_streamed_digests_match_the_files_and_inputs_are_not_reread(
    model_type, tmp_path, direction64, fresh_cache, small_chunks, monkeypatch
):
    src = fixture_path(model_type)
    hashed = []
    orig = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: hashed.append(Path(p).name) or orig(p))
    out = tmp_path / "out"
    run_cli("ablate", src, "-d", direction64, "-o", out)
    m = json.loads((out / manifest.MANIFEST).read_text())
    assert m["outputs"] == {p.name: sha(p) for p in out.iterdir() if p.name != manifest.MANIFEST}
    shards = {p.name for p in src.glob("*.safetensors")}
    assert {k: v for k, v in m["inputs"].items() if k in shards} == {n: sha(src / n) for n in shards}
    assert set(m["inputs"]) == {p.name for p in src.iterdir() if p.is_file()}
    assert not [n for n in hashed if n.endswith(".safetensors")]  # no shard was hashed by re-reading it
    assert "hub_cache" not in m and "warnings" not in m


def test_a_rerun_takes_both_digests_from_the_cache(tmp_path, direction64, fresh_cache, monkeypatch):
    src = fixture_path("mixtral")
    run_cli("ablate", src, "-d", direction64, "-o", tmp_path / "a")
    streamed = []
    orig = writer.InputDigest.feed
    monkeypatch.setattr(writer.InputDigest, "feed", lambda self, *a: streamed.append(1) or orig(self, *a))
    run_cli("ablate", tmp_path / "a", "-d", direction64, "-o", tmp_path / "b")  # the output is the next input
    assert not streamed  # its shards' digests were remembered when they were written
    m = json.loads((tmp_path / "b" / manifest.MANIFEST).read_text())
    shard = "model-00001-of-00002.safetensors"
    assert m["inputs"][shard] == sha(tmp_path / "a" / shard)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt2"])
@pytest.mark.parametrize("hash_files", [True, False])
def test_overlapped_shards_write_the_same_bytes_as_one_at_a_time(
    model_type, hash_files, tmp_path, direction64, fresh_cache, small_chunks, monkeypatch
):
    from patcher.cli.common import open_model
    from patcher.edit import shards
    from patcher.edit.directions import load_direction
    from patcher.edit.plan import plan_ablation

    results = {}
    # (shards in flight, cores): 16 cores spread each file's digests over two threads; None = chosen
    for window, ncores in ((1, 2), (2, 2), (3, 16), (None, 16), (None, 2)):
        monkeypatch.setattr(shards, "cores", lambda n=ncores: n)
        ck = open_model(fixture_path(model_type), None)
        res = ck.resolved
        plan = plan_ablation(
            ck,
            load_direction(str(direction64), res.d_model),
            layers=None,
            roles=("embed", "attn_out", "mlp_out"),
            scale=1.0,
            preserve=None,
            untie=False,
        )
        out = tmp_path / f"w{window}-{ncores}"
        # rehash: every run streams its input digests (the first would otherwise serve the others)
        rep = apply.execute(plan, out, hash_files=hash_files, shards_in_flight=window, rehash_inputs=True)
        m = json.loads((out / manifest.MANIFEST).read_text())
        results[window, ncores] = (
            {p.name: p.read_bytes() for p in out.iterdir() if p.name != manifest.MANIFEST},
            rep.leakage,
            m["outputs"],
            m["inputs"],
        )
        ck.close()
    first = results[1, 2]
    assert all(r == first for r in results.values())
    if hash_files:
        assert first[3] == {p.name: sha(p) for p in fixture_path(model_type).iterdir() if p.is_file()}


def test_writer_error_stops_the_run_and_leaves_nothing(tmp_path, direction64, small_chunks, monkeypatch):
    calls = []
    orig = writer._pwrite_all

    def fail_late(fd, data, offset):
        calls.append(offset)
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        return orig(fd, data, offset)

    monkeypatch.setattr(writer, "_pwrite_all", fail_late)
    r = run_cli("ablate", fixture_path("mixtral"), "-d", direction64, "-o", tmp_path / "out", expect=1)
    assert "No space left on device" in r.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_failing_copy_thread_stops_the_run_and_leaves_nothing(
    tmp_path, direction64, small_chunks, monkeypatch
):
    import threading

    from patcher.edit import shards

    monkeypatch.setattr(shards, "cores", lambda: 16)  # a copy thread per file
    calls = []
    orig = writer._copy_range

    def fail_late(*a):
        calls.append(threading.current_thread().name)
        if len(calls) == 9:
            raise OSError(28, "No space left on device")
        return orig(*a)

    monkeypatch.setattr(writer, "_copy_range", fail_late)
    r = run_cli("ablate", fixture_path("mixtral"), "-d", direction64, "-o", tmp_path / "out", expect=1)
    assert "No space left on device" in r.output and calls[-1].startswith("copy ")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def _single_file(src: Path, dst: Path) -> Path:
    """The fixture as one model.safetensors (+ its side files): shard names in a snapshot are the model
    helper's part (its index check follows the links); a single file needs no index."""
    from patcher.io.checkpoint import Checkpoint
    from patcher.io.writer import OutTensor, write_safetensors

    dst.mkdir(parents=True)
    ck = Checkpoint(src)
    infos = [i for f in ck.files for i in ck.shard_tensors(f)]
    write_safetensors(
        dst / "model.safetensors",
        [OutTensor(i.name, i.dtype, i.shape, source=i) for i in infos],
        {"format": "pt"},
    )
    for p in src.iterdir():
        if p.suffix == ".json" and p.name != "model.safetensors.index.json":
            shutil.copyfile(p, dst / p.name)
    return dst


def _hub_snapshot(root: Path, src: Path, corrupt: str | None = None) -> Path:
    """A hand-made Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<name>, LFS-style
    sha256 names for the weights (git-sha1-style 40-hex names for the rest)."""
    repo = root / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("c" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        data = p.read_bytes()
        if p.suffix == ".safetensors":
            name = "0" * 64 if p.name == corrupt else hashlib.sha256(data).hexdigest()
        else:
            name = hashlib.sha1(data).hexdigest()
        (blobs / name).write_bytes(data)
        os.symlink(f"../../blobs/{name}", snap / p.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    return snap


def test_hub_blob_names_of_a_sharded_snapshot(tmp_path):
    src = fixture_path("mixtral")
    snap = _hub_snapshot(tmp_path / "hub", src)
    for p in src.iterdir():
        want = sha(p) if p.suffix == ".safetensors" else None  # sha1-named blobs are not sha256 claims
        assert manifest.hub_blob_sha256(snap / p.name) == want
        assert manifest.hub_blob_sha256(p) is None  # a plain file is never read as a cache entry
    os.symlink(src / "config.json", tmp_path / "link.json")  # a link elsewhere is not a cache blob
    assert manifest.hub_blob_sha256(tmp_path / "link.json") is None


def _input_digests_made(monkeypatch) -> list[Path]:
    made: list[Path] = []
    orig = writer.InputDigest.__init__
    monkeypatch.setattr(writer.InputDigest, "__init__", lambda self, p: made.append(Path(p)) or orig(self, p))
    return made


def test_hub_blob_name_is_the_input_digest_without_reading_it(
    tmp_path, direction64, fresh_cache, monkeypatch
):
    src = _single_file(fixture_path("mixtral"), tmp_path / "single")
    snap = _hub_snapshot(tmp_path / "hub", src)
    made = _input_digests_made(monkeypatch)
    r = run_cli("ablate", snap, "-d", direction64, "-o", tmp_path / "out")
    assert "warning" not in r.output and "Hugging Face cache names" in r.output
    assert not made  # the weights were read for the edit and the copy, never for a digest
    m = json.loads((tmp_path / "out" / manifest.MANIFEST).read_text())
    assert sorted(m["hub_cache"]) == ["model.safetensors"]  # config.json has a sha1 name: not claimed
    entry = m["hub_cache"]["model.safetensors"]
    assert entry["sha256"] == sha(src / "model.safetensors") == m["inputs"]["model.safetensors"]
    assert entry["matches_streamed_sha256"] is None and "without reading" in entry["source"]
    out = tmp_path / "out"
    assert m["outputs"] == {p.name: sha(p) for p in out.iterdir() if p.name != manifest.MANIFEST}
    assert not m.get("warnings")
    # --rehash-inputs reads it and checks the name against the bytes
    run_cli("ablate", snap, "-d", direction64, "-o", tmp_path / "again", "--rehash-inputs")
    assert made == [snap / "model.safetensors"]
    m = json.loads((tmp_path / "again" / manifest.MANIFEST).read_text())
    assert m["hub_cache"]["model.safetensors"]["matches_streamed_sha256"] is True


def test_a_hub_blob_whose_size_changed_is_hashed_not_trusted(tmp_path, direction64, fresh_cache, monkeypatch):
    snap = _hub_snapshot(tmp_path / "hub", _single_file(fixture_path("llama"), tmp_path / "single"))
    plan = _plan_of(snap, direction64)
    plan.ck.files["model.safetensors"].size += 1  # as if the blob changed after it was opened
    made = _input_digests_made(monkeypatch)
    apply.execute(plan, tmp_path / "out")
    assert made  # streamed, and so checked against the name
    m = json.loads((tmp_path / "out" / manifest.MANIFEST).read_text())
    assert m["hub_cache"]["model.safetensors"]["matches_streamed_sha256"] is True


def test_a_hub_blob_that_does_not_match_its_name_is_caught_by_rehash(tmp_path, direction64, fresh_cache):
    """The name is trusted by default (docs/formats.md: what is trusted); --rehash-inputs catches a blob whose
    bytes are not the ones named (damaged, or replaced by hand)."""
    src = _single_file(fixture_path("mixtral"), tmp_path / "single")
    bad = "model.safetensors"
    snap = _hub_snapshot(tmp_path / "hub", src, corrupt=bad)
    run_cli("ablate", snap, "-d", direction64, "-o", tmp_path / "trusted")
    m = json.loads((tmp_path / "trusted" / manifest.MANIFEST).read_text())
    assert m["inputs"][bad] == "0" * 64 and "without reading" in m["hub_cache"][bad]["source"]
    r = run_cli("ablate", snap, "-d", direction64, "-o", tmp_path / "out", "--rehash-inputs")
    assert "warning:" in r.output and bad in r.output and "cache name" in r.output
    m = json.loads((tmp_path / "out" / manifest.MANIFEST).read_text())
    assert m["hub_cache"][bad]["matches_streamed_sha256"] is False
    assert m["hub_cache"][bad]["sha256"] == "0" * 64 and m["inputs"][bad] == sha(src / bad)
    assert len(m["warnings"]) == 1 and bad in m["warnings"][0]


def test_hub_cache_names_without_hashing(tmp_path, direction64):
    snap = _hub_snapshot(tmp_path / "hub", _single_file(fixture_path("llama"), tmp_path / "single"))
    run_cli("ablate", snap, "-d", direction64, "-o", tmp_path / "out", "--no-hash")
    m = json.loads((tmp_path / "out" / manifest.MANIFEST).read_text())
    assert m["hub_cache"] and all(e["matches_streamed_sha256"] is None for e in m["hub_cache"].values())


HEAVY = (
    "onnx",
    "onnxruntime",
    "tokenizers",
    "jinja2",
    "ml_dtypes",
    "numpy",
    "safetensors",
    "onnx_ir",
    "rich.progress",
    "pydantic",
)  # pydantic: typer >= 0.29 builds adapters with it on every start


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["version"], ["ablate", "--help"]])
def test_cli_start_up_imports_nothing_heavy(argv):
    heavy = HEAVY + (("rich.table",) if "--help" not in argv else ())  # typer draws help with rich tables
    code = (
        "import sys; from patcher.cli import main; sys.argv = ['patcher', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "LOADED []", p.stdout[-2000:]
    if argv == ["--version"]:
        from patcher import __version__

        assert p.stdout.splitlines()[0] == __version__


def test_version_option_and_command_agree():
    from patcher import __version__

    assert run_cli("--version").output.strip() == __version__ == run_cli("version").output.strip()


def test_headers_open_without_ml_dtypes():
    code = (
        "import sys; from patcher.io.checkpoint import Checkpoint\n"
        f"ck = Checkpoint({str(fixture_path('deepseek_v3'))!r})\n"
        "assert any(t.dtype == 'BF16' for t in ck.tensors.values())\n"
        "print('ml_dtypes' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


def test_copy_modes_write_the_same_bytes(tmp_path, small_chunks):
    """The writer's three ways to copy untouched ranges give the same file and digest."""
    from patcher.io.checkpoint import Checkpoint
    from patcher.io.writer import OutTensor, ShardWriter

    src = fixture_path("mixtral") / "model-00001-of-00002.safetensors"
    ck = Checkpoint(src)
    infos = ck.shard_tensors(src.name)
    edited = infos[1]
    arr = np.asarray(ck.array(edited.name)) * 0  # one produced tensor between copied ones
    tensors = [
        OutTensor(i.name, i.dtype, i.shape, source=i)
        if i is not edited
        else OutTensor(i.name, i.dtype, i.shape, produce=lambda: [arr])
        for i in infos
    ]
    got = {}
    for mode in ("kernel", "range", "read"):
        hashing = mode != "kernel"
        w = ShardWriter(
            tmp_path / mode,
            tensors,
            {"format": "pt"},
            hash_out=hashing,
            input_digest=InputDigest(src) if hashing else None,
            copy=mode,
        )
        try:
            w.produce()
            digest = w.finish()
        finally:
            w.close()
        got[mode] = (tmp_path / mode).read_bytes()
        if hashing:
            assert digest == sha(tmp_path / mode) and w.input_sha == sha(src)
    assert got["kernel"] == got["range"] == got["read"]
    assert got["read"] != src.read_bytes() and len(got["read"]) == src.stat().st_size


ALLOC_CHILD = """
import resource, sys
import numpy as np
from patcher.io.allocator import keep_freed_blocks
on = sys.argv[1] == "on" and keep_freed_blocks()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # what a streamed edit does per matrix: its row blocks (MiBs each) kept, then freed
    blocks = [np.ones(3 << 18, np.float32) for _ in range(16)]
    del blocks
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_row_blocks_are_reused_not_faulted_in_again():
    faults = {}
    for mode in ("off", "on"):
        p = subprocess.run(
            [sys.executable, "-c", ALLOC_CHILD, mode], capture_output=True, text=True, timeout=60
        )
        assert p.returncode == 0, p.stderr
        applied, n = p.stdout.split()
        assert applied == str(mode == "on")
        faults[mode] = int(n)
    per_round = 16 * (3 << 20) // 4096  # pages of one matrix's blocks
    # glibc's default returns the freed heap top to the kernel, so every matrix faults its pages in anew
    assert faults["off"] > 6 * per_round, faults
    assert faults["on"] < 2 * per_round, faults  # the first matrix's pages, then reuse


def test_allocator_tuning_is_skipped_where_there_is_no_glibc(monkeypatch):
    import ctypes

    from patcher.io import allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_blocks() is False
    monkeypatch.setattr(allocator.sys, "platform", "linux")

    def no_libc(*a, **k):
        raise OSError("no C library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert allocator.keep_freed_blocks() is False


# --- patcher/edit/shards.py: shards written at once ------------------------------------------------


def _plan(model_type, direction64):
    return _plan_of(fixture_path(model_type), direction64)


@pytest.mark.parametrize(
    "model_type,window,ncores,spread,copier,most",
    [
        ("mixtral", 2, 2, False, False, 2),  # two at once: each keeps both digests on its reader (cache-hot)
        ("mixtral", 2, 6, True, False, 2),  # cores to spare: each file's output digest gets its own thread
        ("mixtral", 2, 16, True, True, 2),  # and its kernel copy too
        ("mixtral", None, 2, False, False, 2),  # chosen from 2 cores: two at once
        ("mixtral", 1, 2, True, False, 1),  # one at a time: the writer thread takes the output digest
        ("llama-single", 2, 2, True, False, 1),  # a one-file checkpoint runs alone whatever the window
        ("llama-single", None, 4, True, True, 1),  # alone on 4 cores: copy, digests and edit apart
    ],
)
def test_shards_in_flight_and_where_the_digests_run(
    model_type, window, ncores, spread, copier, most, tmp_path, direction64, fresh_cache, monkeypatch
):
    import threading

    from patcher.edit import shards

    monkeypatch.setattr(shards, "cores", lambda: ncores)

    if model_type == "llama-single":
        plan = _plan_of(_single_file(fixture_path("llama"), tmp_path / "single"), direction64)
    else:
        plan = _plan(model_type, direction64)
    seen, alive, lock, gate = [], [0], threading.Lock(), threading.Barrier(2, timeout=2)

    class Spy(writer.ShardWriter):
        def __init__(self, *a, **k):
            seen.append((k["spread_digests"], k["copy_thread"]))
            super().__init__(*a, **k)
            assert (self.to_copier is not None) == copier  # hashing is on: a range copy

        def produce(self):
            with lock:
                alive[0] += 1
                most_seen.append(alive[0])
            try:
                gate.wait()  # two in flight meet here; one alone times out and goes on
            except threading.BrokenBarrierError:
                pass
            super().produce()
            with lock:
                alive[0] -= 1

    most_seen: list[int] = []
    monkeypatch.setattr(shards, "ShardWriter", Spy)
    apply.execute(plan, tmp_path / "out", shards_in_flight=window)
    assert seen and set(seen) == {(spread, copier)}
    assert max(most_seen) == most


@pytest.mark.parametrize(
    "files,jobs,ncores,want",
    [
        (16, None, 1, 2),  # even one core: one shard's I/O waits beside another's math
        (16, None, 2, 2),
        (16, None, 9, 3),  # one per three cores
        (16, None, 16, 4),
        (16, None, 128, 4),  # memory: at most MAX_IN_FLIGHT unless asked
        (16, 8, 2, 8),  # --jobs wins
        (3, None, 16, 3),  # never more than the files
        (1, 5, 16, 1),
    ],
)
def test_shards_in_flight_follow_the_cores(files, jobs, ncores, want):
    from patcher.edit import shards

    assert shards.in_flight(files, jobs, ncores) == want
    assert shards.spread_digests(1, 2) and shards.spread_digests(4, 12) and not shards.spread_digests(2, 5)


def test_cli_jobs_write_the_same_checkpoint(tmp_path, direction64, fresh_cache):
    src = fixture_path("mixtral")
    for jobs in ("1", "4"):
        run_cli("ablate", src, "-d", direction64, "-o", tmp_path / jobs, "--jobs", jobs, "--rehash-inputs")
    a, b = (json.loads((tmp_path / j / manifest.MANIFEST).read_text()) for j in ("1", "4"))
    assert a["outputs"] == b["outputs"] and a["inputs"] == b["inputs"]
    assert a["outputs"] == {p.name: sha(p) for p in (tmp_path / "4").iterdir() if p.name != manifest.MANIFEST}
    r = run_cli("ablate", src, "-d", direction64, "-o", tmp_path / "zero", "--jobs", "0", expect=1)
    assert "--jobs" in r.output and not (tmp_path / "zero").exists()


def _plan_of(folder, direction64):
    from patcher.edit.directions import load_direction
    from patcher.edit.plan import plan_ablation
    from patcher.model.opened import Model

    ck = Model.open(folder)
    return plan_ablation(
        ck,
        load_direction(str(direction64), ck.resolved.d_model),
        layers=None,
        roles=("embed", "attn_out", "mlp_out"),
        scale=1.0,
        preserve=None,
        untie=False,
    )


def test_a_shard_without_format_metadata_gets_pt(tmp_path, direction64):
    from safetensors.numpy import save_file

    src = tmp_path / "src"
    shutil.copytree(fixture_path("llama"), src)
    for f in src.glob("*.safetensors"):  # the same tensors, no __metadata__ at all
        from safetensors.numpy import load_file

        save_file(load_file(f), f)
    run_cli("ablate", src, "-d", direction64, "-o", tmp_path / "out", "--no-hash")
    from safetensors import safe_open

    for f in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(f, "np") as h:
            assert h.metadata()["format"] == "pt" and "patcher" in h.metadata()


def test_no_hash_manifest_lists_every_shard_by_size(tmp_path, direction64):
    out = tmp_path / "out"
    run_cli("ablate", fixture_path("mixtral"), "-d", direction64, "-o", out, "--no-hash")
    m = json.loads((out / manifest.MANIFEST).read_text())
    assert m["outputs"] == {
        p.name: f"size:{p.stat().st_size}" for p in out.iterdir() if p.name != manifest.MANIFEST
    }
    src = fixture_path("mixtral")
    assert m["inputs"] == {p.name: f"size:{p.stat().st_size}" for p in src.iterdir() if p.is_file()}


def test_an_edit_of_the_same_base_again_streams_no_input_digest(
    tmp_path, direction64, fresh_cache, monkeypatch
):
    src = fixture_path("mixtral")
    run_cli("ablate", src, "-d", direction64, "-o", tmp_path / "a")
    made = []
    orig = writer.InputDigest.__init__
    monkeypatch.setattr(writer.InputDigest, "__init__", lambda self, p: made.append(p) or orig(self, p))
    run_cli("ablate", src, "-d", direction64, "-o", tmp_path / "b", "--scale", "0.5")
    assert not made  # the first run remembered every input shard's sha256
    m = json.loads((tmp_path / "b" / manifest.MANIFEST).read_text())
    assert all(m["inputs"][p.name] == sha(p) for p in src.glob("*.safetensors"))


@pytest.mark.parametrize("model_type", SHARDED)
def test_edited_rows_feed_the_input_digest_as_they_are_read(
    model_type, tmp_path, direction64, fresh_cache, monkeypatch
):
    rereads = {}
    orig = writer.InputDigest.finish
    monkeypatch.setattr(
        writer.InputDigest, "finish", lambda self: (orig(self), rereads.setdefault(self.path, self.reread))[0]
    )
    run_cli("ablate", fixture_path(model_type), "-d", direction64, "-o", tmp_path / "out")
    assert rereads
    for path, n in rereads.items():  # read for the digest alone: the header, and 1-D tensors an edit
        with open(path, "rb") as f:  # read through mmap (biases); every matrix byte passed on its way
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        vectors = sum(
            e - b
            for k, v in header.items()
            if k != "__metadata__" and len(v["shape"]) == 1
            for b, e in [v["data_offsets"]]
        )
        assert 8 + size <= n <= 8 + size + vectors, (path.name, n, size, vectors)


def test_an_interrupt_in_one_shard_stops_the_other_and_leaves_nothing(
    tmp_path, direction64, fresh_cache, monkeypatch
):
    import threading
    import time as _time

    from patcher.edit import shards

    started, aborted = threading.Event(), []

    class Slow(writer.ShardWriter):
        def produce(self):
            if self.path.name.startswith("model-00002"):
                started.wait(5)
                raise KeyboardInterrupt
            started.set()
            deadline = _time.perf_counter() + 5
            while not self.errors:  # shard 1 keeps working until it is told to stop
                assert _time.perf_counter() < deadline, "the failed shard did not stop the others"
                _time.sleep(0.01)
            aborted.append(self.path.name)
            self._check()

    monkeypatch.setattr(shards, "ShardWriter", Slow)
    plan = _plan("mixtral", direction64)
    t0 = _time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        apply.execute(plan, tmp_path / "out", shards_in_flight=2)
    assert aborted == ["model-00001-of-00002.safetensors"] and _time.perf_counter() - t0 < 5
    assert not list(tmp_path.iterdir())


def test_a_writer_that_cannot_start_closes_the_input_it_opened(
    tmp_path, direction64, fresh_cache, monkeypatch
):
    from patcher.edit import shards

    closed = []
    orig = writer.InputDigest.close
    monkeypatch.setattr(writer.InputDigest, "close", lambda self: closed.append(self.path) or orig(self))

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "ShardWriter", no_space)
    from patcher.errors import PatcherError

    with pytest.raises(PatcherError, match=r"out: cannot write this output \(No space"):  # names the output
        apply.execute(_plan("mixtral", direction64), tmp_path / "out", shards_in_flight=1)
    assert closed and not list(tmp_path.iterdir())


def test_time_parts_share_the_shard_phase_by_thread_seconds():
    busy = {"read": 1.0, "edit": 2.0, "hash": 4.0, "write": 1.0}  # 8 thread-s in a 4 s shard phase
    parts = apply.time_parts(6.0, 4.0, busy, prepass=0.5, flush=0.25)
    assert parts == pytest.approx({"read": 0.5, "edit": 1.5, "hash": 2.0, "write": 0.75, "other": 1.25})
    assert apply.time_parts(1.0, 0.0, dict.fromkeys(busy, 0.0), 0.0, 0.0)["other"] == 1.0


@pytest.mark.parametrize("hash_files", [True, False])
def test_where_the_time_went_sums_to_the_wall_time(hash_files, tmp_path, direction64, fresh_cache):
    import time as _time

    plan = _plan("mixtral", direction64)
    t0 = _time.perf_counter()
    rep = apply.execute(plan, tmp_path / "out", hash_files=hash_files)
    wall = _time.perf_counter() - t0
    parts = rep.time_parts
    assert set(parts) == {"read", "edit", "hash", "write", "other"} and min(parts.values()) >= 0
    assert sum(parts.values()) == pytest.approx(rep.seconds, rel=1e-6)
    assert rep.seconds <= wall and sum(parts.values()) == pytest.approx(wall, rel=0.1, abs=0.05)
    assert parts["edit"] > 0 and parts["write"] > 0 and rep.threads_busy > 0
    assert (parts["hash"] > 0) == hash_files  # --no-hash: no time in sha256


def test_the_summary_says_where_the_time_went(tmp_path, direction64):
    r = run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", tmp_path / "out")
    line = next(x for x in r.output.splitlines() if "time went to" in x)
    assert all(f" {k} " in line for k in ("read", "edit", "hash", "write")) and "%" in line
