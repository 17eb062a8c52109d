"""Rounding that keeps an ablation: choose, per element, the lower or the upper grid value so that the
stored weights stay orthogonal to the removed directions.

Plain round-to-nearest adds an error e whose component Qᵀe is not zero: on 4-bit grids it puts back tens
of percent of the removed |QᵀW|. Every element has two candidates (lo ≤ x ≤ hi, the neighbouring grid
values under block scales the caller fixed beforehand), so rounding is a choice. Start from nearest, then,
for each written vector (a slice along the residual axis), run coordinate descent on
    |e|² + WEIGHT · |Qᵀe − t|²
over the vector's cheapest candidates (least extra error per unit of residual a flip can remove), one
best flip per vector per step. Measured on Gaussian 512×1024 weights, 4-bit blocks of 32: leakage
9.9 % → 0.05 %, rounding error +0.9 %; 8-bit: 0.5 % → 0.003 %. The grid (scales, zero points, codes)
belongs to the caller, so one routine serves GGUF, MatMulNBits and FP8.
"""

import numpy as np

CANDIDATES = 160  # flips considered per vector (cheapest by price); about √d/3 are needed
STEPS = 64  # coordinate-descent steps; each flips at most one element per vector
WEIGHT = 1e4  # how much more a unit of residual along Q costs than a unit of plain rounding error
CHUNK = 1024  # vectors processed at once (memory: a few [d_model, CHUNK] float64 arrays)


def orthogonal_rounding(
    x: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    q: np.ndarray,
    axis: int = 0,
    target: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask, True where `hi` is chosen.

    x, lo, hi: same 2-D shape, lo ≤ x ≤ hi (lo == hi where the grid clips). q: [d_model, k] (or
    [d_model]) orthonormal columns; d_model is the length of `axis`, the residual axis. target: the
    component Qᵀw the stored vectors should keep, [k, n] (default Qᵀx, the exact projected values)."""
    x, lo, hi = (np.asarray(a, dtype=np.float64) for a in (x, lo, hi))
    if not (x.shape == lo.shape == hi.shape and x.ndim == 2):
        raise ValueError(f"x, lo, hi must be 2-D of one shape, got {x.shape}, {lo.shape}, {hi.shape}")
    q = np.asarray(q, dtype=np.float64).reshape(x.shape[axis], -1)
    if axis == 1:
        t = None if target is None else np.asarray(target)
        return orthogonal_rounding(x.T, lo.T, hi.T, q, 0, t).T
    up = np.empty(x.shape, dtype=bool)
    for c0 in range(0, x.shape[1], CHUNK):
        c = slice(c0, c0 + CHUNK)
        t = None if target is None else np.asarray(target, dtype=np.float64)[:, c]
        up[:, c] = _round_vectors(x[:, c], lo[:, c], hi[:, c], q, t)
    return up


def _round_vectors(x, lo, hi, q, target):
    d, n = x.shape
    up = (hi - x) < (x - lo)  # nearest first
    err = np.where(up, hi, lo) - x  # rounding error as chosen, [d, n]
    alt = np.where(up, lo, hi) - x  # the error if that element were flipped
    residual = q.T @ err  # Qᵀw − Qᵀx, [k, n]
    if target is not None:
        residual += q.T @ x - target
    # candidates: least added error per unit of residual a flip can move
    reach = np.abs(alt - err) * np.sqrt((q**2).sum(axis=1))[:, None]
    price = np.where(reach > 0, (alt**2 - err**2) / np.where(reach > 0, reach, 1.0), np.inf)
    m = min(CANDIDATES, d)
    every = np.broadcast_to(np.arange(d)[:, None], (d, n))
    idx = np.argpartition(price, m - 1, axis=0)[:m] if m < d else every
    cols = np.arange(n)
    e, a = err[idx, cols], alt[idx, cols]  # [m, n]
    qc = q[idx]  # [m, n, k]
    qsq = (qc**2).sum(axis=2)
    flipped = np.zeros(idx.shape, dtype=bool)
    for _ in range(STEPS):
        change = a - e
        toward = np.einsum("mnk,kn->mn", qc, residual)
        # drop in |residual|² from a flip, against the rise in |e|²
        score = WEIGHT * (-2 * change * toward - change**2 * qsq) - (a**2 - e**2)
        best = np.argmax(score, axis=0)
        at = np.nonzero(score[best, cols] > 0)[0]
        if at.size == 0:
            break
        b = best[at]
        residual[:, at] += qc[b, at].T * change[b, at][None, :]
        flipped[b, at] ^= True
        e[b, at], a[b, at] = a[b, at], e[b, at]
    rows, cs = np.nonzero(flipped)
    up[idx[rows, cs], cs] ^= True
    return up


def component_leakage(stored: np.ndarray, original: np.ndarray, q: np.ndarray, axis: int = 0) -> float:
    """|QᵀW_stored| / |QᵀW_original| (Frobenius): the share of the removed component that survives."""
    s, o = np.asarray(stored, dtype=np.float64), np.asarray(original, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64).reshape(s.shape[axis], -1)
    if axis == 1:
        s, o = s.T, o.T
    base = np.linalg.norm(q.T @ o)
    return float(np.linalg.norm(q.T @ s) / base) if base > 0 else 0.0
