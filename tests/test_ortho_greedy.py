"""The one-pass rank-1 rounding (kernels/ortho_greedy.py) against float64 references on the Q4_1 grid."""

import numpy as np
import pytest
from patcher_kernels.ggml_quant import grid
from patcher_kernels.ortho_greedy import orthogonal_rounding_rank1
from patcher_kernels.ortho_round import orthogonal_rounding


def _prequantized(shape, axis, seed=0):
    """Gaussian weights already on the Q4_1 grid (as in a downloaded GGUF), projected against a random r̂
    along the residual axis."""
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 0.02, shape)
    g = grid(v, "Q4_1")
    w = g.values(g.nearest(v)).astype(np.float64)
    r = rng.normal(size=shape[axis])
    r /= np.linalg.norm(r)
    x = w - np.outer(r, r @ w) if axis == 0 else w - np.outer(w @ r, r)
    return w, r, x


@pytest.mark.parametrize("axis", [0, 1])
def test_rank1_rounding_keeps_the_ablation_where_a_step_budget_runs_out(axis):
    w, r, x = _prequantized((2048, 256) if axis == 0 else (256, 2048), axis)
    g = grid(x, "Q4_1")
    comp = np.linalg.norm(r @ w if axis == 0 else w @ r)
    leak = lambda m: np.linalg.norm(r @ g.values(m) if axis == 0 else g.values(m) @ r) / comp  # noqa: E731
    mine = orthogonal_rounding_rank1(x, g.lo, g.hi, r, axis)
    assert leak(g.nearest(x)) > 0.5  # plain rounding puts most of r̂ᵀW back on a pre-quantized matrix
    assert leak(mine) < 0.005
    assert leak(orthogonal_rounding(x, g.lo, g.hi, r[:, None], axis)) > 5 * leak(mine)
    # a choice between the two neighbours, element by element
    v = g.values(mine)
    assert np.all((v == g.lo) | (v == g.hi))


def test_rank1_rounding_meets_a_target_and_is_locally_optimal():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.05, (64, 64))
    q = rng.normal(size=64)
    q /= np.linalg.norm(q)
    g = grid(x, "Q4_0")
    target = q @ x + 0.01
    m = orthogonal_rounding_rank1(x, g.lo, g.hi, q, 0, target)
    v = g.values(m).astype(np.float64)
    assert np.abs(q @ v - target).max() < 0.2 * np.abs(q @ g.values(g.nearest(x)) - target).max()
