"""GGML K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): super-blocks of 256 elements, scales chosen the way
llama.cpp's reference quantizers choose them (ggml-quants.c, quantize_row_qN_K_ref, which
llama_model_quantize uses when no importance matrix is given), then each element's two neighbouring values
under those scales, and the bytes for any choice of codes.

Layouts (bytes per super-block), value of an element with stored code c in sub-block j:
  Q2_K  84: scales[16] (4-bit sc | 4-bit m << 4), qs[64] (2 bits), d, dmin     v = d·sc_j·c − dmin·m_j
  Q3_K 110: hmask[32] (3rd bit), qs[64], scales[12] (16 × 6 bits, +32), d      v = d·(s_j − 32)·(c − 4)
  Q4_K 144: d, dmin, scales[12] (8 × 6-bit sc and m), qs[128] (4 bits)          v = d·sc_j·c − dmin·m_j
  Q5_K 176: d, dmin, scales[12], qh[32] (5th bit), qs[128]                      v = d·sc_j·c − dmin·m_j
  Q6_K 210: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d      v = d·sc_j·(c − 32)
d and dmin are float16; values are formed in float32 as (d·sc)·c − (dmin·m), the order of the gguf
package's dequantizers (which the caller checks the bytes against).

The scale search reproduces ggml's float32 arithmetic (sums accumulated left to right, round half to even),
vectorized over all sub-blocks at once, so the bytes match llama.cpp's quantizer on almost every block.
Pure numpy: no files, no names.
"""

from dataclasses import dataclass

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)


@dataclass(frozen=True)
class KType:
    sub: int  # elements per sub-block
    offset: int  # stored code − offset = the multiplier of the sub-block scale
    code_max: int  # codes run 0..code_max
    has_min: bool  # a per-sub-block minimum (dmin·m) is subtracted
    nbytes: int  # bytes per super-block


KTYPES = {
    "Q2_K": KType(16, 0, 3, True, 84),
    "Q3_K": KType(16, 4, 7, False, 110),
    "Q4_K": KType(32, 0, 15, True, 144),
    "Q5_K": KType(32, 0, 31, True, 176),
    "Q6_K": KType(16, 32, 63, False, 210),
}


@dataclass
class KScales:
    """One tensor's scales, [B] per super-block and [B, n_sub] per sub-block; `codes` are the codes the
    sub-block search left ([B, 256]; what ggml stores where a sub-block's scale rounds to zero)."""

    qtype: str
    d16: np.ndarray  # float16 [B]
    dmin16: np.ndarray | None  # float16 [B] (types with a minimum)
    sc: np.ndarray  # int [B, n_sub]: stored sub-scale (Q3_K: 0..63 with +32, Q6_K: int8)
    m: np.ndarray | None  # int [B, n_sub]: stored sub-minimum
    codes: np.ndarray

    @property
    def step(self) -> np.ndarray:
        """float32 [B, n_sub]: d times the sub-block scale, as ggml's dequantizers form it."""
        sc = self.sc - 32 if self.qtype == "Q3_K" else self.sc
        return self.d16.astype(np.float32)[:, None] * sc.astype(np.float32)

    @property
    def shift(self) -> np.ndarray:
        """float32 [B, n_sub]: what is subtracted (dmin times the sub-block minimum), 0 without one."""
        if self.m is None or self.dmin16 is None:
            return np.zeros(self.sc.shape, np.float32)
        return self.dmin16.astype(np.float32)[:, None] * self.m.astype(np.float32)


def _sum(a: np.ndarray) -> np.ndarray:
    """float32 sum over axis 0 of a [n, N] (sub-blocks as columns), left to right as ggml's loops
    accumulate (numpy's own sum is pairwise, which rounds differently); n is 16 or 32."""
    total = a[0].astype(np.float32)
    for row in a[1:]:
        total += row
    return total


def _nearest(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """ggml's nearest_int (round half to even) clamped to [lo, hi], as float32."""
    with np.errstate(invalid="ignore"):
        return np.clip(np.rint(v), lo, hi).astype(np.float32)


# The three searches below take sub-blocks as columns, x [n, N]: every step is then a few passes over
# contiguous rows of N values, and the sums run down the columns in ggml's order.


def _qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool):
    """make_qkx2_quants for each column of x [n, N]: (scale [N], min [N] (subtracted, >= 0), codes)."""
    f32 = np.float32
    mn = x.min(axis=0)
    mn = np.where(mn > 0, f32(0), mn)
    mx = x.max(axis=0)
    flat = mx == mn
    sum_w, sum_x = _sum(w), _sum(w * x)

    def error(scale, mins, codes):
        diff = scale * codes + mins - x
        return _sum(w * (np.abs(diff) if mad else diff * diff))

    span = np.where(flat, f32(1), mx - mn)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    codes = _nearest(iscale * (x - mn), 0, nmax)
    best = error(scale, mn, codes)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            # ggml searches from the best (scale, min) so far: span and offsets move with it
            span = np.where(flat, f32(1), mx - mn)
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
            aux = _nearest(iscale * (x - mn), 0, nmax)
            wl = w * aux
            sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * aux), _sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clip = this_min > 0
            this_min = np.where(clip, f32(0), this_min)
            this_scale = np.where(clip, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, aux)
            better = (det > 0) & (cur < best) & ~flat
            codes = np.where(better, aux, codes)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    codes = np.where(flat, f32(0), codes)
    return np.where(flat, f32(0), scale), -mn, codes


def _signed_max(x):
    """Per column of x [n, N]: (the element of largest magnitude with its sign, that magnitude), the first
    one on ties."""
    idx = np.abs(x).argmax(axis=0)
    mx = np.take_along_axis(x, idx[None, :], axis=0)[0]
    return mx, np.abs(mx)


def _qx(x, nmax: int):
    """make_qx_quants with rmse_type 1 and no importance weights (Q6_K), per column of x [n, N]:
    (scale [N], codes [n, N])."""
    f32 = np.float32
    mx, amax = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, f32(1), mx)
    w = x * x
    wx = w * x

    def attempt(iscale):
        l = _nearest(iscale * x, -nmax, nmax - 1)
        return l, _sum(wx * l), _sum(w * l * l)

    codes, sumlx, suml2 = attempt(f32(-nmax) / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            l, sumlx, suml2 = attempt(-(f32(nmax) + f32(0.1) * f32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            codes = np.where(better, l, codes)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    codes = np.where(zero, f32(0), codes + nmax)
    return np.where(zero, f32(0), scale), codes


def _q3(x, nmax: int = 4, tries: int = 5):
    """make_q3_quants with do_rmse (Q3_K), per column of x [n, N]: element by element improvement. A
    sub-block that changed nothing in a pass changes nothing in the next, so running every pass on every
    sub-block is what ggml's early exit does."""
    f32 = np.float32
    mx, amax = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, f32(1), mx)
    codes = _nearest((f32(-nmax) / mx) * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = _sum(wx * codes), _sum(w * codes * codes)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(tries):
            for i in range(x.shape[0]):
                li, xi, wi = codes[i], x[i], w[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - wi * li * li
                new = _nearest(xi * sl2 / slx, -nmax, nmax - 1)
                slx_new = slx + wx[i] * new
                sl2_new = sl2 + wi * new * new
                take = (
                    (slx > 0)
                    & (new != li)
                    & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                )
                codes[i] = np.where(take, new, li)
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    codes = np.where(zero, f32(0), codes + nmax)
    return np.where(zero, f32(0), scale), codes


def _to_f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float32).astype(np.float16)


def _byte(v: np.ndarray) -> np.ndarray:
    """nearest_int stored into a uint8, as C's conversion wraps it."""
    with np.errstate(invalid="ignore"):
        return (np.rint(v).astype(np.int64) & 0xFF).astype(np.int64)


def _scales_with_min(x, qtype: str) -> KScales:
    """Q2_K, Q4_K, Q5_K: a (scale, min) pair per sub-block, both quantized against the super-block's
    largest (4 bits for Q2_K, 6 bits for Q4_K/Q5_K)."""
    t = KTYPES[qtype]
    f32 = np.float32
    b = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(-1, t.sub).T)  # sub-blocks as columns
    if qtype == "Q2_K":
        sc, mins, codes = _qkx2(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        levels = 15
    else:
        av = np.sqrt(_sum(xs * xs) / f32(t.sub))
        rmin, nstep = (-1.0, 20) if qtype == "Q4_K" else (-0.5, 15)
        sc, mins, codes = _qkx2(xs, av + np.abs(xs), t.code_max, rmin, 0.1, nstep, False)
        levels = 63
    sc, mins = sc.reshape(b, -1), mins.reshape(b, -1)
    max_scale = np.maximum(sc.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, f32(levels) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(levels) / max_min, f32(0))
    ls, lm = _byte(inv_scale[:, None] * sc), _byte(inv_min[:, None] * mins)
    if qtype == "Q2_K":  # 4-bit fields: no clamp in ggml (the largest is 15 by construction)
        ls, lm = ls & 0xF, lm & 0xF
        ls = np.where(max_scale[:, None] > 0, ls, 0)
        lm = np.where(max_min[:, None] > 0, lm, 0)
    else:
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    d16 = _to_f16(max_scale / f32(levels))
    dmin16 = _to_f16(max_min / f32(levels))
    return KScales(qtype, d16, dmin16, ls, lm, codes.T.reshape(b, QK_K).astype(np.int64))


def _scales_signed(x, qtype: str) -> KScales:
    """Q3_K, Q6_K: one signed scale per sub-block of 16, quantized against the super-block's largest in
    magnitude (6 bits + 32 for Q3_K, int8 for Q6_K)."""
    f32 = np.float32
    b = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(-1, 16).T)  # sub-blocks as columns
    if qtype == "Q3_K":
        sc, codes = _q3(xs)
        levels, lo, hi = 32, -32, 31
    else:
        sc, codes = _qx(xs, 32)
        levels, lo, hi = 128, -128, 127
    sc = sc.reshape(b, 16)
    max_scale, amax = _signed_max(sc.T)
    live = amax >= GROUP_MAX_EPS if qtype == "Q6_K" else max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(live, f32(-levels) / np.where(live, max_scale, f32(1)), f32(0))
        d = np.where(live, f32(1) / np.where(live, iscale, f32(1)), f32(0))
        ls = np.rint(iscale[:, None] * sc)
    ls = np.clip(np.nan_to_num(ls), lo, hi).astype(np.int64)
    ls = np.where(live[:, None], ls, 0)
    codes = codes.T.reshape(b, QK_K).astype(np.int64)
    if qtype == "Q3_K":
        ls = ls + 32  # stored with +32; a dead block stores 0 (its d is 0)
        ls = np.where(live[:, None], ls, 0)
    else:
        codes = np.where(live[:, None], codes, 0)  # ggml clears a dead Q6_K block entirely
    return KScales(qtype, _to_f16(d), None, ls, None, codes)


CHUNK = 1024  # super-blocks searched at once: the search's temporaries stay in cache (2-3x faster)


def scales(x: np.ndarray, qtype: str) -> KScales:
    """Super-block and sub-block scales for values x [B, 256] (float32, as ggml's quantizers see them)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK_K)
    search = _scales_with_min if KTYPES[qtype].has_min else _scales_signed
    if len(x) <= CHUNK:
        return search(x, qtype)
    parts = [search(x[i : i + CHUNK], qtype) for i in range(0, len(x), CHUNK)]
    return KScales(
        qtype,
        np.concatenate([p.d16 for p in parts]),
        _concatenate_present([p.dmin16 for p in parts]),
        np.concatenate([p.sc for p in parts]),
        _concatenate_present([p.m for p in parts]),
        np.concatenate([p.codes for p in parts]),
    )


def _concatenate_present(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    """The parts joined, or None for a field the type lacks (then every part lacks it)."""
    present = [a for a in arrays if a is not None]
    return np.concatenate(present) if present else None


def _per_element(a: np.ndarray, sub: int) -> np.ndarray:
    return np.repeat(a, sub, axis=1)


def reference_codes(x: np.ndarray, s: KScales) -> np.ndarray:
    """The codes ggml stores for x [B, 256] under scales s: nearest_int((x + m)/step), clamped, where a
    sub-block's step is 0 the search's own codes."""
    t = KTYPES[s.qtype]
    x = np.asarray(x, dtype=np.float32).reshape(-1, QK_K)
    step, shift = _per_element(s.step, t.sub), _per_element(s.shift, t.sub)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = (x + shift) / step if t.has_min else x / step
    c = _nearest(np.where(step != 0, pos, 0), -t.offset, t.code_max - t.offset).astype(np.int64) + t.offset
    return np.where(step != 0, c, s.codes)


def values(codes: np.ndarray, s: KScales) -> np.ndarray:
    """float32 values of codes [B, 256], formed as the gguf package's dequantizers form them."""
    t = KTYPES[s.qtype]
    step, shift = _per_element(s.step, t.sub), _per_element(s.shift, t.sub)
    return step * (codes - t.offset).astype(np.float32) - shift


def neighbours(x: np.ndarray, s: KScales) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, code_lo, code_hi) per element of exact values x [B, 256] (float64): the two grid values
    around x under scales s, equal where x is beyond the grid or the sub-block's step is 0."""
    t = KTYPES[s.qtype]
    x = np.asarray(x, dtype=np.float64).reshape(-1, QK_K)
    step = _per_element(s.step, t.sub).astype(np.float64)
    shift = _per_element(s.shift, t.sub).astype(np.float64)
    live = step != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = np.where(live, (x + shift) / np.where(live, step, 1.0), 0.0) + t.offset
    c0 = np.clip(np.floor(pos), 0, t.code_max).astype(np.int64)
    c1 = np.where(pos <= 0, c0, np.minimum(c0 + 1, t.code_max))
    c0, c1 = np.where(live, c0, s.codes), np.where(live, c1, s.codes)
    v0, v1 = values(c0, s), values(c1, s)
    swap = v0 > v1  # a negative step (Q3_K, Q6_K) reverses the order of values
    return (
        np.where(swap, v1, v0),
        np.where(swap, v0, v1),
        np.where(swap, c1, c0),
        np.where(swap, c0, c1),
    )


def _pack_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit minimums in 12 bytes (low six bits of bytes 0-7 hold
    the first four of each, bytes 8-11 the low nibbles of the last four, whose top two bits ride in the top
    of bytes 0-7)."""
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return np.concatenate(
        [lo_s | (hi_s >> 4) << 6, lo_m | (hi_m >> 4) << 6, (hi_s & 0xF) | (hi_m & 0xF) << 4], axis=1
    )


def _pack_q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales in 12 bytes: low nibbles two per byte (j, j+8), top two bits of scale
    4g+k at bits 2g of byte 8+k."""
    low = (s[:, :8] & 0xF) | (s[:, 8:] & 0xF) << 4
    high = np.bitwise_or.reduce([((s[:, 4 * g : 4 * g + 4] >> 4) & 3) << (2 * g) for g in range(4)])
    return np.concatenate([low, high], axis=1)


def _crumbs(codes: np.ndarray) -> np.ndarray:
    """2-bit fields: each 128 elements in 32 bytes, element 32k+l at bits 2k of byte l."""
    c = (codes & 3).reshape(-1, QK_K // 128, 4, 32)
    return np.bitwise_or.reduce([c[:, :, k] << (2 * k) for k in range(4)]).reshape(-1, QK_K // 4)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit fields (Q4_K/Q5_K): each 64 elements in 32 bytes, the second 32 in the high nibbles."""
    c = (codes & 0xF).reshape(-1, QK_K // 64, 2, 32)
    return (c[:, :, 0] | c[:, :, 1] << 4).reshape(-1, QK_K // 2)


def _bitplane(bit: np.ndarray) -> np.ndarray:
    """One bit per element: element 32k+l at bit k of byte l."""
    return np.packbits(
        bit.reshape(-1, 8, 32).transpose(0, 2, 1).astype(np.uint8), axis=-1, bitorder="little"
    ).reshape(-1, 32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _minimums(s: KScales) -> tuple[np.ndarray, np.ndarray]:
    """(dmin16, m) of a type with a per-sub-block minimum."""
    if s.dmin16 is None or s.m is None:
        raise ValueError(f"{s.qtype} scales lack their minimums")
    return s.dmin16, s.m


def pack(codes: np.ndarray, s: KScales) -> np.ndarray:
    """uint8 [B, nbytes]: super-blocks of codes [B, 256] (stored codes, 0..code_max) under scales s."""
    c = np.asarray(codes, dtype=np.int64).reshape(-1, QK_K)
    q = s.qtype
    if q == "Q2_K":
        dmin16, m = _minimums(s)
        parts = [s.sc | m << 4, _crumbs(c), _f16_bytes(s.d16), _f16_bytes(dmin16)]
    elif q == "Q3_K":
        parts = [_bitplane(c >> 2 & 1), _crumbs(c), _pack_q3_scales(s.sc), _f16_bytes(s.d16)]
    elif q in ("Q4_K", "Q5_K"):
        dmin16, m = _minimums(s)
        parts = [_f16_bytes(s.d16), _f16_bytes(dmin16), _pack_6bit(s.sc, m)]
        parts += [_bitplane(c >> 4 & 1)] if q == "Q5_K" else []
        parts.append(_nibbles(c))
    else:  # Q6_K: each 128 elements: ql 64 bytes (quarters 0,1 low nibbles; 2,3 high), qh 32 bytes
        h = c.reshape(-1, 2, 4, 32)
        ql = np.concatenate(
            [h[:, :, 0] & 0xF | (h[:, :, 2] & 0xF) << 4, h[:, :, 1] & 0xF | (h[:, :, 3] & 0xF) << 4], axis=2
        )
        qh = np.bitwise_or.reduce([(h[:, :, k] >> 4) << (2 * k) for k in range(4)])
        parts = [
            ql.reshape(-1, 128),
            qh.reshape(-1, 64),
            s.sc.astype(np.int8).view(np.uint8),
            _f16_bytes(s.d16),
        ]
    out = np.concatenate([np.asarray(p).astype(np.uint8) for p in parts], axis=1)
    assert out.shape[1] == KTYPES[q].nbytes
    return out


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """What llama.cpp's reference quantizer writes for x [..., n] (n a multiple of 256): uint8
    [..., n/256 * nbytes]."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"{qtype} rows must be a multiple of {QK_K} long, not {x.shape[-1]}")
    flat = x.reshape(-1, QK_K)
    s = scales(flat, qtype)
    out = pack(reference_codes(flat, s), s)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * KTYPES[qtype].nbytes)
