"""Models where users keep them: a Hugging Face hub cache built here with the real layout (blobs named
by sha256, snapshot files that are symlinks to ../../blobs/<sha256>, refs/main), HF_HUB_CACHE pointed at
it. inspect, extract, ablate, export and diff must give the same results by snapshot folder, by repo id
and by repo id @revision as from the plain fixture folder; outputs are real files; nothing is written
into the cache; a repo id that is not cached is one line."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO, fixture_path, run_cli

from patcher.io.checkpoint import Checkpoint

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
POS = DEMO / "positive.txt"
NEG = DEMO / "negative.txt"


def make_hub_cache(cache: Path, repo: str, src: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """What `hf download` leaves: models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/<branch>}; returns the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    return snap


def tree_digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    snap = make_hub_cache(cache, REPO, fixture_path("llama"))
    old = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(cache)
    before = tree_digest(cache)
    yield {"cache": cache, "snapshot": snap}
    assert tree_digest(cache) == before, "something was written into the hub cache"
    assert all(p.is_symlink() for p in snap.iterdir())
    if old is None:
        os.environ.pop("HF_HUB_CACHE")
    else:
        os.environ["HF_HUB_CACHE"] = old


def sources(hub) -> dict:
    return {
        "snapshot": hub["snapshot"],
        "repo": REPO,
        "revision": f"{REPO}@main",
        "commit": f"{REPO}@{COMMIT}",
    }


WAYS = ["snapshot", "repo", "revision", "commit"]


@pytest.mark.parametrize("way", WAYS)
def test_inspect(hub, way):
    want = json.loads(run_cli("inspect", fixture_path("llama"), "--json").stdout)
    got = json.loads(run_cli("inspect", sources(hub)[way], "--json").stdout)
    assert got["path"] == str(hub["snapshot"])
    for k in ("path",):
        want.pop(k), got.pop(k)
    assert got == want


@pytest.mark.parametrize("way", WAYS)
def test_ablate_writes_real_files_equal_to_the_folder_run(hub, way, tmp_path, direction64):
    run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", tmp_path / "plain", "--no-hash")
    run_cli("ablate", sources(hub)[way], "-d", direction64, "-o", tmp_path / "hub", "--no-hash")
    files = sorted(p.name for p in (tmp_path / "hub").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert not any(p.is_symlink() for p in (tmp_path / "hub").iterdir())
    for name in files:
        if name != "patcher-manifest.json":  # it names the input path
            assert (tmp_path / "hub" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


@pytest.mark.parametrize("way", WAYS)
def test_extract(hub, way, tmp_path):
    args = ["--positive", POS, "--negative", NEG, "--no-chat-template", "--max-prompts", "8"]
    run_cli("extract", fixture_path("llama"), *args, "-o", tmp_path / "plain.safetensors")
    run_cli("extract", sources(hub)[way], *args, "-o", tmp_path / "hub.safetensors")
    with Checkpoint(tmp_path / "plain.safetensors") as a, Checkpoint(tmp_path / "hub.safetensors") as b:
        assert set(a.tensors) == set(b.tensors) == {"direction", "positive_mean", "negative_mean"}
        for name in a.tensors:
            assert np.array_equal(a.array(name), b.array(name)), name
            assert np.abs(a.array(name)).max() > 0


@pytest.mark.parametrize("way", ["snapshot", "revision"])
def test_export(hub, way, tmp_path):
    run_cli("export", fixture_path("llama"), "-o", tmp_path / "plain")
    run_cli("export", sources(hub)[way], "-o", tmp_path / "hub")
    a, b = tree_digest(tmp_path / "plain"), tree_digest(tmp_path / "hub")
    assert set(a) == set(b)
    for name in ("onnx/model.onnx", "onnx/model.onnx_data", "config.json", "tokenizer.json"):
        assert a[name] == b[name], name
    assert not any(p.is_symlink() for p in (tmp_path / "hub").rglob("*"))


@pytest.mark.parametrize("way", WAYS)
def test_diff(hub, way, tmp_path, direction64):
    out = tmp_path / "ablated"
    run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", out, "--no-hash")
    want = json.loads(
        run_cli("diff", fixture_path("llama"), out, "--json", "-d", direction64, expect=1).stdout
    )
    got = json.loads(run_cli("diff", sources(hub)[way], out, "--json", "-d", direction64, expect=1).stdout)
    assert got["base"] == str(hub["snapshot"])
    assert (
        got["verdict"]
        == want["verdict"]
        == ("rank-1 directional ablation along one shared direction (7 tensors)")
    )
    assert got["direction_cosine"] == pytest.approx(want["direction_cosine"], abs=1e-12)
    assert got["direction_cosine"] > 0.999
    assert [t["name"] for t in got["tensors"]] == [t["name"] for t in want["tensors"]]
    # and as the candidate: a snapshot compared with itself is unchanged
    same = json.loads(run_cli("diff", fixture_path("llama"), sources(hub)[way], "--json", expect=0).stdout)
    assert same["verdict"] == "unchanged"


def test_recipe_path_may_be_a_repo_id(hub, tmp_path, direction64):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[[model]]\npath = "{REPO}@main"\noutput = "out"\n\n'
        f'[[step]]\nop = "ablate"\ndirection = "{direction64}"\n'
    )
    run_cli("run", recipe)
    run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", tmp_path / "plain", "--no-hash")
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        a = Checkpoint(tmp_path / "out" / "01-ablated" / shard)
        b = Checkpoint(tmp_path / "plain" / shard)
        assert all(np.array_equal(a.array(n), b.array(n)) for n in a.tensors)


def test_output_inside_the_cache_is_refused(hub, tmp_path, direction64):
    blobs = hub["snapshot"].parent.parent / "blobs"
    for target in (blobs / "x", hub["snapshot"] / "x", hub["cache"]):
        line = one_line(run_cli("ablate", REPO, "-d", direction64, "-o", target, expect=1))
        assert line.startswith(f"error: {target}: output ") and "input" in line
    shard = hub["snapshot"] / "model-00001-of-00002.safetensors"  # a symlink onto a blob
    for target in (blobs / "d.safetensors", hub["snapshot"] / "d.safetensors", shard):
        args = ("extract", REPO, "--positive", POS, "--negative", NEG, "-o", target, "--force")
        line = one_line(run_cli(*args, expect=1))
        assert line.startswith(f"error: {target}: output lies inside the input folder "), line
    assert not (blobs / "x").exists() and not (hub["snapshot"] / "x").exists()


@pytest.mark.parametrize("command", ["diff", "audit"])
def test_report_files_of_a_repo_id_may_not_land_in_its_cache(hub, tmp_path, command):
    blobs = hub["snapshot"].parent.parent / "blobs"
    models = [fixture_path("llama"), REPO] if command == "diff" else [REPO]
    for target in (blobs / "r.npy", hub["snapshot"] / "r.npy", hub["snapshot"].parent / "r.npy"):
        line = one_line(run_cli(command, *models, "--save-direction", target, "--force", expect=2))
        assert line.startswith("error: --save-direction: ") and "inside" in line, line
        assert not target.exists()


def one_line(res) -> str:
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.mark.parametrize("repo", ["tiny-org/not-cached", f"{REPO}@no-such-branch"])
def test_repo_id_not_in_the_cache_is_one_line(hub, repo, tmp_path, direction64):
    for args in (
        ("inspect", repo),
        ("ablate", repo, "-d", direction64, "-o", tmp_path / "o"),
        ("extract", repo, "--positive", POS, "--negative", NEG, "-o", tmp_path / "d.safetensors"),
        ("export", repo, "-o", tmp_path / "e"),
    ):
        res = run_cli(*args, expect=1)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1, res.output
        assert lines[0].startswith(
            f"error: {repo}: no such file or folder, and not in the Hugging Face cache {hub['cache']}"
        )
        assert "never downloads" in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_weight_map_names_still_may_not_escape(tmp_path):
    """Symlinks are accepted; `..`, absolute names and subfolders in weight_map still are not."""
    from patcher.errors import CheckpointError

    snap = make_hub_cache(tmp_path / "hub", REPO, fixture_path("llama"))
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for bad in ("../../blobs/x.safetensors", "/etc/x.safetensors", "sub/x.safetensors"):
        index["weight_map"][first] = bad
        (snap / "model.safetensors.index.json").unlink()
        (snap / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError) as e:
            Checkpoint(snap)
        assert repr(bad) in str(e.value)
