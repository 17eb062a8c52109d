"""`patcher ablate` end to end on every fixture: byte identity of untouched tensors, edited tensors
within 1 bf16 ulp of a float64 reference computed here from the formulas in docs/math.md."""

import json

import ml_dtypes
import numpy as np
import pytest
from conftest import MODEL_TYPES, fixture_path, read_config, run_cli, unit
from patcher_kernels.codecs import ulp_distance

from patcher.io.checkpoint import Checkpoint

# Residual writers per fixture, written out independently of patcher's tables:
# regex of the weight name -> residual axis.
GPT2_WRITERS = {r"transformer\.(wte|wpe)\.weight": 1, r"transformer\.h\.\d+\.(attn|mlp)\.c_proj\.weight": 1}
NEOX_WRITERS = {
    r"gpt_neox\.embed_in\.weight": 1,
    r"gpt_neox\.layers\.\d+\.(attention\.dense|mlp\.dense_4h_to_h)\.weight": 0,
}
DEFAULT_WRITERS = {
    r"model\.embed_tokens\.weight": 1,
    r"model\.layers\.\d+\.self_attn\.o_proj\.weight": 0,
    r"model\.layers\.\d+\.mlp\.(down_proj|shared_experts?\.down_proj|experts\.\d+\.down_proj)"
    r"\.weight": 0,
    r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w2\.weight": 0,
}
POST_NORM = {"gemma2": 1.0, "gemma3_text": 1.0, "olmo2": 0.0}  # g = offset + w


def writers(model_type):
    return {"gpt2": GPT2_WRITERS, "gpt_neox": NEOX_WRITERS}.get(model_type, DEFAULT_WRITERS)


def axis_of(model_type, name):
    import re

    for pat, axis in writers(model_type).items():
        if re.fullmatch(pat, name):
            return axis
    return None


def post_norm_name(model_type, name):
    if model_type not in POST_NORM:
        return None
    if name.endswith("self_attn.o_proj.weight"):
        return name.replace("self_attn.o_proj.weight", "post_attention_layernorm.weight")
    if name.endswith("mlp.down_proj.weight"):
        return name.replace("mlp.down_proj.weight", "post_feedforward_layernorm.weight")
    return None


def f64(ck, name):
    return ck.array(name).astype(np.float64)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ablate_matches_float64_reference(model_type, tmp_path, direction64):
    src = fixture_path(model_type)
    out = tmp_path / "out"
    run_cli("ablate", src, "-d", direction64, "-o", out)
    r = unit(np.load(direction64))
    with Checkpoint(src) as a, Checkpoint(out) as b:
        assert list(a.files) == list(b.files)  # shard names and layout kept
        assert set(b.tensors) == set(a.tensors)
        edited = 0
        for name, _info in a.tensors.items():
            axis = axis_of(model_type, name)
            bias_of = name[: -len(".bias")] + ".weight" if name.endswith(".bias") else None
            bias_axis = axis_of(model_type, bias_of) if bias_of else None
            if axis is None and bias_axis is None:
                assert a.array(name).tobytes() == b.array(name).tobytes(), f"{name} changed"
                continue
            edited += 1
            u = r
            pn = post_norm_name(model_type, bias_of or name)
            if pn:
                g = POST_NORM[model_type] + f64(a, pn)
                u = unit(g * r)
            w = f64(a, name)
            if bias_axis is not None:
                want = w - u * (u @ w)
            elif axis == 0:
                want = w - np.outer(u, u @ w)
            else:
                want = w - np.outer(w @ u, u)
            want = want.astype(ml_dtypes.bfloat16)
            dist = ulp_distance(b.array(name), want, "BF16")
            assert dist.max() <= 1, f"{name}: {dist.max()} ulp from the float64 reference"
        assert edited > 0
    meta = json.loads(Checkpoint(out).files[next(iter(Checkpoint(out).files))].metadata["patcher"])
    assert meta["op"] == "ablate" and meta["direction_sha256"]
    assert Checkpoint(out).files[next(iter(Checkpoint(out).files))].metadata["format"] == "pt"


def test_side_files_copied_and_index_consistent(tmp_path, direction64):
    src = fixture_path("llama")
    out = tmp_path / "out"
    run_cli("ablate", src, "-d", direction64, "-o", out)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with Checkpoint(out) as ck:
        assert index["weight_map"] == {n: ck.shard_of[n] for n in ck.tensors}
        assert index["metadata"]["total_size"] == ck.total_bytes


def test_layers_targets_and_scale(tmp_path, direction64):
    src = fixture_path("llama")
    out = tmp_path / "out"
    run_cli(
        "ablate",
        src,
        "-d",
        direction64,
        "-o",
        out,
        "--layers",
        "1-2",
        "--targets",
        "mlp_out",
        "--scale",
        "0.5",
    )
    r = unit(np.load(direction64))
    with Checkpoint(src) as a, Checkpoint(out) as b:
        changed = {n for n in a.tensors if a.array(n).tobytes() != b.array(n).tobytes()}
        assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
        w = f64(a, "model.layers.1.mlp.down_proj.weight")
        want = (w - 0.5 * np.outer(r, r @ w)).astype(ml_dtypes.bfloat16)
        assert ulp_distance(b.array("model.layers.1.mlp.down_proj.weight"), want, "BF16").max() <= 1


def test_rank_k_direction(tmp_path):
    src = fixture_path("qwen3")
    rng = np.random.default_rng(3)
    v = rng.standard_normal((2, 64))
    np.save(tmp_path / "dirs.npy", v)
    out = tmp_path / "out"
    run_cli("ablate", src, "-d", tmp_path / "dirs.npy", "-o", out)
    with Checkpoint(out) as b:
        w = b.array("model.layers.0.self_attn.o_proj.weight").astype(np.float64)
        orig = Checkpoint(src).array("model.layers.0.self_attn.o_proj.weight").astype(np.float64)
        for row in v:
            assert np.linalg.norm(unit(row) @ w) < 1e-2 * np.linalg.norm(unit(row) @ orig)


def test_dry_run_writes_nothing_and_lists_every_tensor(tmp_path, direction64):
    out = tmp_path / "out"
    res = run_cli("ablate", fixture_path("gpt2"), "-d", direction64, "-o", out, "--dry-run")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.2.mlp.c_proj.bias"):
        assert name in res.output
    assert "W - s (WQ)Qᵀ" in res.output and "b - s Q(Qᵀb)" in res.output


def test_leakage_reported(tmp_path, direction64):
    res = run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", tmp_path / "out")
    line = next(l for l in res.output.splitlines() if l.strip().startswith("leakage"))
    value = float(line.split("|QᵀW|")[1].split()[0])
    assert 1e-4 < value < 3e-2  # bf16 rounding leaves ~1e-2 of the original component, never 0


def test_untie_embeddings(tmp_path, direction64):
    src = fixture_path("gemma")
    out = tmp_path / "out"
    run_cli("ablate", src, "-d", direction64, "-o", out, "--untie-embeddings")
    assert read_config(out)["tie_word_embeddings"] is False
    with Checkpoint(src) as a, Checkpoint(out) as b:
        assert b.array("lm_head.weight").tobytes() == a.array("model.embed_tokens.weight").tobytes()
        assert (
            b.array("model.embed_tokens.weight").tobytes() != a.array("model.embed_tokens.weight").tobytes()
        )
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["lm_head.weight"] == b.shard_of["lm_head.weight"]


@pytest.mark.parametrize("mode,axis", [("cols", 0), ("rows", 0)])
def test_norm_preserve_cli(tmp_path, direction64, mode, axis):
    src = fixture_path("llama")
    out = tmp_path / "out"
    run_cli("ablate", src, "-d", direction64, "-o", out, "--norm-preserve", mode, "--targets", "attn_out")
    name = "model.layers.0.self_attn.o_proj.weight"
    with Checkpoint(src) as a, Checkpoint(out) as b:
        w, w2 = f64(a, name), f64(b, name)
        norm_axis = 0 if mode == "cols" else 1
        np.testing.assert_allclose(
            np.linalg.norm(w2, axis=norm_axis), np.linalg.norm(w, axis=norm_axis), rtol=1e-2
        )


def test_existing_output_refused_then_forced(tmp_path, direction64):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", out, expect=1)
    assert "already exists" in res.output and (out / "keep.txt").exists()
    # --force replaces only a previous patcher output: a user's folder is refused (issue 9)
    res = run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", out, "--force", expect=1)
    assert "has no patcher-manifest.json" in res.output and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", out)  # empty: allowed
    (out / "extra.txt").write_text("x")  # a previous patcher output, with something the user added
    res = run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", out, "--force", expect=1)
    assert "does not list" in res.output and "extra.txt" in res.output  # issue 22, item 3: named, kept
    assert (out / "extra.txt").read_text() == "x"
    (out / "extra.txt").unlink()
    run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", out, "--force")
    assert (out / "config.json").exists()


def test_directions_file_with_layer(tmp_path):
    from patcher.edit.directions import save_directions

    rng = np.random.default_rng(5)
    table = rng.standard_normal((4, 64)).astype(np.float32)
    save_directions(tmp_path / "d.safetensors", table, table, 0 * table, {"selected_layer": 2})
    for spec, row in ((f"{tmp_path}/d.safetensors", 2), (f"{tmp_path}/d.safetensors:1", 1)):
        out = tmp_path / f"out{row}"
        run_cli("ablate", fixture_path("llama"), "-d", spec, "-o", out, "--targets", "embed")
        with Checkpoint(out) as b:
            emb = f64(b, "model.embed_tokens.weight")
            assert np.abs(emb @ unit(table[row])).max() < 2e-2
    res = run_cli(
        "ablate", fixture_path("llama"), "-d", f"{tmp_path}/d.safetensors:9", "-o", tmp_path / "x", expect=1
    )
    assert "out of range" in res.output


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_write_leaves_no_output(tmp_path, direction64, sig, monkeypatch):
    """A run stopped while writing removes its partial folder and leaves the input untouched."""
    import hashlib
    import signal
    import subprocess
    import sys
    import time

    src = fixture_path("mixtral")
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}  # noqa: E731
    before = digest()
    out = tmp_path / "out"
    code = (
        "import time, patcher.io.writer as w\n"
        "orig = w._write_produced\n"
        "def slow(*a):\n    time.sleep(0.2); return orig(*a)\n"
        "w._write_produced = slow\n"
        "import sys; from patcher.cli import main; sys.argv = ['patcher'] + sys.argv[1:]; main()\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, "ablate", str(src), "-d", str(direction64), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 20
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        time.sleep(0.02)
    assert list(tmp_path.glob(".out.partial-*")), "the run never started writing"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "interrupted" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert digest() == before
    run_cli("ablate", src, "-d", direction64, "-o", out)  # a re-run succeeds
    assert (out / "config.json").exists()
