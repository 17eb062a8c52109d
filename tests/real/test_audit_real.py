"""`patcher audit` on SmolLM2-135M-Instruct (bf16, 30 layers, d_model 576) and on forks of it made with
plain numpy from the published descriptions (scripts/audit_forks.py, not patcher's ablate): the clean
model and clean-but-changed controls show no sign; every fork kind is found, with its direction (per
layer for per-layer forks) and its layers. One audit per test (~10-30 s). docs/audit.md has the full
confusion table (scripts/audit_confusion.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, unit

from patcher.edit.audit import audit

sys.path.insert(0, str(ROOT / "scripts"))
from audit_forks import Fork, make_fork

pytestmark = pytest.mark.real


def cos(a, b):
    return abs(float(unit(a) @ unit(b)))


@pytest.fixture(scope="module")
def smollm2(real_model):
    return real_model.hf


def _fork(smollm2, tmp_path, kind, strength, seed=0):
    dst = tmp_path / f"{kind}-{strength}"
    return dst, make_fork(Path(smollm2), dst, Fork(kind, strength, seed))


@pytest.mark.parametrize("kind, strength", [(None, 0), ("lora", 0.05), ("merge", 0.01)])
def test_real_clean_model_and_controls_show_no_sign(smollm2, tmp_path, kind, strength):
    """The untouched model and clean-but-changed controls (a rank-16 LoRA merge at 5 % on every linear
    layer, a random rank-4 merge at 1 % on the writers): no sign, no direction."""
    path = smollm2 if kind is None else _fork(smollm2, tmp_path, kind, strength)[0]
    rep = audit(path)
    assert rep.level == "no sign", rep.verdict
    assert rep.direction is None and not rep.edited


def test_real_heretic_fork_is_found_layer_by_layer(smollm2, tmp_path):
    """heretic-style: a direction per layer (neighbours |cos| 0.72), a linear kernel peaking at layer 17.4
    (attention 1.0, MLP 0.9, falling to 0.2 at ±16.5 layers): abliterated, each named layer's direction
    |cos| ≥ 0.95 with the one used there, the named layers inside the kernel, the profile peaking near
    17."""
    path, truth = _fork(smollm2, tmp_path, "heretic", 1.0)
    rep = audit(path)
    assert rep.level == "abliterated", rep.verdict
    d = np.asarray(rep.direction)
    named = np.nonzero(np.linalg.norm(d, axis=1))[0]
    assert len(named) >= 5 and all(truth["attn_out"][named] > 0)
    assert min(cos(d[l], truth["directions"][l]) for l in named) >= 0.95
    prof = {r["layer"]: r["strength_attn"] for r in rep.layer_profile}
    assert abs(max(prof, key=prof.get) - 17.4) <= 2


@pytest.mark.parametrize("kind, strength", [("classic", 0.5), ("mpoa-cols", 1.0), ("mpoa-rows", 1.0)])
def test_real_forks_with_one_direction_are_found(smollm2, tmp_path, kind, strength):
    """Half-strength on every writer (energy along r̂ 0.25 of typical, where natural low directions of
    this model sit too: found by attention and MLP agreeing), and MPOA through a rank-3 LoRA with row or
    column norms preserved (at the storage floor in every layer)."""
    path, truth = _fork(smollm2, tmp_path, kind, strength)
    rep = audit(path)
    assert rep.level == "abliterated", rep.verdict
    assert np.ndim(rep.direction) == 1 and cos(rep.direction, truth["directions"][0]) >= 0.95
    if kind != "classic":
        assert rep.directions[0]["where"] == "layers 0-29"
