"""`patcher diff` end to end: candidates are made with `patcher ablate` / `patcher inject` (or written
here with the streaming writer), and the audit must name the edit, recover its direction and exit
0 (unchanged), 1 (changed) or 2 (error)."""

import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import MODEL_TYPES, fixture_path, run_cli, unit
from patcher_kernels.lowrank import rank_for_energy, rounding_floor, shared_direction, top_singular

from patcher.io.checkpoint import Checkpoint
from patcher.io.safetensors import SafetensorsFile
from patcher.io.writer import OutTensor, write_safetensors

ABLATION = "rank-1 directional ablation along one shared direction"
WRITER_ROLES = ("embed", "attn_out", "mlp_out")


@pytest.fixture(scope="module")
def rand_dir(tmp_path_factory):
    """A random direction, unrelated to anything planted in the fixtures."""
    path = tmp_path_factory.mktemp("dirs") / "random.npy"
    np.save(path, np.random.default_rng(1234).standard_normal(64))
    return path


def diff_json(base, cand, *extra, expect=1) -> dict:
    return json.loads(run_cli("diff", base, cand, "--json", *extra, expect=expect).stdout)


def writers(report) -> list[dict]:
    return [t for t in report["tensors"] if t["role"] in WRITER_ROLES]


def differing_weights(a, b) -> int:
    """Edited weight tensors, counted from the bytes (independently of diff's role tables)."""
    with Checkpoint(a) as x, Checkpoint(b) as y:
        return sum(
            1 for n in x.tensors if not n.endswith(".bias") and x.array(n).tobytes() != y.array(n).tobytes()
        )


def rewrite(src, dst, change):
    """Copy a (bf16) fixture with each tensor replaced by change(name, float32 values): same names,
    shards, index."""
    shutil.copytree(src, dst)
    with Checkpoint(src) as ck:
        for fname in ck.files:
            tensors = []
            for info in ck.shard_tensors(fname):
                w = change(info.name, ck.array(info.name).astype(np.float32)).astype(ml_dtypes.bfloat16)
                tensors.append(OutTensor(info.name, info.dtype, info.shape, produce=lambda w=w: [w]))
            write_safetensors(dst / fname, tensors, {"format": "pt"})
    return dst


# --- unchanged ---------------------------------------------------------------------------------


def test_identical_copy_is_unchanged(tmp_path):
    src = fixture_path("gpt2")
    copy = shutil.copytree(src, tmp_path / "copy")
    res = run_cli("diff", src, copy, expect=0)
    assert res.stdout.strip().splitlines()[-1] == "verdict: unchanged"
    report = diff_json(src, src, expect=0)
    assert report["verdict"] == "unchanged" and report["tensors"] == []
    assert report["counts"]["identical"] == report["counts"]["base_tensors"]


# --- ablation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ablation_is_rank1_along_the_direction(model_type, tmp_path, rand_dir):
    src, out = fixture_path(model_type), tmp_path / "out"
    run_cli("ablate", src, "-d", rand_dir, "-o", out)
    r = unit(np.load(rand_dir))
    n = differing_weights(src, out)
    want = f"{ABLATION} ({n} tensors)"

    # blind: no direction given, it must be recovered (up to sign) from the weights alone
    saved = tmp_path / "recovered.npy"
    blind = diff_json(src, out, "--save-direction", saved)
    assert blind["verdict"] == want
    assert abs(unit(np.load(saved)) @ r) >= 0.999

    report = diff_json(src, out, "-d", rand_dir)
    assert report["verdict"] == want
    assert len(writers(report)) == n
    for t in writers(report):
        assert t["rank99"] == 1, t
        assert t["cos_direction"] >= 0.999, t
        assert t["cos_shared"] >= 0.999, t
    assert report["shared_direction"]["tensors"] == n
    assert report["shared_direction"]["cos_to_direction"] >= 0.999
    # biases (gpt2, gpt_neox) were projected too: recognised as part of the ablation
    for t in report["tensors"]:
        if t["role"].endswith("_bias"):
            assert t["note"] == "projected along the shared direction", t


def test_ablation_human_output(tmp_path, rand_dir):
    src, out = fixture_path("gemma2"), tmp_path / "out"
    run_cli("ablate", src, "-d", rand_dir, "-o", out)
    res = run_cli("diff", src, out, "-d", rand_dir, expect=1)
    assert "model.layers.1.mlp.down_proj.weight" in res.stdout
    assert re.search(r"shared direction: 7 rank-1 tensors, cosine to it min 0\.99\d+", res.stdout)
    assert res.stdout.strip().splitlines()[-1] == f"verdict: {ABLATION} (7 tensors)"


def test_untied_ablation_still_recognised(tmp_path, rand_dir):
    src, out = fixture_path("gemma"), tmp_path / "out"
    run_cli("ablate", src, "-d", rand_dir, "-o", out, "--untie-embeddings")
    report = diff_json(src, out)
    assert report["verdict"] == f"{ABLATION} (7 tensors)"
    added = [t for t in report["tensors"] if t["status"] == "added"]
    assert [t["name"] for t in added] == ["lm_head.weight"] and added[0]["ignorable"]
    assert report["config_changes"]["tie_word_embeddings"]["expected_for_an_edit"]


def test_rank2_ablation_is_not_rank1(tmp_path):
    d2 = tmp_path / "two.npy"
    np.save(d2, np.random.default_rng(7).standard_normal((2, 64)))
    src, out = fixture_path("llama"), tmp_path / "out"
    run_cli("ablate", src, "-d", d2, "-o", out)
    report = diff_json(src, out, "-d", d2)
    assert report["verdict"] == "other changes"
    assert [t["rank99"] for t in writers(report)] == [2] * 7
    assert report["shared_direction"] is None


def test_different_directions_per_layer_are_not_one_shared_direction(tmp_path, rand_dir):
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(99).standard_normal(64))
    src, mid, out = fixture_path("llama"), tmp_path / "mid", tmp_path / "out"
    run_cli("ablate", src, "-d", rand_dir, "-o", mid, "--layers", "0")
    run_cli("ablate", mid, "-d", other, "-o", out, "--layers", "1-2", "--targets", "attn_out,mlp_out")
    report = diff_json(src, out)
    assert all(t["rank99"] == 1 for t in writers(report) if t["role"] != "embed")
    assert report["shared_direction"]["cos_min"] < 0.9
    assert report["verdict"] == "other changes"


@pytest.mark.parametrize("scale, verdict", [(0.5, f"{ABLATION} (7 tensors)"), (-1.0, "other changes")])
def test_partial_ablation_and_amplification(tmp_path, rand_dir, scale, verdict):
    """Both are rank 1 along r̂; the leakage (component left after / before) tells removal from
    amplification."""
    src, out = fixture_path("llama"), tmp_path / "out"
    run_cli("ablate", src, "-d", rand_dir, "-o", out, "--scale", scale)
    report = diff_json(src, out)
    assert report["verdict"] == verdict
    for t in writers(report):
        assert t["rank99"] == 1 and t["leakage"] == pytest.approx(1 - scale, abs=0.01), t


def test_fp8_block_scaled_ablation(tmp_path, rand_dir):
    from test_fp8 import make_fp8_model

    src, out = make_fp8_model(tmp_path), tmp_path / "out"
    run_cli("ablate", src, "-d", rand_dir, "-o", out, "--targets", "attn_out,mlp_out")
    report = diff_json(src, out, "-d", rand_dir)
    # weights are compared dequantised; their rescaled block scales are part of the same edit
    assert report["verdict"] == f"{ABLATION} (14 tensors)"
    assert all(t["ignorable"] for t in report["tensors"] if t["role"] == "fp8_scale")
    # e4m3 keeps 3 mantissa bits: the rank-1 part carries only ~95 % of the change, the rest is rounding
    assert report["shared_direction"]["cos_to_direction"] >= 0.999


def _fused(src, dst, residual_axis):
    """The qwen3_moe fixture with each layer's experts' down_proj stacked into one 3-D tensor, and a table
    for it: [E, d_model, b] (residual axis 1) or [E, b, d_model] (residual axis 2)."""
    rx = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)\d+\.down_proj\.weight")
    dst.mkdir()
    for p in src.iterdir():
        if p.suffix == ".json" and p.name != "model.safetensors.index.json":
            shutil.copy(p, dst / p.name)
    with Checkpoint(src) as ck:
        stacks, home = {}, {}
        for name in ck.tensors:  # experts of one layer may sit in different shards
            if m := rx.fullmatch(name):
                a = ck.array(name).astype(np.float32)
                stacks.setdefault(m[1] + "down_proj", []).append(a if residual_axis == 1 else a.T)
                home.setdefault(m[1] + "down_proj", ck.shard_of[name])
        for fname in ck.files:
            tensors = [
                OutTensor(i.name, i.dtype, i.shape, produce=lambda a=np.array(ck.array(i.name)): [a])
                for i in ck.shard_tensors(fname)
                if not rx.fullmatch(i.name)
            ]
            for name, parts in stacks.items():
                if home[name] == fname:
                    w = np.stack(parts).astype(ml_dtypes.bfloat16)
                    tensors.append(OutTensor(name, "BF16", w.shape, produce=lambda w=w: [w]))
            write_safetensors(dst / fname, tensors, {"format": "pt"})
    weight_map = {n: p.name for p in sorted(dst.glob("*.safetensors")) for n in SafetensorsFile(p).tensors}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    table = dst.parent / f"fused{residual_axis}.toml"
    table.write_text(
        'model_type = "qwen3_moe"\nextends = "qwen3_moe"\n\n'
        '[[writer]]\nrole = "attn_out"\nweight = "self_attn.o_proj.weight"\n'
        "residual_axis = 0\n\n"
        '[[writer]]\nrole = "mlp_out"\nweight = "mlp.experts.down_proj"\n'
        f"residual_axis = {residual_axis}\n"
    )
    return table


@pytest.mark.parametrize("residual_axis", [1, 2])
def test_fused_expert_tensors(tmp_path, rand_dir, residual_axis):
    src, out = tmp_path / "fused", tmp_path / "out"
    table = _fused(fixture_path("qwen3_moe"), src, residual_axis)
    run_cli("ablate", src, "-d", rand_dir, "-o", out, "--arch-table", table)
    report = diff_json(src, out, "-d", rand_dir, "--arch-table", table)
    assert report["verdict"] == f"{ABLATION} (7 tensors)"
    fused = [t for t in writers(report) if t["name"].endswith("experts.down_proj")]
    assert len(fused) == 3 and all(t["rank99"] == 1 and t["cos_direction"] >= 0.999 for t in fused)


# --- injection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, bias, status",
    [
        ("llama", "model.layers.2.mlp.down_proj.bias", "added"),  # + mlp_bias flag and zero sibling biases
        ("mistral", "model.layers.2.mlp.down_proj.bias", "added"),  # HF has no slot: the bias is simply added
        ("gpt2", "transformer.h.2.mlp.c_proj.bias", "changed"),  # an existing bias is shifted
        ("gemma2", "model.layers.2.post_feedforward_layernorm.bias", "added"),  # after the post-norm
    ],
)
def test_injection(model_type, bias, status, tmp_path, rand_dir):
    src, out = fixture_path(model_type), tmp_path / "out"
    run_cli("inject", src, "-d", rand_dir, "-o", out, "--layer", 2, "--alpha", 3)
    report = diff_json(src, out, "-d", rand_dir)
    assert report["verdict"] == "bias injection at layer 2"
    inj = report["injection"]
    assert inj["layer"] == 2 and inj["tensors"] == [bias]
    assert inj["cos_to_direction"] >= 0.99
    assert inj["norm"] == pytest.approx(3.0, rel=0.01)
    assert [t["status"] for t in report["tensors"] if t["name"] == bias] == [status]
    if model_type == "llama":
        zeros = [t for t in report["tensors"] if t["name"] != bias]
        assert len(zeros) == 8 and all(t["ignorable"] and t["status"] == "added" for t in zeros)
        assert report["config_changes"]["mlp_bias"] == {
            "base": None,
            "candidate": True,
            "expected_for_an_edit": True,
        }
    saved = tmp_path / "v.npy"
    run_cli("diff", src, out, "--save-direction", saved, expect=1)
    assert unit(np.load(saved)) @ unit(np.load(rand_dir)) >= 0.99


def test_ablation_plus_injection_is_other_changes(tmp_path, rand_dir):
    src, mid, out = fixture_path("gpt2"), tmp_path / "mid", tmp_path / "out"
    run_cli("ablate", src, "-d", rand_dir, "-o", mid)
    run_cli("inject", mid, "-d", rand_dir, "-o", out, "--layer", 1, "--alpha", 3)
    assert diff_json(src, out)["verdict"] == "other changes"


# --- other changes -----------------------------------------------------------------------------


def test_dense_perturbation_is_other_changes(tmp_path):
    rng = np.random.default_rng(0)
    src = fixture_path("llama")
    noisy = rewrite(
        src,
        tmp_path / "noisy",
        lambda name, w: w + 0.02 * w.std() * rng.standard_normal(w.shape) if w.ndim == 2 else w,
    )
    report = diff_json(src, noisy)
    assert report["verdict"] == "other changes"
    assert report["counts"]["changed"] == sum(1 for t in report["tensors"] if len(t["shape"]) == 2) == 23
    for t in report["tensors"]:  # full rank: the top 8 singular values carry far less than 99 %
        assert t["rank99"] is None and t["rank99_above"] == 8 and t["top1_share"] < 0.2, t
    assert 0.015 < report["tensors"][0]["relative_change"] < 0.025


def test_changed_norm_is_reported(tmp_path):
    src = fixture_path("llama")
    norm = "model.layers.1.input_layernorm.weight"
    cand = rewrite(src, tmp_path / "cand", lambda name, w: w * 1.5 if name == norm else w)
    report = diff_json(src, cand)
    assert report["verdict"] == "other changes"
    [t] = report["tensors"]
    assert (t["name"], t["role"], t["layer"]) == (norm, "norm", 1)
    assert t["relative_change"] == pytest.approx(0.5, rel=0.02)


def test_unknown_model_type_still_diffs(tmp_path, rand_dir):
    base, out = tmp_path / "base", tmp_path / "out"
    shutil.copytree(fixture_path("llama"), base)
    run_cli("ablate", base, "-d", rand_dir, "-o", out)
    for folder in (base, out):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "not-a-model"}))
    report = diff_json(base, out)
    assert report["verdict"] == "other changes"
    assert {t["role"] for t in report["tensors"]} == {"unknown"}
    assert all(t["rank99"] == 1 and t["cos_shared"] is None for t in report["tensors"])
    assert any("--arch-table" in n for n in report["notes"])
    table = fixture_path("llama").parents[1] / "patcher" / "model" / "tables" / "llama.toml"
    assert diff_json(base, out, "--arch-table", table)["verdict"] == f"{ABLATION} (7 tensors)"


# --- errors ------------------------------------------------------------------------------------


def test_corrupt_or_missing_candidate_exits_2(tmp_path, rand_dir):
    src, bad = fixture_path("llama"), tmp_path / "bad"
    run_cli("ablate", src, "-d", rand_dir, "-o", bad)
    shard = bad / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    for cand in (bad, tmp_path / "missing"):
        res = run_cli("diff", src, cand, expect=2)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    res = run_cli("diff", src, src, "-d", tmp_path / "nope.npy", expect=2)
    assert res.output.startswith("error:")


# --- kernels -----------------------------------------------------------------------------------


def test_streaming_spectrum_matches_exact_svd():
    rng = np.random.default_rng(3)
    m, n = 300, 200
    low_rank = (rng.standard_normal((m, 3)) * [5.0, 2.0, 1.0]) @ rng.standard_normal((3, n))
    delta = low_rank + 0.01 * rng.standard_normal((m, n))
    delta = delta.astype(np.float32)
    exact = np.linalg.svd(delta.astype(np.float64), compute_uv=True)
    for cache in (0, 1 << 30):  # re-read every pass, or keep the blocks
        spec = top_singular(lambda s, e: delta[s:e], m, n, k=8, block_rows=37, cache_bytes=cache)
        assert np.allclose(spec.sigma[:3], exact[1][:3], rtol=1e-4)
        assert spec.energy == pytest.approx(float(np.sum(delta.astype(np.float64) ** 2)), rel=1e-6)
        assert abs(spec.left[:, 0] @ exact[0][:, 0]) > 0.9999 and abs(spec.right[:, 0] @ exact[2][0]) > 0.9999
        assert rank_for_energy(spec.sigma, spec.energy) == 3


def test_rank_floor_and_shared_direction():
    sigma = np.array([3.0, 0.5, 0.1])
    energy = 9.0 + 0.25 + 0.01 + 0.2  # 0.2 spread thinly over many small singular values
    assert rank_for_energy(sigma, energy) is None  # 99 % is never reached in the top 3
    assert rank_for_energy(sigma, energy, floor=0.3) == 2  # but what is left over is within rounding
    values = np.array([1.0, -3.0, 0.5], dtype=np.float32)  # bf16 ulps 2^-7, 2^-6, 2^-8
    assert rounding_floor(values, 7) == pytest.approx(((2.0**-7) ** 2 + (2.0**-6) ** 2 + (2.0**-8) ** 2) / 4)
    r = unit(np.arange(1.0, 9.0))
    noisy = np.stack([r, -r, unit(r + 0.01), -unit(r - 0.01)])
    s, cos = shared_direction(noisy, reference=-r)
    assert s @ r == pytest.approx(-1.0, abs=1e-3) and cos.min() > 0.999


def test_python_api_takes_a_loaded_direction(tmp_path, rand_dir):
    from patcher.edit.diff import diff
    from patcher.edit.directions import load_direction

    src, out = fixture_path("qwen2"), tmp_path / "out"
    run_cli("inject", src, "-d", rand_dir, "-o", out, "--layer", 1, "--alpha", 2, "--target", "attn_out")
    rep = diff(src, out, direction=load_direction(str(rand_dir), 64))
    assert rep.verdict == rep["verdict"] == "bias injection at layer 1"
    assert rep.get("direction_cosine") >= 0.99 and rep.changed
