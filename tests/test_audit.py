"""`patcher audit`: an edit found in the fork alone. Clean random models of every architecture (many
seeds) must pass; every ablation patcher makes must be found, with its direction; evasions are measured
and their outcome asserted (docs/audit.md quotes these numbers)."""

import json
import shutil
import sys

import numpy as np
import pytest
from conftest import FIXTURES, MODEL_TYPES, ROOT, fixture_path, run_cli, unit
from patcher_kernels.codecs import decode, encode

from patcher.edit.audit import audit
from patcher.io.checkpoint import Checkpoint
from patcher.io.writer import OutTensor, write_safetensors
from patcher.model.architectures import for_model_type, resolve

sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures

D = 64
R1 = unit(np.load(FIXTURES / "direction-64.npy"))


def ablated(tmp_path, model_type, *args, d=None, name="ablated"):
    out = tmp_path / name
    d_path = FIXTURES / "direction-64.npy" if d is None else d
    run_cli(
        "ablate",
        fixture_path(model_type) if not isinstance(model_type, type(tmp_path)) else model_type,
        "-d",
        d_path,
        "-o",
        out,
        "--no-hash",
        *args,
    )
    return out


def rewrite(src, dst, transform):
    """Copy a checkpoint with every residual writer passed through transform(weight f64, target)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "patcher-*"))
    with Checkpoint(src) as ck:
        res = resolve(for_model_type(ck.model_type, src), ck.tensors, ck.config, src)
        targets = {t.weight: t for t in res.targets}
        arrays = {}
        for name, info in ck.tensors.items():
            a = ck.array(name)
            if name in targets:
                a = encode(
                    transform(decode(a).astype(np.float64), targets[name]).astype(np.float32), info.dtype
                )
            arrays[name] = (info.dtype, np.array(a))
    write_safetensors(
        dst / "model.safetensors",
        [OutTensor(n, dt, a.shape, produce=lambda a=a: [a]) for n, (dt, a) in arrays.items()],
        {"format": "pt"},
    )
    return dst


def cos(a, b):
    return abs(float(unit(a) @ unit(b)))


# --- clean models --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_clean_fixture_of_every_architecture_passes(model_type):
    rep = audit(fixture_path(model_type))
    assert not rep.edited, rep.verdict
    assert rep.verdict.startswith("no sign of an edit")


def test_false_positive_rate_over_many_seeds(tmp_path):
    """30 clean random models (llama, qwen2, gemma2 post-norm, qwen2_moe, gpt2 with biases; 6 seeds each)."""
    flagged = []
    for model_type in ("llama", "qwen2", "gemma2", "qwen2_moe", "gpt2"):
        for seed in range(1, 7):
            folder = make_fixtures.make(model_type, tmp_path, seed=seed, name=f"{model_type}-{seed}")
            rep = audit(folder)
            if rep.edited:
                flagged.append((model_type, seed, rep.verdict))
            shutil.rmtree(folder)
    assert flagged == []


# --- every ablation patcher makes ------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_default_ablation_is_found_with_its_direction(tmp_path, model_type):
    rep = audit(ablated(tmp_path, model_type))
    assert rep.edited and "directional ablation" in rep.verdict, rep.verdict
    assert cos(rep.direction, R1) >= 0.99
    assert rep.level == "abliterated" and rep.directions[0]["groups_at_floor"] >= 3


def test_cli_exit_codes_json_direction_and_plot(tmp_path):
    out = ablated(tmp_path, "llama")
    r = run_cli("audit", fixture_path("llama"), expect=0)
    assert "no sign of an edit" in r.output
    r = run_cli(
        "audit", out, "--json", "--save-direction", tmp_path / "r.npy", "--plot", tmp_path / "s.svg", expect=1
    )
    data = json.loads(r.output[r.output.index("{") :])
    assert data["edited"] and data["directions"][0]["groups_annihilating"] == 7
    assert cos(np.load(tmp_path / "r.npy"), R1) >= 0.99
    svg = (tmp_path / "s.svg").read_text()
    assert svg.startswith("<svg") and "recovered direction" in svg
    import xml.dom.minidom

    xml.dom.minidom.parseString(svg)  # valid XML


def test_cli_errors_exit_2_and_never_write_inside_the_model(tmp_path):
    r = run_cli("audit", tmp_path / "missing", expect=2)
    assert "no such file or folder" in r.output
    model = tmp_path / "m"
    shutil.copytree(fixture_path("llama"), model)
    r = run_cli("audit", model, "--plot", model / "s.svg", expect=2)
    assert f"is inside the model {model}" in r.output and not (model / "s.svg").exists()
    r = run_cli("audit", model, "--plot", tmp_path / "s.png", expect=2)
    assert "must end in .svg" in r.output
    r = run_cli("audit", model, "--save-direction", "", expect=2)  # an unset shell variable
    assert "--save-direction is empty (an unset shell variable?)" in r.output


def test_rank_two_subspace_is_recovered(tmp_path):
    rng = np.random.default_rng(5)
    two = np.stack([R1, unit(rng.normal(size=D))]).astype(np.float32)
    np.save(tmp_path / "two.npy", two)
    rep = audit(ablated(tmp_path, "llama", d=tmp_path / "two.npy"))
    assert len(rep.directions) == 2 and "rank-2" in rep.verdict
    q, _ = np.linalg.qr(two.T.astype(np.float64))
    found = np.asarray(rep.direction).T
    # principal angles between the recovered and the ablated plane
    assert np.linalg.svd(q.T @ found, compute_uv=False).min() >= 0.99


@pytest.mark.parametrize(
    "args, lowest",
    [
        (("--scale", "0.9"), 0.8),
        (("--scale", "0.8"), 0.7),
        (("--layers", "1-2"), 0.9),
        (("--targets", "mlp_out"), 0.9),
        (("--norm-preserve", "cols"), 0.9),
        (("--norm-preserve", "rows"), 0.9),
    ],
)
def test_partial_and_norm_preserving_ablations_are_found(tmp_path, args, lowest):
    rep = audit(ablated(tmp_path, "llama", *args))
    assert rep.edited and rep.directions, rep.verdict
    assert cos(rep.direction, R1) >= 0.99
    strengths = [r["strength_estimate"] for r in rep.directions[0]["profile"] if r["annihilates"]]
    assert np.median(strengths) >= lowest


def test_half_strength_ablation_is_below_what_a_64_wide_model_shows(tmp_path):
    """Measured limit on the d_model=64 fixtures: at strength 0.5 the energy left along r̂ (0.25 of a
    typical direction) is within the spread of a clean 64-dimensional spectrum. Wider models separate
    better (the spread shrinks like 1/√d_model); this asserts the measured outcome, not a wish."""
    rep = audit(ablated(tmp_path, "llama", "--scale", "0.5"))
    assert not rep.directions


def test_layer_subset_profile_names_the_edited_layers(tmp_path):
    rep = audit(ablated(tmp_path, "llama", "--layers", "1-2", "--targets", "attn_out,mlp_out"))
    marked = {r["group"] for r in rep.directions[0]["profile"] if r["annihilates"]}
    assert marked == {"layer 1 attn_out", "layer 1 mlp_out", "layer 2 attn_out", "layer 2 mlp_out"}
    assert rep.directions[0]["where"] == "layers 1-2"


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2"])
def test_post_norm_ablation_recovers_r_not_u(tmp_path, model_type):
    rep = audit(ablated(tmp_path, model_type, "--targets", "attn_out,mlp_out"))
    assert rep.edited and cos(rep.direction, R1) >= 0.99


# --- evasions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise, detected", [(1e-2, True), (0.1, True), (0.3, True), (1.0, False)])
def test_noise_added_after_the_ablation(tmp_path, noise, detected):
    """Gaussian noise of relative size `noise` on every writer after a full ablation: the removed energy
    comes back as noise², so noise small enough to keep the model (even 30 % of each weight's spread)
    does not hide the edit; noise as large as the weights themselves does."""
    rng = np.random.default_rng(0)
    src = ablated(tmp_path, "llama")
    noisy = rewrite(src, tmp_path / "noisy", lambda w, t: w + noise * np.std(w) * rng.normal(size=w.shape))
    rep = audit(noisy)
    assert bool(rep.directions) == detected, rep.verdict
    if detected:
        assert cos(rep.direction, R1) >= 0.99


def test_rotating_the_residual_basis_moves_the_direction_but_does_not_hide_it(tmp_path):
    rot, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(D, D)))
    src = ablated(tmp_path, "llama")

    def turn(w, t):
        if w.ndim == 3:
            return np.einsum("ij,ejk->eik", rot, w) if t.residual_axis == 1 else w @ rot.T
        return rot @ w if t.residual_axis == 0 else w @ rot.T

    rep = audit(rewrite(src, tmp_path / "rotated", turn))
    assert rep.edited and cos(rep.direction, rot @ R1) >= 0.99
    assert cos(rep.direction, R1) < 0.5


def test_bias_injection_is_found(tmp_path):
    out = tmp_path / "inj"
    run_cli(
        "inject",
        fixture_path("llama"),
        "-d",
        FIXTURES / "direction-64.npy",
        "-o",
        out,
        "--layer",
        "1",
        "--alpha",
        "4",
        "--target",
        "mlp_out",
        "--no-hash",
    )
    rep = audit(out)
    assert rep.edited and "bias injection at layer 1" in rep.verdict, rep.verdict
    assert not rep.directions


def test_shifted_real_biases_are_found(tmp_path):
    """GPT-2 has real (random, here) biases: one shifted by alpha·r̂ stands out by norm."""
    out = tmp_path / "inj"
    run_cli(
        "inject",
        fixture_path("gpt2"),
        "-d",
        FIXTURES / "direction-64.npy",
        "-o",
        out,
        "--layer",
        "1",
        "--alpha",
        "40",
        "--target",
        "mlp_out",
        "--no-hash",
    )
    rep = audit(out)
    assert any(b["layer"] == 1 for b in rep.biases), rep.verdict


# --- the storage floor and the shared-structure kernels ---------------------------------------------


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_storage_floor_matches_the_rounding_an_exact_ablation_leaves(dtype):
    """An exact ablation (float64) stored in `dtype` keeps along r̂ only the rounding's energy: measured
    on a 256×2048 Gaussian writer, it is within 2× of storage_floor's half-an-ulp model."""
    from patcher.edit.audit import storage_floor

    rng = np.random.default_rng(3)
    w = rng.normal(size=(256, 2048))
    r = unit(rng.normal(size=256))
    w -= np.outer(r, r @ w)
    stored = decode(encode(w.astype(np.float32), dtype)).astype(np.float64)
    gram = stored @ stored.T
    energy = float(r @ gram @ r) / (np.trace(gram) / 256)
    assert 0.5 <= energy / storage_floor(dtype) <= 2.0, (energy, storage_floor(dtype))


def test_isolation_reads_a_partial_ablation_shared_by_all_groups():
    """Mean of 20 normalised Gaussian Grams: no direction stands out (ratio near 1); every group ablated
    with strength 0.5 along r̂: ratio ≈ (1 − 0.5)² = 0.25 against the edge, direction r̂."""
    from patcher_kernels import annihilation as an

    rng = np.random.default_rng(4)
    d = 48
    r = unit(rng.normal(size=d))
    clean, edited = [], []
    for _ in range(20):
        w = rng.normal(size=(d, 4 * d))
        for out, m in ((clean, w), (edited, w - 0.5 * np.outer(r, r @ w))):
            g = m @ m.T
            out.append(g * d / np.trace(g))
    ratio_clean, _, _ = an.isolation(sum(clean) / 20)
    ratio, v, _ = an.isolation(sum(edited) / 20)
    assert ratio_clean > 0.85
    # reference: the mean Gram's energy along r̂ over its 2nd..9th eigenvalues' median, in float64
    values = np.linalg.eigvalsh(sum(edited) / 20)
    assert ratio == pytest.approx(float(r @ (sum(edited) / 20) @ r) / np.median(values[1:9]), rel=0.02)
    assert 0.15 < ratio < 0.4 and cos(v, r) > 0.99


def test_tracks_follow_smoothly_moving_per_layer_directions():
    from audit_forks import smooth_directions
    from patcher_kernels import annihilation as an

    rng = np.random.default_rng(5)
    smooth = smooth_directions(64, 10, rng, neighbour_cos=0.7)
    assert np.allclose(np.abs(np.einsum("ld,ld->l", smooth[1:], smooth[:-1])), 0.7)
    noise = np.stack([unit(rng.normal(size=64)) for _ in range(10)])
    dirs = np.concatenate([noise[:3], smooth[:5], noise[3:6]])
    assert (3, 8) in an.tracks(dirs, 0.4)
    assert max(b - a for a, b in an.tracks(noise, 0.4)) <= 2


@pytest.mark.parametrize("level, code", [("no sign", 0), ("abliterated", 1), ("inconclusive", 3)])
def test_cli_exit_code_names_the_verdict(monkeypatch, level, code):
    import patcher.edit.audit as audit_module

    real = audit_module.audit

    def with_level(*args, **kwargs):
        rep = real(*args, **kwargs)
        rep.level, rep.edited = level, level == "abliterated"
        return rep

    monkeypatch.setattr(audit_module, "audit", with_level)
    run_cli("audit", fixture_path("llama"), expect=code)
