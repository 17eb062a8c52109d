"""Rank-k projections that remove directions from what a weight writes into the residual stream.

Vocabulary: the *residual axis* of a weight is the axis of length d_model.
- residual axis 0 (HF nn.Linear writers, weight [d_model, fan_in]):  W' = W - s Q (Q^T W)
- residual axis 1 (embeddings [vocab, d_model], GPT-2 Conv1D [fan_in, d_model]): W' = W - s (W Q) Q^T
Q is [d_model, k] with orthonormal columns; s is the strength (1.0 removes the component fully).

Norm preservation is named in nn.Linear orientation [d_model, fan_in], whatever the storage:
- "cols": each written vector (a column of the Linear, a row of an embedding) keeps its norm.
  A rescaled vector stays orthogonal to Q, so the ablation stays exact.
- "rows": each residual coordinate's row keeps its norm (what some tools do). This rescales
  coordinates unequally and so re-introduces a small component along Q; leakage reports show it.
"""

import numpy as np

NORM_MODES = ("rows", "cols")


def orthonormalize(directions: np.ndarray) -> np.ndarray:
    """[d] or [k, d] directions -> Q [d, k] float64 with orthonormal columns spanning them (QR)."""
    v = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    if not np.all(np.isfinite(v)):
        raise ValueError("direction contains NaN or Inf")
    q, r = np.linalg.qr(v.T)
    diag = np.abs(np.diag(r))
    if diag.size == 0 or diag.min() <= 1e-12 * max(diag.max(), 1e-300):
        raise ValueError("directions are zero or linearly dependent")
    # QR may flip signs; align each column with its input direction so rank 1 gives +r/|r|.
    return q * np.sign(np.diag(r))


def residual_coefficients(block: np.ndarray, q_rows: np.ndarray) -> np.ndarray:
    """Partial Q^T W for a row block of a residual-axis-0 weight: q_rows = Q[start:stop] ([rows, k]).
    Summing this over all row blocks gives Q^T W ([k, fan_in])."""
    # a contiguous [k, rows] left operand: OpenBLAS takes a transposed view through a path that costs
    # ~40x more CPU for k = 1 (measured, 128x5632 float32 block)
    return np.ascontiguousarray(q_rows.T, dtype=block.dtype) @ block


def project_block_rows(
    block: np.ndarray,
    q_rows: np.ndarray,
    coeff: np.ndarray,
    scale: float = 1.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Row block of a residual-axis-0 weight: W_b - s Q_b C, with C = Q^T W over the whole tensor.
    The rank-k update runs in the block's dtype (float32 GEMM); `out=block` edits in place."""
    qs, c = (scale * q_rows).astype(block.dtype), coeff.astype(block.dtype)
    # rank 1: a broadcast product is ~2x faster than a K=1 GEMM in numpy
    update = qs * c if qs.shape[1] == 1 else qs @ c
    return np.subtract(block, update, out=out)


def project_block_cols(
    block: np.ndarray, q: np.ndarray, scale: float = 1.0, coeff: np.ndarray | None = None
) -> np.ndarray:
    """Row block of a residual-axis-1 weight: W_b - s (W_b Q) Q^T (each row is one written vector).
    `coeff` = W_b Q if the caller already has it."""
    qf = q.astype(block.dtype)
    coeff = block @ qf if coeff is None else coeff
    return block - (scale * coeff) @ qf.T


def project_full(weight: np.ndarray, q: np.ndarray, residual_axis: int, scale: float = 1.0) -> np.ndarray:
    """Whole-matrix projection (small tensors, references). Computes in float64."""
    w = np.asarray(weight, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if residual_axis == 0:
        return w - scale * q @ (q.T @ w)
    return w - scale * (w @ q) @ q.T


def bias_project(bias: np.ndarray, q: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """b' = b - s Q (Q^T b), in float64."""
    b = np.asarray(bias, dtype=np.float64)
    return b - scale * q @ (q.T @ b)


def bias_inject(bias: np.ndarray | None, vector: np.ndarray, alpha: float) -> np.ndarray:
    """b' = b + alpha v (b absent means zero), in float64."""
    v = np.asarray(vector, dtype=np.float64)
    base = np.zeros_like(v) if bias is None else np.asarray(bias, dtype=np.float64)
    return base + alpha * v


def rescale_norms(values: np.ndarray, old_sq: np.ndarray, new_sq: np.ndarray, axis: int) -> np.ndarray:
    """Scale slices of `values` so their squared norms go from new_sq back to old_sq.

    axis=0: one factor per row (old_sq has one entry per row); axis=1: one factor per column.
    A slice projected to (numerically) zero is left as it is: there is no direction to rescale."""
    old_sq = np.asarray(old_sq, dtype=np.float64)
    new_sq = np.asarray(new_sq, dtype=np.float64)
    ok = new_sq > 1e-30 * np.maximum(old_sq, 1e-300)
    factor = np.where(ok, np.sqrt(np.where(ok, old_sq, 1.0) / np.where(ok, new_sq, 1.0)), 1.0)
    factor = factor.astype(values.dtype)
    return values * (factor[:, None] if axis == 0 else factor[None, :])
