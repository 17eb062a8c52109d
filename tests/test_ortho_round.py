"""Rounding that keeps an ablation (kernels/ortho_round.py) against hand-computed cases, a brute-force
optimum, and plain round-to-nearest on block-quantized grids."""

import numpy as np
import pytest
from patcher_kernels.ortho_round import component_leakage, orthogonal_rounding
from patcher_kernels.project import orthonormalize, project_full


def symmetric_grid(x, bits, block=32):
    """Neighbouring values on a Q4_0/Q8_0-like grid: blocks of `block` along axis 1, scale amax/qmax."""
    qmax = 2 ** (bits - 1) - 1
    xb = x.reshape(x.shape[0], -1, block)
    s = np.abs(xb).max(-1, keepdims=True) / qmax
    s[s == 0] = 1
    lo = np.clip(np.floor(xb / s), -qmax - 1, qmax) * s
    hi = np.clip(np.ceil(xb / s), -qmax - 1, qmax) * s
    return lo.reshape(x.shape), hi.reshape(x.shape)


def nearest(x, lo, hi):
    return np.where((hi - x) < (x - lo), hi, lo)


def test_hand_case_picks_the_flip_that_cancels_the_residual():
    q = np.array([0.6, 0.8])
    x = np.array([[0.45], [0.45]])
    lo, hi = np.zeros_like(x), np.ones_like(x)
    # nearest (0, 0) leaves q·e = -0.63; flipping element 0 leaves -0.03, element 1 +0.17, both +0.77
    up = orthogonal_rounding(x, lo, hi, q, axis=0)
    assert up[:, 0].tolist() == [True, False]


def test_hand_case_keeps_nearest_when_a_flip_would_overshoot():
    q = np.array([1.0, 0.0])
    x = np.array([[0.6], [0.3]])
    up = orthogonal_rounding(x, np.zeros_like(x), np.ones_like(x), q, axis=0)
    # element 0: nearest 1 leaves +0.4, flipping leaves -0.6: worse; element 1 is off the direction
    assert up[:, 0].tolist() == [True, False]


def test_result_is_a_local_optimum_and_never_worse_than_nearest():
    """Coordinate descent ends where no single flip among all elements lowers |e|² + W·|Qᵀe|² much
    (candidates are a subset, so allow a little), and is never worse than round-to-nearest."""
    from patcher_kernels.ortho_round import WEIGHT

    rng = np.random.default_rng(3)
    d = 48
    for trial in range(10):
        q = orthonormalize(rng.normal(size=d))[:, 0]
        x = rng.normal(size=(d, 1)) * 3
        lo, hi = np.floor(x), np.ceil(x)
        up = orthogonal_rounding(x, lo, hi, q, axis=0)[:, 0]

        def cost(mask):
            e = np.where(mask, hi[:, 0], lo[:, 0]) - x[:, 0]
            return float(e @ e + WEIGHT * (q @ e) ** 2)

        got = cost(up)
        assert got <= cost((hi - x)[:, 0] < (x - lo)[:, 0]) + 1e-9
        for i in range(d):
            other = up.copy()
            other[i] ^= True
            assert cost(other) >= got - 1e-6 * got, (trial, i)


@pytest.mark.parametrize("bits, near_min, ortho_max", [(4, 0.05, 2e-3), (8, 2e-3, 1e-4)])
def test_block_quantized_ablation_stays_orthogonal(bits, near_min, ortho_max):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(512, 1024))
    q = orthonormalize(rng.normal(size=512))
    x = project_full(w, q, 0)
    lo, hi = symmetric_grid(x, bits)
    plain = nearest(x, lo, hi)
    up = orthogonal_rounding(x, lo, hi, q, axis=0)
    stored = np.where(up, hi, lo)
    assert component_leakage(plain, w, q) > near_min
    assert component_leakage(stored, w, q) < ortho_max
    assert np.linalg.norm(stored - x) <= 1.05 * np.linalg.norm(plain - x)
    assert np.all((stored == lo) | (stored == hi))


def test_rank_two_and_residual_axis_one():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(256, 512))  # [vocab, d_model]: residual axis 1
    q = orthonormalize(rng.normal(size=(2, 512)))
    x = project_full(w, q, 1)
    lo, hi = symmetric_grid(x, 4)
    up = orthogonal_rounding(x, lo, hi, q, axis=1)
    assert component_leakage(np.where(up, hi, lo), w, q, axis=1) < 5e-3
    assert component_leakage(nearest(x, lo, hi), w, q, axis=1) > 0.05
    again = orthogonal_rounding(x.T, lo.T, hi.T, q, axis=0)
    assert np.array_equal(again.T, up)


def test_partial_strength_keeps_the_intended_component():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(256, 256))
    q = orthonormalize(rng.normal(size=256))
    x = project_full(w, q, 0, scale=0.5)
    lo, hi = symmetric_grid(x, 4)
    stored = np.where(orthogonal_rounding(x, lo, hi, q, axis=0), hi, lo)
    intended = q.T @ x
    assert np.allclose(intended, 0.5 * (q.T @ w))
    assert np.linalg.norm(q.T @ stored - intended) < 2e-3 * np.linalg.norm(q.T @ w)


def test_clipped_elements_and_exact_grid_points_are_left_alone():
    q = orthonormalize(np.ones(64))
    x = np.linspace(-1, 1, 64 * 4).reshape(64, 4)
    lo = hi = x.copy()  # every value already on the grid: nothing to choose
    stored = np.where(orthogonal_rounding(x, lo, hi, q), hi, lo)
    assert np.array_equal(stored, x)


def test_component_leakage_hand_value():
    q = np.array([1.0, 0.0])
    original = np.array([[2.0, 0.0], [5.0, 1.0]])  # q^T W = [2, 0]
    stored = np.array([[0.5, 0.0], [5.0, 1.0]])  # q^T W = [0.5, 0]
    assert component_leakage(stored, original, q) == pytest.approx(0.25)
    assert component_leakage(stored.T, original.T, q, axis=1) == pytest.approx(0.25)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        orthogonal_rounding(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((3, 4)), np.ones(4) / 2)
