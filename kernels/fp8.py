"""FP8 block-scaled weights (DeepSeek-V3 / Qwen3-FP8 / compressed-tensors layout).

A weight q [out, in] (F8_E4M3) comes with scale [ceil(out/B), ceil(in/B)] and means W = q * scale,
each scale entry covering a BxB tile (B = 128). Requantizing after an edit keeps every tile's scale
unless the edited tile no longer fits: new scale = max(old, amax / 448), values clipped to +-448
before the cast (e4m3fn has no inf; 500 would cast to NaN).
"""

import numpy as np
from patcher_kernels.codecs import numpy_dtype

FP8_MAX = 448.0  # largest finite float8_e4m3fn (ml_dtypes.finfo; checked in the tests)


def _expand(scale: np.ndarray, rows: int, cols: int, block: int) -> np.ndarray:
    """Per-tile scale [R, C] -> per-element [rows, cols] (tiles at the edge may be partial)."""
    return np.repeat(np.repeat(scale, block, axis=0), block, axis=1)[:rows, :cols]


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    """q [rows, cols] fp8 and its tile scales [ceil(rows/B), ceil(cols/B)] -> float32 values.
    `q` may be a row block whose first row starts a tile; pass the matching scale rows."""
    rows, cols = q.shape
    return q.astype(np.float32) * _expand(scale.astype(np.float32), rows, cols, block)


def block_amax(values: np.ndarray, block: int = 128) -> np.ndarray:
    """Max |value| over each BxB tile: [rows, cols] -> [ceil(rows/B), ceil(cols/B)] float32."""
    rows, cols = values.shape
    R, C = -(-rows // block), -(-cols // block)
    padded = np.zeros((R * block, C * block), dtype=np.float32)
    padded[:rows, :cols] = np.abs(values)
    return padded.reshape(R, block, C, block).max(axis=(1, 3))


def requantize_scale(old_scale: np.ndarray, values: np.ndarray, block: int = 128) -> np.ndarray:
    """New tile scales for edited float values: max(old, amax/448), float32."""
    return np.maximum(old_scale.astype(np.float32), block_amax(values, block) / FP8_MAX)


def quantize_blocks(values: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    """float values and tile scales -> fp8 e4m3fn, dividing by the scale and clipping to +-448."""
    rows, cols = values.shape
    s = _expand(scale.astype(np.float32), rows, cols, block)
    scaled = np.divide(values, s, out=np.zeros_like(values, dtype=np.float32), where=s != 0)
    return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(numpy_dtype("F8_E4M3"))


def neighbours(values: np.ndarray, scale: np.ndarray, block: int = 128):
    """The two e4m3 codes around each value under fixed tile scales, and their values as
    dequantize_blocks reads them: (lo codes, hi codes, lo values, hi values), lo <= x <= hi (equal
    where x is on the grid or beyond ±448·scale). Lets a caller choose the rounding per element."""
    rows, cols = values.shape
    s = _expand(scale.astype(np.float32), rows, cols, block).astype(np.float64)
    x = np.asarray(values, dtype=np.float64)
    scaled = np.clip(np.divide(x, s, out=np.zeros_like(x), where=s != 0), -FP8_MAX, FP8_MAX)
    near = scaled.astype(np.float32).astype(numpy_dtype("F8_E4M3"))
    nf = near.astype(np.float64)
    up = scaled > nf
    bits = near.view(np.uint8).astype(np.int16)
    neg, mag = bits >= 0x80, bits & 0x7F
    away = up != neg  # moving away from zero: magnitude + 1 (0x7E = 448 is the largest finite)
    new_mag = np.where(away, np.minimum(mag + 1, 0x7E), mag - 1)
    cross = (mag == 0) & ~away  # from ±0 towards the other sign
    other_bits = np.where(cross, np.where(up, 0x01, 0x81), (bits & 0x80) | np.maximum(new_mag, 0))
    other = other_bits.astype(np.uint8).view(numpy_dtype("F8_E4M3"))
    pinned = (nf == scaled) | (away & (mag >= 0x7E))
    other = np.where(pinned, near, other)
    lo_q, hi_q = np.where(up, near, other), np.where(up, other, near)
    s32 = s.astype(np.float32)
    return lo_q, hi_q, lo_q.astype(np.float32) * s32, hi_q.astype(np.float32) * s32
