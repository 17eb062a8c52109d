"""K-quants (kernels/kquant.py) against llama.cpp: the bytes its reference quantizers write (called in the
libggml-base that llama-cpp-python ships), the gguf package's dequantizers, and the orthogonal rounding
that keeps an ablation on each K grid."""

import ctypes
import os

import numpy as np
import pytest
from patcher_kernels import kquant as K
from patcher_kernels.ggml_quant import grid
from patcher_kernels.ortho_greedy import orthogonal_rounding_rank1

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

TYPES = list(K.KTYPES)
# relative RMS error of llama.cpp's own quantizer on Gaussian weights (measured: 0.298, 0.152, 0.072,
# 0.036, 0.018), with a margin; a wrong scale or a wrong bit layout is far beyond these
ERR_MAX = {"Q2_K": 0.32, "Q3_K": 0.165, "Q4_K": 0.078, "Q5_K": 0.04, "Q6_K": 0.02}
# bytes of the super-block scales (d, dmin, sub-block scales), per type
SCALE_BYTES = {
    "Q2_K": np.r_[0:16, 80:84],
    "Q3_K": np.r_[96:110],
    "Q4_K": np.r_[0:16],
    "Q5_K": np.r_[0:16],
    "Q6_K": np.r_[192:210],
}


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    gauss = rng.standard_normal((256, 512)).astype(np.float32) * 0.02
    laced = np.where(rng.random((64, 512)) < 0.5, 0, rng.standard_normal((64, 512))).astype(np.float32)
    laced[:4] = 0  # all-zero super-blocks
    laced[4:8, :16] = 0  # all-zero sub-blocks
    laced[8:12, :32] = 1.5  # constant sub-blocks
    return {
        "gauss": gauss,
        "heavy": (rng.standard_t(3, (256, 512)) * 0.01).astype(np.float32),
        "positive": np.abs(rng.standard_normal((64, 512))).astype(np.float32),
        "laced": laced,
    }


INPUTS = _inputs()


@pytest.fixture(scope="module")
def ggml():
    """llama.cpp's reference quantizer for a K type: quantize_row_qN_K_ref from llama-cpp-python's
    libggml-base (what llama_model_quantize runs without an importance matrix)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))

    def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        out = np.zeros(x.size // K.QK_K * K.KTYPES[qtype].nbytes, np.uint8)
        fn = getattr(lib, f"quantize_row_{qtype[:2].lower()}_K_ref")
        fn(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(x.size))
        return out.reshape(-1, K.KTYPES[qtype].nbytes)

    return quantize


def _deq(raw: np.ndarray, qtype: str) -> np.ndarray:
    return np.asarray(dequantize(raw, gguf.GGMLQuantizationType[qtype]), dtype=np.float32).reshape(-1, K.QK_K)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("chunk", [100, K.CHUNK], ids=["chunked", "whole"])
def test_bytes_are_llama_cpps(qtype, chunk, ggml, monkeypatch):
    monkeypatch.setattr(K, "CHUNK", chunk)  # the search runs per chunk of super-blocks: no seams
    for name, x in INPUTS.items():
        ours = K.quantize(x, qtype).reshape(-1, K.KTYPES[qtype].nbytes)
        theirs = ggml(x, qtype)
        same = (ours == theirs).all(axis=1)
        assert same.all(), (name, np.nonzero(~same)[0][:5])


@pytest.mark.parametrize("qtype", TYPES)
def test_written_bytes_dequantize_within_the_types_error(qtype):
    x = INPUTS["gauss"]
    raw = K.quantize(x, qtype)
    assert raw.shape == (x.shape[0], x.shape[1] // K.QK_K * K.KTYPES[qtype].nbytes)
    back = _deq(raw, qtype).reshape(x.shape)
    assert np.linalg.norm(back - x) / np.linalg.norm(x) <= ERR_MAX[qtype]
    # the values the kernel says it wrote are exactly what the gguf package reads back
    flat = x.reshape(-1, K.QK_K)
    s = K.scales(flat, qtype)
    assert np.array_equal(K.values(K.reference_codes(flat, s), s), back.reshape(-1, K.QK_K))
    # neighbours: adjacent codes around every value inside the grid, nearest of the two as ggml rounds
    lo, hi, cl, ch = K.neighbours(flat.astype(np.float64), s)
    inside = (lo <= flat) & (flat <= hi)
    assert inside.mean() > 0.85  # Q2_K's fitted range clips 13 % of Gaussian values, the others less
    ends = (cl == ch) & ((cl == 0) | (cl == K.KTYPES[qtype].code_max))
    assert np.all(inside | ends)  # what falls outside is pinned at an end of the grid
    assert np.all(np.abs(ch - cl) <= 1) and np.all(lo <= hi)
    near = np.where(np.abs(hi.astype(np.float64) - flat) < np.abs(flat - lo.astype(np.float64)), hi, lo)
    assert np.mean(near == back.reshape(-1, K.QK_K)) > 0.999


@pytest.mark.parametrize("qtype", TYPES)
def test_llama_cpp_blocks_round_trip(qtype, ggml):
    """llama.cpp's blocks, dequantized and quantized again: byte-identical wherever the scale search lands
    on the same scales; where it does not, llama.cpp's own quantizer moves them the same way (its search
    over trial scales does not contain the stored one: re-quantizing is not idempotent in ggml either)."""
    x = INPUTS["gauss"]
    blocks = ggml(x, qtype)
    values = _deq(blocks, qtype)
    ours = K.quantize(values, qtype).reshape(blocks.shape)
    assert np.array_equal(ours, ggml(values, qtype))
    kept = (ours[:, SCALE_BYTES[qtype]] == blocks[:, SCALE_BYTES[qtype]]).all(axis=1)
    assert kept.mean() > 0.45  # measured 0.52 (Q3_K) to 0.998 (Q4_K)
    assert np.array_equal(ours[kept], blocks[kept])


def _ablation(qtype: str, prequantized: bool):
    rng = np.random.default_rng(3)
    d, n = 512, 1024  # residual axis 0 (a writer as GGUF stores it: [d_model, fan_in], rows of fan_in)
    r = rng.standard_normal(d)
    r /= np.linalg.norm(r)
    w = rng.standard_normal((d, n)) * 0.02
    if prequantized:  # the model as shipped: every weight already on the K grid
        w = _deq(K.quantize(w, qtype), qtype).reshape(d, n).astype(np.float64)
    comp = r @ w
    x = w - np.outer(r, comp)
    g = grid(x, qtype)
    result = {}
    for how, choice in (
        ("nearest", g.nearest(x)),
        ("written", orthogonal_rounding_rank1(x, g.lo, g.hi, r, 0)),
    ):
        stored = _deq(g.pack(choice), qtype).reshape(d, n).astype(np.float64)
        assert np.array_equal(stored.astype(np.float32), g.values(choice))
        result[how] = (
            np.linalg.norm(r @ stored) / np.linalg.norm(comp),
            np.linalg.norm(stored - x) / np.linalg.norm(x),
        )
    return result


# weight error of the orthogonal rounding over plain re-rounding, measured here (Gaussian: 1.00x for every
# type; pre-quantized: 2.00x Q2_K, 1.44x Q3_K, 1.23x Q4_K, 1.03x Q5_K, 1.01x Q6_K: the weights sit on the
# grid, so plain rounding's error is small and the flips that remove the residual dominate it)
PREQUANT_ERROR_MAX = {"Q2_K": 2.3, "Q3_K": 1.6, "Q4_K": 1.4, "Q5_K": 1.1, "Q6_K": 1.05}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("prequantized", [False, True], ids=["gaussian", "prequantized"])
def test_orthogonal_rounding_keeps_the_ablation_on_k_grids(qtype, prequantized):
    r = _ablation(qtype, prequantized)
    (leak_plain, err_plain), (leak, err) = r["nearest"], r["written"]
    assert leak <= 0.01, leak
    assert leak_plain > 10 * leak  # plain re-rounding puts the component back; this is not vacuous
    assert err <= (PREQUANT_ERROR_MAX[qtype] if prequantized else 1.25) * err_plain, err / err_plain


def test_rows_must_hold_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        K.quantize(np.zeros((2, 128), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="multiple of 256"):
        grid(np.zeros((2, 288)), "Q6_K")
