"""Block quantization in com.microsoft MatMulNBits' layout, done here so the rounding is ours.

A weight W [N, K] (N outputs, K inputs; HF Linear's layout) is cut into blocks of `block` along K
(K padded with zeros to a whole number of blocks). Each block has a scale s (and, asymmetric, a zero
point z); a code c in [0, 2^bits) stands for (c - z) * s. Layout (the operator's schema):
  B            uint8 [N, k_blocks, block * bits / 8]; 4 bits: element 2i in the low nibble, 2i+1 high
  scales       activation dtype [N, k_blocks]
  zero_points  uint8 [N, ceil(k_blocks * bits / 8)], packed like B; absent = 2^(bits-1) (symmetric)
Symmetric blocks map the element of largest magnitude to code 0 (s = v / -2^(bits-1), so s may be
negative): the whole grid -8..7 is used and that element is exact.

Plain round-to-nearest of an ablated weight puts part of the removed direction back (the rounding
error has a component along r̂). With `q` given, the residual-axis vectors are rounded with
patcher_kernels.ortho_round instead: each element still takes one of its two neighbouring grid values
under the same scales, chosen so Qᵀ(stored) stays at Qᵀ(exact).

Work runs in slabs (rows, or whole blocks of columns when the residual axis is N) so memory stays a
few float64 copies of a slab, not of the tensor.
"""

from dataclasses import dataclass

import numpy as np
from patcher_kernels.ortho_round import orthogonal_rounding

SLAB_ELEMENTS = 1 << 20  # elements per slab (a few float64 copies: ~40 MB)


@dataclass
class Quantized:
    packed: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)] or None (symmetric)
    bits: int
    block: int
    k: int

    @property
    def n(self) -> int:
        return self.packed.shape[0]


def _grid(xb: np.ndarray, bits: int, symmetric: bool):
    """Per block (last axis): scale and zero point (float, the code offset)."""
    top = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        idx = np.abs(xb).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(xb, idx, axis=-1)[..., 0]
        s = extreme / -half
        z = np.full(s.shape, float(half))
    else:
        lo, hi = np.minimum(xb.min(axis=-1), 0.0), np.maximum(xb.max(axis=-1), 0.0)
        s = (hi - lo) / top
        z = np.clip(np.round(-lo / np.where(s == 0, 1, s)), 0, top)
    s = np.where(s == 0, 1.0, s)  # an all-zero block: any scale, codes land on z
    return s, z


def quantize(
    w: np.ndarray,
    bits: int = 4,
    block: int = 32,
    symmetric: bool = True,
    q: np.ndarray | None = None,
    axis: int = 0,
    scale_dtype=np.float32,
) -> Quantized:
    """w [N, K] -> MatMulNBits tensors. q [d_model, k] orthonormal and axis (0: N is the residual axis,
    a writer; 1: K is, an embedding row) turn on orthogonal rounding. Codes are chosen for the scales
    as stored (`scale_dtype`: float16 in a float16-activation graph)."""
    n, k = w.shape
    kb = -(-k // block)
    top = (1 << bits) - 1
    packed = np.empty((n, kb, block * bits // 8), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = None if symmetric else np.empty((n, kb), np.uint8)
    if q is not None and axis == 0:  # vectors are columns: slabs of whole blocks of columns, all rows
        step = max(1, SLAB_ELEMENTS // (n * block)) * block
        slabs = [(slice(0, n), slice(c, min(c + step, k))) for c in range(0, k, step)]
    else:
        step = max(1, SLAB_ELEMENTS // max(kb * block, 1))
        slabs = [(slice(r, min(r + step, n)), slice(0, k)) for r in range(0, n, step)]
    for rows, cols in slabs:
        x = np.asarray(w[rows, cols], np.float64)
        r, c = x.shape
        cb = -(-c // block)
        xp = np.zeros((r, cb * block))
        xp[:, :c] = x
        xb = xp.reshape(r, cb, block)
        s, z = _grid(xb, bits, symmetric)
        s32 = s.astype(scale_dtype).astype(np.float64)  # round with the scale the file stores
        s32 = np.where(s32 == 0, 1.0, s32)
        t = xb / s32[..., None] + z[..., None]
        if q is None:
            codes = np.clip(np.round(t), 0, top)
        else:
            c0 = np.clip(np.floor(t), 0, top)
            c1 = np.clip(c0 + 1, 0, top)
            v0, v1 = (c0 - z[..., None]) * s32[..., None], (c1 - z[..., None]) * s32[..., None]
            lo, hi = np.minimum(v0, v1), np.maximum(v0, v1)
            flat = lambda a: a.reshape(r, cb * block)[:, :c]  # noqa: E731
            x_lo, x_hi = flat(lo), flat(hi)
            up = np.zeros(
                (r, cb * block), bool
            )  # clipped elements (lo == hi) keep their error; others make up
            up[:, :c] = orthogonal_rounding(x, x_lo, x_hi, q, axis)
            up = up.reshape(r, cb, block)
            codes = np.where(up == (v1 >= v0), c1, c0)
        codes = codes.astype(np.uint8)
        b0 = cols.start // block
        packed[rows, b0 : b0 + cb] = _pack(codes, bits)
        scales[rows, b0 : b0 + cb] = s32
        if zps is not None:
            zps[rows, b0 : b0 + cb] = z.astype(np.uint8)
    if zps is not None:
        zps = _pack(zps[:, None, :], bits)[:, 0, :] if bits == 4 else zps
    return Quantized(packed, scales, zps, bits, block, k)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., m] -> bytes [..., m * bits / 8] (4 bits: pairs, first in the low nibble; odd m padded)."""
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _unpack(data: np.ndarray, bits: int, m: int) -> np.ndarray:
    if bits == 8:
        return data[..., :m]
    out = np.empty(data.shape[:-1] + (data.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = data & 15, data >> 4
    return out[..., :m]


def dequantize(qt: Quantized) -> np.ndarray:
    """The float64 matrix [N, K] the stored tensors stand for (MatMulNBits' formula)."""
    n, kb, _ = qt.packed.shape
    codes = _unpack(qt.packed, qt.bits, qt.block).astype(np.float64)
    z = (
        np.full((n, kb), float(1 << (qt.bits - 1)))
        if qt.zero_points is None
        else _unpack(qt.zero_points, qt.bits, kb).astype(np.float64)
    )
    w = (codes - z[..., None]) * qt.scales.astype(np.float64)[..., None]
    return w.reshape(n, kb * qt.block)[:, : qt.k]


@dataclass
class Channelwise:
    """Symmetric int8 with one scale per output channel (row of W [N, K]): ONNX MatMulInteger's weights
    (stored [K, N]), as onnxruntime's dynamic quantization and transformers.js's q8 files hold them."""

    codes: np.ndarray  # int8 [N, K]
    scales: np.ndarray  # float32 [N]

    def dense(self) -> np.ndarray:
        return self.codes.astype(np.float64) * self.scales.astype(np.float64)[:, None]


def quantize_channels(w: np.ndarray, q: np.ndarray | None = None, axis: int = 0) -> Channelwise:
    """w [N, K] -> int8 codes in [-127, 127] and per-row scales max|w_n| / 127, with orthogonal rounding
    along `axis` when q is given (slabs as in quantize)."""
    n, k = w.shape
    scales = np.empty(n, np.float32)
    for r in range(0, n, 1024):  # w may be a view of the stored file: never one whole float copy
        scales[r : r + 1024] = np.abs(np.asarray(w[r : r + 1024], np.float64)).max(axis=1) / 127
    scales = np.where(scales == 0, np.float32(1), scales)
    s = scales.astype(np.float64)
    codes = np.empty((n, k), np.int8)
    if q is not None and axis == 0:
        step = max(1, SLAB_ELEMENTS // n)
        slabs = [(slice(0, n), slice(c, min(c + step, k))) for c in range(0, k, step)]
    else:
        step = max(1, SLAB_ELEMENTS // max(k, 1))
        slabs = [(slice(r, min(r + step, n)), slice(0, k)) for r in range(0, n, step)]
    for rows, cols in slabs:
        x = np.asarray(w[rows, cols], np.float64)
        sc = s[rows][:, None]
        t = x / sc
        if q is None:
            c = np.clip(np.round(t), -127, 127)
        else:
            c0 = np.clip(np.floor(t), -127, 127)
            c1 = np.clip(c0 + 1, -127, 127)
            up = orthogonal_rounding(x, c0 * sc, c1 * sc, q, axis)
            c = np.where(up, c1, c0)
        codes[rows, cols] = c.astype(np.int8)
    return Channelwise(codes, scales)
