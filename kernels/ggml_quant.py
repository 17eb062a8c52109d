"""GGML storage types as a grid per element: block scales fixed from the exact values, then each element's
two neighbouring representable values (lo <= x <= hi) and the bytes for any choice between them.

Rounding to the nearest neighbour is what every quantizer does; choosing per element between lo and hi
lets the caller keep a constraint (orthogonality to r̂) that plain rounding breaks. Block scales follow
ggml's reference quantizers (ggml-quants.c): Q8_0 d = amax/127; Q4_0/Q5_0 d = max/-8 (-16), where max
is the element of largest magnitude with its sign; Q4_1/Q5_1 d = (max-min)/15 (31), m = min. Values are
reconstructed exactly as ggml dequantizes them (float32 d*q (+ m)), so lo/hi are what the file will hold.
K-quants (Q2_K..Q6_K, super-blocks of 256) take their scales from llama.cpp's reference quantizer
(kernels/kquant.py) and then offer the same two neighbours per element.
Pure numpy: no files, no names.
"""

from dataclasses import dataclass

import numpy as np
from patcher_kernels import kquant
from patcher_kernels.codecs import numpy_dtype

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    bits: int
    signed_max: bool  # d from the signed max, codes offset by 2^(bits-1) (Q4_0, Q5_0)
    has_min: bool  # per-block minimum m (Q4_1, Q5_1)
    code_max: int  # largest code
    divisor: float  # d = (max or max-min) / divisor


# name -> layout. Q8_0 is symmetric from amax with int8 codes.
BLOCK_TYPES = {
    "Q8_0": BlockType(8, False, False, 127, 127.0),
    "Q4_0": BlockType(4, True, False, 15, -8.0),
    "Q5_0": BlockType(5, True, False, 31, -16.0),
    "Q4_1": BlockType(4, False, True, 15, 15.0),
    "Q5_1": BlockType(5, False, True, 31, 31.0),
}
FLOAT_TYPES = {"F32": 4, "F16": 2, "BF16": 2}  # bytes per element; numpy dtypes via codecs (lazy ml_dtypes)
K_TYPES = tuple(kquant.KTYPES)
WRITABLE = (*FLOAT_TYPES, *BLOCK_TYPES, *K_TYPES)
BYTES_PER_BLOCK = {
    "Q8_0": 34,
    "Q4_0": 18,
    "Q4_1": 20,
    "Q5_0": 22,
    "Q5_1": 24,
    **{q: t.nbytes for q, t in kquant.KTYPES.items()},
}


def block_size(qtype: str) -> int:
    """Elements per block (1 for float types): a row's length must be a multiple of it."""
    return kquant.QK_K if qtype in kquant.KTYPES else BLOCK if qtype in BLOCK_TYPES else 1


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of n elements."""
    if qtype in FLOAT_TYPES:
        return n * FLOAT_TYPES[qtype]
    return n // block_size(qtype) * BYTES_PER_BLOCK[qtype]


@dataclass
class Grid:
    """Per element: lo <= hi, the two candidates (float32, equal where the value is pinned); `pack`
    turns a choice (True = hi) into the stored bytes [..., row_bytes]."""

    qtype: str
    lo: np.ndarray
    hi: np.ndarray
    code_lo: np.ndarray | None  # block types: integer codes of lo and hi
    code_hi: np.ndarray | None
    d16: np.ndarray | None  # [..., blocks] float16 scales
    m16: np.ndarray | None
    kscales: kquant.KScales | None = None  # K-quants: super-block and sub-block scales

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """The plain-rounding choice: hi where it is strictly closer (ties go to lo)."""
        return np.abs(self.hi.astype(np.float64) - x) < np.abs(x - self.lo.astype(np.float64))

    def values(self, choose_hi: np.ndarray) -> np.ndarray:
        return np.where(choose_hi, self.hi, self.lo)

    def pack(self, choose_hi: np.ndarray) -> np.ndarray:
        if self.qtype in FLOAT_TYPES:
            v = self.values(choose_hi).astype(numpy_dtype(self.qtype))
            return np.ascontiguousarray(v).view(np.uint8).reshape(*v.shape[:-1], -1)
        if self.code_lo is None or self.code_hi is None:
            raise ValueError(f"a {self.qtype} grid without codes")
        codes = np.where(choose_hi, self.code_hi, self.code_lo)
        if self.kscales is not None:
            lead, n = codes.shape[:-1], codes.shape[-1]
            return kquant.pack(codes, self.kscales).reshape(*lead, row_bytes(self.qtype, n))
        if self.d16 is None:
            raise ValueError(f"a {self.qtype} grid without block scales")
        return _pack_blocks(self.qtype, codes, self.d16, self.m16)


def grid(x: np.ndarray, qtype: str) -> Grid:
    """Neighbours of exact values x [..., n] (n a multiple of 32 for block types) on qtype's grid."""
    x = np.asarray(x, dtype=np.float64)
    if qtype in FLOAT_TYPES:
        return _float_grid(x, qtype)
    if qtype in kquant.KTYPES:
        return _k_grid(x, qtype)
    if qtype not in BLOCK_TYPES:
        raise KeyError(qtype)
    t = BLOCK_TYPES[qtype]
    shape = x.shape
    if shape[-1] % BLOCK:
        raise ValueError(f"{qtype} rows must be a multiple of {BLOCK} long, not {shape[-1]}")
    b = x.reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
    xf = b.astype(np.float32)  # ggml's quantizers see float32 input
    m16 = None
    if t.has_min:
        lo_v, hi_v = xf.min(axis=-1, keepdims=True), xf.max(axis=-1, keepdims=True)
        d = (hi_v - lo_v) / np.float32(t.divisor)
        m16 = lo_v.astype(np.float16)
    elif t.signed_max:
        idx = np.abs(xf).argmax(axis=-1)[..., None]
        d = np.take_along_axis(xf, idx, axis=-1) / np.float32(t.divisor)
    else:
        d = np.abs(xf).max(axis=-1, keepdims=True) / np.float32(t.divisor)
    d16 = d.astype(np.float16)
    d32 = d16.astype(np.float32)
    m32 = m16.astype(np.float32) if m16 is not None else np.float32(0.0)
    offset = (1 << (t.bits - 1)) if t.signed_max else (128 if t.bits == 8 else 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = np.where(d32 != 0, (b - m32.astype(np.float64)) / d32.astype(np.float64), 0.0) + offset
    lowest, highest = 0, (255 if t.bits == 8 else t.code_max)
    c0 = np.clip(np.floor(pos), lowest, highest).astype(np.int64)
    c1 = np.clip(c0 + 1, lowest, highest)
    c1 = np.where(pos <= lowest, c0, c1)  # below the range: pinned at the lowest code
    v0, v1 = _dequant_codes(c0 - offset, d32, m32), _dequant_codes(c1 - offset, d32, m32)
    swap = v0 > v1  # a negative d reverses the order of values
    lo, hi = np.where(swap, v1, v0), np.where(swap, v0, v1)
    cl, ch = np.where(swap, c1, c0), np.where(swap, c0, c1)
    return Grid(
        qtype,
        lo.reshape(shape),
        hi.reshape(shape),
        cl.reshape(shape),
        ch.reshape(shape),
        d16[..., 0],
        None if m16 is None else m16[..., 0],
    )


def _k_grid(x: np.ndarray, qtype: str) -> Grid:
    """K-quants: scales as llama.cpp's reference quantizer picks them for x, then the two neighbours."""
    shape = x.shape
    if shape[-1] % kquant.QK_K:
        raise ValueError(f"{qtype} rows must be a multiple of {kquant.QK_K} long, not {shape[-1]}")
    flat = x.reshape(-1, kquant.QK_K)
    s = kquant.scales(flat.astype(np.float32), qtype)
    lo, hi, cl, ch = kquant.neighbours(flat, s)
    return Grid(
        qtype, lo.reshape(shape), hi.reshape(shape), cl.reshape(shape), ch.reshape(shape), None, None, s
    )


def _dequant_codes(k: np.ndarray, d32: np.ndarray, m32) -> np.ndarray:
    """float32 d*k + m, the order of operations ggml's dequantizers use."""
    out = d32 * k.astype(np.float32)
    return out + m32 if isinstance(m32, np.ndarray) else out


def _float_grid(x: np.ndarray, qtype: str) -> Grid:
    dt = numpy_dtype(qtype)
    near = x.astype(np.float32).astype(dt) if dt != np.float32 else x.astype(np.float32)
    nf = near.astype(np.float64)
    other = _step(near, np.where(nf > x, -1, 1), dt)
    lo = np.where(nf > x, other, near).astype(np.float32)
    hi = np.where(nf > x, near, other).astype(np.float32)
    pinned = (nf == x) | ~np.isfinite(other.astype(np.float64))
    lo, hi = np.where(pinned, nf.astype(np.float32), lo), np.where(pinned, nf.astype(np.float32), hi)
    return Grid(qtype, lo, hi, None, None, None, None)


def _step(v: np.ndarray, direction: np.ndarray, dt: np.dtype) -> np.ndarray:
    """The next representable value of dtype dt from v, up (+1) or down (-1)."""
    if dt == np.float32 or dt == np.float16:
        return np.nextafter(v, np.where(direction > 0, np.inf, -np.inf).astype(dt))
    itype = np.uint16
    bits = np.ascontiguousarray(v).view(itype).astype(np.int64)
    neg = (bits >> 15) == 1
    mag = bits & 0x7FFF
    # moving away from zero adds one to the magnitude, towards zero subtracts; -0 / +0 cross over
    away = (direction > 0) != neg
    new_mag = np.where(away, mag + 1, mag - 1)
    cross = (mag == 0) & ~away
    new_bits = np.where(
        cross, np.where(direction > 0, 0x0001, 0x8001), (bits & 0x8000) | np.clip(new_mag, 0, 0x7FFF)
    )
    return new_bits.astype(itype).view(dt)


def _pack_blocks(qtype: str, codes: np.ndarray, d16: np.ndarray, m16: np.ndarray | None) -> np.ndarray:
    t = BLOCK_TYPES[qtype]
    lead = codes.shape[:-1]
    n_blocks = codes.shape[-1] // BLOCK
    q = codes.reshape(-1, n_blocks, BLOCK).astype(np.uint8)
    parts: list[np.ndarray] = [d16.reshape(-1, n_blocks, 1).view(np.uint8)]
    if m16 is not None:
        parts.append(m16.reshape(-1, n_blocks, 1).view(np.uint8))
    if t.bits == 8:
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))  # codes carry +128
    else:
        if t.bits == 5:
            high = ((q >> 4) & 1).astype(np.uint8)
            parts.append(np.packbits(high, axis=-1, bitorder="little"))
        low = q & 0x0F
        parts.append(low[..., : BLOCK // 2] | (low[..., BLOCK // 2 :] << 4))
    out = np.concatenate(parts, axis=-1)
    return out.reshape(*lead, n_blocks * BYTES_PER_BLOCK[qtype])
