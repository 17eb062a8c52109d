"""Low-rank analysis of a change Δ = W' − W seen only as row blocks (used by `patcher diff`).

`top_singular` is a streaming randomized range finder (Halko, Martinsson & Tropp 2011): with a
small Gaussian test matrix Ω [n_cols, l] it accumulates Z = ΔᵀΔΩ block by block (Σ Bᵢᵀ(BᵢΩ)),
refines it with power iterations, then projects: with Q = orth(Z), G = (ΔQ)ᵀ(ΔQ) is l×l and its
eigenvalues are the top σᵢ² of Δ. Nothing larger than one row block, [n_cols, l] and [n_rows, l]
is ever held, so a 4 GiB embedding delta is analysed in a few MiB (plus an optional cache).

Storage rounding: an edit written back in bf16 differs from the exact rank-1 update by up to half
an ulp per element. That noise is spread over every singular value, so for wide matrices the
top component may carry a little under 99 % of ‖Δ‖². `rounding_floor` bounds that noise
(Σ (ulp/2)² of the stored values) so `rank_for_energy` can say "the rest is rounding".
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# explicit mantissa bits of each float storage type (the ulp of x is 2^(exponent − bits))
MANTISSA_BITS = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7, "F8_E4M3": 3, "F8_E5M2": 2}

Reader = Callable[[int, int], np.ndarray]


@dataclass
class Spectrum:
    sigma: np.ndarray  # [k] top singular values of Δ (estimates, descending)
    left: np.ndarray  # [n_rows, k] left singular vectors
    right: np.ndarray  # [n_cols, k] right singular vectors
    energy: float  # ‖Δ‖_F², exact (summed in float64 over every block)


def top_singular(
    read: Reader,
    n_rows: int,
    n_cols: int,
    k: int = 8,
    oversample: int = 4,
    power_iters: int = 1,
    block_rows: int = 1024,
    seed: int = 0,
    cache_bytes: int = 256 << 20,
) -> Spectrum:
    """Top-k singular triplets of the matrix whose rows [s, e) `read(s, e)` returns (float32).

    Reads the matrix 2 + power_iters times; when its float32 copy fits in `cache_bytes` the blocks
    are kept after the first read instead."""
    l = max(1, min(k + oversample, n_rows, n_cols))
    keep = n_rows * n_cols * 4 <= cache_bytes
    cache: dict[int, np.ndarray] = {}

    def blocks():
        for s in range(0, n_rows, block_rows):
            e = min(s + block_rows, n_rows)
            b = cache.get(s)
            if b is None:
                b = np.asarray(read(s, e), dtype=np.float32)
                if keep:
                    cache[s] = b
            yield s, e, b

    omega = np.random.default_rng(seed).standard_normal((n_cols, l)).astype(np.float32)
    energy, z = 0.0, np.zeros((n_cols, l))
    for _, _, b in blocks():
        energy += float(np.einsum("ij,ij->", b, b, dtype=np.float64))
        z += b.T @ (b @ omega)  # ΔᵀΔΩ: one power step for free in the first pass
    k = min(k, l)
    if energy == 0.0:
        return Spectrum(np.zeros(k), np.zeros((n_rows, k)), np.zeros((n_cols, k)), 0.0)
    q = np.linalg.qr(z)[0]
    for _ in range(power_iters):
        q32, z = q.astype(np.float32), np.zeros((n_cols, l))
        for _, _, b in blocks():
            z += b.T @ (b @ q32)
        q = np.linalg.qr(z)[0]
    q32, y, g = q.astype(np.float32), np.empty((n_rows, l)), np.zeros((l, l))
    for s, e, b in blocks():
        y[s:e] = b @ q32
        g += y[s:e].T @ y[s:e]
    lam, w = np.linalg.eigh(g)
    order = np.argsort(lam)[::-1][:k]
    sigma = np.sqrt(np.clip(lam[order], 0.0, None))
    w = w[:, order]
    left = (y @ w) / np.where(sigma > 0, sigma, 1.0)
    return Spectrum(sigma, left, q @ w, energy)


def rank_for_energy(
    sigma: np.ndarray, energy: float, fraction: float = 0.99, floor: float = 0.0
) -> int | None:
    """Smallest r such that what the top r singular values leave out, ‖Δ‖² − Σ_{i≤r} σᵢ², is
    at most (1 − fraction)·‖Δ‖² or at most `floor` (the storage-rounding bound). None: more than
    len(sigma)."""
    allowed = max((1.0 - fraction) * energy, floor)
    left_out = energy - np.cumsum(np.asarray(sigma, dtype=np.float64) ** 2)
    hits = np.nonzero(left_out <= allowed)[0]
    return int(hits[0]) + 1 if hits.size else None


def ulp(values: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Spacing of the storage grid at each value: float32 spacing rescaled to the storage precision
    (exact for bf16, which shares float32's exponent range; fine for fp16/fp8 normals, and only
    smaller, i.e. a stricter bound, for their subnormals). Bit arithmetic, so it runs at memory speed."""
    if mantissa_bits <= 23:
        v = np.abs(np.asarray(values, dtype=np.float32))
        return np.spacing(v) * np.float32(2.0 ** (23 - mantissa_bits))
    v = np.abs(np.asarray(values, dtype=np.float64))
    return np.spacing(v) * 2.0 ** (52 - mantissa_bits)


def rounding_floor(values: np.ndarray, mantissa_bits: int, scale: np.ndarray | float = 1.0) -> float:
    """Σ (ulp/2)² over stored values: the most energy rounding them to their grid can add.
    `scale` multiplies the grid (FP8 block scales: the grid is scale × the fp8 grid of q)."""
    u = np.ravel(ulp(values, mantissa_bits) * scale)
    return float(np.einsum("i,i->", u, u, dtype=np.float64)) / 4.0


def off_direction_energy(vector: np.ndarray, unit: np.ndarray) -> float:
    """‖v − û(ûᵀv)‖²: the part of a bias change not along the direction."""
    v = np.asarray(vector, dtype=np.float64)
    return float(v @ v - (unit @ v) ** 2)


def shared_direction(
    vectors: np.ndarray, weights: np.ndarray | None = None, reference: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Common direction of unit vectors known up to sign: align each to a reference (given, or the
    heaviest vector), take the weighted mean, then re-align once to that mean so one poorly chosen
    reference cannot flip others. Returns (unit direction, cosine of each aligned vector to it)."""
    v = np.asarray(vectors, dtype=np.float64)
    w = np.ones(len(v)) if weights is None else np.asarray(weights, dtype=np.float64)
    ref = v[int(np.argmax(w))] if reference is None else np.asarray(reference, dtype=np.float64)
    for _ in range(2):
        signs = np.where(v @ ref < 0, -1.0, 1.0)
        mean = (w * signs) @ v
        ref = mean / np.linalg.norm(mean)
    if reference is not None and ref @ reference < 0:
        ref = -ref
    return ref, np.abs(v @ ref)
