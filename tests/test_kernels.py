"""Every kernel against an independent float64 reference."""
import ml_dtypes
import numpy as np
import pytest

from patcher_kernels import (FP8_MAX, ablate_blocks, bias_inject, bias_project, block_amax, decode, dequantize_blocks, encode,
                     orthonormalize, project_full, quantize_blocks, requantize_scale, ulp_distance)

rng = np.random.default_rng(7)


def ref_projector(v):
    """Orthogonal projector onto span(v) built without QR: V (VᵀV)⁻¹ Vᵀ."""
    V = np.atleast_2d(np.asarray(v, dtype=np.float64)).T
    return V @ np.linalg.solve(V.T @ V, V.T)


@pytest.mark.parametrize("k", [1, 3])
def test_orthonormalize_spans_input(k):
    v = rng.standard_normal((k, 40))
    q = orthonormalize(v)
    assert q.shape == (40, k)
    np.testing.assert_allclose(q.T @ q, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(q @ q.T, ref_projector(v), atol=1e-12)
    if k == 1:
        np.testing.assert_allclose(q[:, 0], v[0] / np.linalg.norm(v[0]), atol=1e-12)


def test_orthonormalize_rejects_degenerate():
    with pytest.raises(ValueError):
        orthonormalize(np.zeros(8))
    v = rng.standard_normal(8)
    with pytest.raises(ValueError):
        orthonormalize(np.stack([v, 2 * v]))
    with pytest.raises(ValueError):
        orthonormalize(np.array([1.0, np.nan]))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_ablate_blocks_matches_float64(axis, k, scale):
    d, other = 48, 70
    w = rng.standard_normal((d, other) if axis == 0 else (other, d)).astype(np.float32)
    v = rng.standard_normal((k, d))
    P = ref_projector(v)
    want = w - scale * P @ w if axis == 0 else w - scale * w @ P
    q = orthonormalize(v)
    stats = {}
    got = np.concatenate([out for _, _, out in
                          ablate_blocks(lambda s, e: w[s:e].astype(np.float32), w.shape[0], q, axis, scale,
                                        block_rows=16, stats=stats)])
    np.testing.assert_allclose(got, want, atol=2e-5)
    comp = np.linalg.norm(q.T @ w) if axis == 0 else np.linalg.norm(w @ q)
    assert stats["component_sq"] == pytest.approx(comp ** 2, rel=1e-5)
    np.testing.assert_allclose(project_full(w, q, axis, scale), want, atol=1e-10)


@pytest.mark.parametrize("axis", [0, 1])
def test_norm_preserve_cols_keeps_written_vectors_and_exactness(axis):
    d, other = 32, 50
    w = rng.standard_normal((d, other) if axis == 0 else (other, d)).astype(np.float32)
    v = rng.standard_normal(d)
    q = orthonormalize(v)
    got = np.concatenate([o for _, _, o in ablate_blocks(lambda s, e: w[s:e].copy(), w.shape[0], q, axis,
                                                         preserve="cols", block_rows=7)]).astype(np.float64)
    written_axis = 0 if axis == 0 else 1  # norms taken along the residual axis
    np.testing.assert_allclose(np.linalg.norm(got, axis=written_axis),
                               np.linalg.norm(w.astype(np.float64), axis=written_axis), rtol=1e-5)
    # still exactly orthogonal to r
    comp = q[:, 0] @ got if axis == 0 else got @ q[:, 0]
    assert np.max(np.abs(comp)) < 1e-4
    # direction of each written vector equals the plain projection's
    plain = project_full(w, q, axis)
    cos = np.sum(got * plain, axis=written_axis) / (np.linalg.norm(got, axis=written_axis) *
                                                    np.linalg.norm(plain, axis=written_axis))
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_norm_preserve_rows_keeps_coordinate_rows(axis):
    d, other = 32, 50
    w = rng.standard_normal((d, other) if axis == 0 else (other, d)).astype(np.float32)
    q = orthonormalize(rng.standard_normal(d))
    got = np.concatenate([o for _, _, o in ablate_blocks(lambda s, e: w[s:e].copy(), w.shape[0], q, axis,
                                                         preserve="rows", block_rows=9)]).astype(np.float64)
    coord_axis = 1 if axis == 0 else 0  # each residual coordinate's slice
    np.testing.assert_allclose(np.linalg.norm(got, axis=coord_axis),
                               np.linalg.norm(w.astype(np.float64), axis=coord_axis), rtol=1e-5)


def test_bias_kernels():
    b = rng.standard_normal(20)
    v = rng.standard_normal(20)
    q = orthonormalize(v)
    np.testing.assert_allclose(bias_project(b, q), b - ref_projector(v) @ b, atol=1e-12)
    np.testing.assert_allclose(bias_project(b, q, 0.25), b - 0.25 * ref_projector(v) @ b, atol=1e-12)
    np.testing.assert_allclose(bias_inject(b, v, 3.0), b + 3.0 * v)
    np.testing.assert_allclose(bias_inject(None, v, -2.0), -2.0 * v)


@pytest.mark.parametrize("name,mldt", [("BF16", ml_dtypes.bfloat16), ("F16", np.float16),
                                       ("F8_E4M3", ml_dtypes.float8_e4m3fn), ("F8_E5M2", ml_dtypes.float8_e5m2)])
def test_codecs_round_to_nearest_even(name, mldt):
    x = (rng.standard_normal(5000) * 4).astype(np.float32).astype(np.float64)  # exactly representable input
    enc = encode(x.astype(np.float32), name, saturate=True)
    assert enc.dtype == np.dtype(mldt)
    # nearest: no representable neighbour is closer than the chosen value
    back = decode(enc, np.float64)
    # nearest: compare with every finite value of the type (enumerated from its bit patterns)
    bits = np.arange(2 ** (8 * np.dtype(mldt).itemsize)).astype({1: np.uint8, 2: np.uint16}[np.dtype(mldt).itemsize])
    with np.errstate(invalid="ignore"):
        all_vals = bits.view(mldt).astype(np.float64)
    all_vals = np.unique(all_vals[np.isfinite(all_vals)])
    idx = np.clip(np.searchsorted(all_vals, x), 1, len(all_vals) - 1)
    nearest_dist = np.minimum(np.abs(all_vals[idx] - x), np.abs(all_vals[idx - 1] - x))
    inside = np.abs(x) <= all_vals.max()
    np.testing.assert_array_equal(np.abs(back - x)[inside], nearest_dist[inside])
    # ties go to even mantissa: 1 + half an ulp of bf16 rounds down to 1.0
    if name == "BF16":
        assert float(encode(np.array([1 + 2.0 ** -8], np.float32), "BF16")[0]) == 1.0
        assert float(encode(np.array([1 + 3 * 2.0 ** -8], np.float32), "BF16")[0]) == 1 + 2.0 ** -6


def test_ulp_distance():
    a = np.array([1.0, -1.0, 0.0, 2.0], dtype=ml_dtypes.bfloat16)
    b = np.array([1.0078125, -1.0078125, -0.0, 2.0], dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ulp_distance(a, b, "BF16"), [1, 1, 0, 0])


def test_fp8_block_roundtrip_and_requantize():
    w = rng.standard_normal((300, 200)).astype(np.float32)
    scale = block_amax(w) / FP8_MAX
    assert scale.shape == (3, 2)
    # independent reference for the tile max
    np.testing.assert_allclose(scale[1, 1], np.abs(w[128:256, 128:200]).max() / FP8_MAX)
    q = quantize_blocks(w, scale)
    back = dequantize_blocks(q, scale)
    assert np.max(np.abs(back - w) / (np.abs(w) + 1e-3)) < 0.07  # e4m3: 3 mantissa bits
    # an edit that grows a tile beyond 448*scale must raise that tile's scale, and only that one
    edited = back.copy()
    edited[0, 0] = 2 * np.abs(w[:128, :128]).max()
    new = requantize_scale(scale, edited)
    assert new[0, 0] == pytest.approx(edited[0, 0] / FP8_MAX)
    np.testing.assert_array_equal(new.ravel()[1:], scale.ravel()[1:])
    q2 = quantize_blocks(edited, new)
    assert np.all(np.isfinite(q2.astype(np.float32)))
    # values past 448 clip instead of turning into NaN
    assert np.isfinite(quantize_blocks(np.full((2, 2), 1e6, np.float32), np.ones((1, 1), np.float32)).astype(np.float32)).all()


def test_fp8_max_matches_ml_dtypes():
    assert FP8_MAX == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
