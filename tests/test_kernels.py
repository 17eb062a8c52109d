"""Every kernel against an independent float64 reference."""

import ml_dtypes
import numpy as np
import pytest
from patcher_kernels.codecs import decode, encode, ulp_distance
from patcher_kernels.fp8 import FP8_MAX, block_amax, dequantize_blocks, quantize_blocks, requantize_scale
from patcher_kernels.project import bias_inject, bias_project, orthonormalize, project_full
from patcher_kernels.stream import ablate_blocks

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
    with pytest.raises(ValueError, match="^direction contains NaN or Inf$"):
        orthonormalize(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="^directions are zero or linearly dependent$"):
        orthonormalize(np.stack([v, -3 * v]))


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
    got = np.concatenate(
        [
            out
            for _, _, out in ablate_blocks(
                lambda s, e: w[s:e].astype(np.float32), w.shape[0], q, axis, scale, block_rows=16, stats=stats
            )
        ]
    )
    np.testing.assert_allclose(got, want, atol=2e-5)
    comp = np.linalg.norm(q.T @ w) if axis == 0 else np.linalg.norm(w @ q)
    assert stats["component_sq"] == pytest.approx(comp**2, rel=1e-5)
    np.testing.assert_allclose(project_full(w, q, axis, scale), want, atol=1e-10)


@pytest.mark.parametrize("axis", [0, 1])
def test_norm_preserve_cols_keeps_written_vectors_and_exactness(axis):
    d, other = 32, 50
    w = rng.standard_normal((d, other) if axis == 0 else (other, d)).astype(np.float32)
    v = rng.standard_normal(d)
    q = orthonormalize(v)
    got = np.concatenate(
        [
            o
            for _, _, o in ablate_blocks(
                lambda s, e: w[s:e].copy(), w.shape[0], q, axis, preserve="cols", block_rows=7
            )
        ]
    ).astype(np.float64)
    written_axis = 0 if axis == 0 else 1  # norms taken along the residual axis
    np.testing.assert_allclose(
        np.linalg.norm(got, axis=written_axis),
        np.linalg.norm(w.astype(np.float64), axis=written_axis),
        rtol=1e-5,
    )
    # still exactly orthogonal to r
    comp = q[:, 0] @ got if axis == 0 else got @ q[:, 0]
    assert np.max(np.abs(comp)) < 1e-4
    # direction of each written vector equals the plain projection's
    plain = project_full(w, q, axis)
    cos = np.sum(got * plain, axis=written_axis) / (
        np.linalg.norm(got, axis=written_axis) * np.linalg.norm(plain, axis=written_axis)
    )
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_norm_preserve_rows_keeps_coordinate_rows(axis):
    d, other = 32, 50
    w = rng.standard_normal((d, other) if axis == 0 else (other, d)).astype(np.float32)
    q = orthonormalize(rng.standard_normal(d))
    got = np.concatenate(
        [
            o
            for _, _, o in ablate_blocks(
                lambda s, e: w[s:e].copy(), w.shape[0], q, axis, preserve="rows", block_rows=9
            )
        ]
    ).astype(np.float64)
    coord_axis = 1 if axis == 0 else 0  # each residual coordinate's slice
    np.testing.assert_allclose(
        np.linalg.norm(got, axis=coord_axis), np.linalg.norm(w.astype(np.float64), axis=coord_axis), rtol=1e-5
    )


def test_bias_kernels():
    b = rng.standard_normal(20)
    v = rng.standard_normal(20)
    q = orthonormalize(v)
    np.testing.assert_allclose(bias_project(b, q), b - ref_projector(v) @ b, atol=1e-12)
    np.testing.assert_allclose(bias_project(b, q, 0.25), b - 0.25 * ref_projector(v) @ b, atol=1e-12)
    np.testing.assert_allclose(bias_inject(b, v, 3.0), b + 3.0 * v)
    np.testing.assert_allclose(bias_inject(None, v, -2.0), -2.0 * v)


@pytest.mark.parametrize(
    "name,mldt",
    [
        ("BF16", ml_dtypes.bfloat16),
        ("F16", np.float16),
        ("F8_E4M3", ml_dtypes.float8_e4m3fn),
        ("F8_E5M2", ml_dtypes.float8_e5m2),
    ],
)
def test_codecs_round_to_nearest_even(name, mldt):
    x = (rng.standard_normal(5000) * 4).astype(np.float32).astype(np.float64)  # exactly representable input
    enc = encode(x.astype(np.float32), name, saturate=True)
    assert enc.dtype == np.dtype(mldt)
    # nearest: no representable neighbour is closer than the chosen value
    back = decode(enc, np.float64)
    # nearest: compare with every finite value of the type (enumerated from its bit patterns)
    bits = np.arange(2 ** (8 * np.dtype(mldt).itemsize)).astype(
        {1: np.uint8, 2: np.uint16}[np.dtype(mldt).itemsize]
    )
    with np.errstate(invalid="ignore"):
        all_vals = bits.view(mldt).astype(np.float64)
    all_vals = np.unique(all_vals[np.isfinite(all_vals)])
    idx = np.clip(np.searchsorted(all_vals, x), 1, len(all_vals) - 1)
    nearest_dist = np.minimum(np.abs(all_vals[idx] - x), np.abs(all_vals[idx - 1] - x))
    inside = np.abs(x) <= all_vals.max()
    np.testing.assert_array_equal(np.abs(back - x)[inside], nearest_dist[inside])
    # ties go to even mantissa: 1 + half an ulp of bf16 rounds down to 1.0
    if name == "BF16":
        assert float(encode(np.array([1 + 2.0**-8], np.float32), "BF16")[0]) == 1.0
        assert float(encode(np.array([1 + 3 * 2.0**-8], np.float32), "BF16")[0]) == 1 + 2.0**-6


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
    assert np.isfinite(
        quantize_blocks(np.full((2, 2), 1e6, np.float32), np.ones((1, 1), np.float32)).astype(np.float32)
    ).all()


# --- numbers that pin each kernel down (written to kill surviving mutants; see docs/testing.md) ---


def test_orthonormalize_aligns_every_column_with_its_direction():
    v = rng.standard_normal((3, 24))
    q = orthonormalize(v)
    # Gram-Schmidt order and sign: column j is the part of v_j orthogonal to v_0..v_{j-1}, pointing along v_j
    for j in range(3):
        rest = v[j] - ref_projector(v[:j]) @ v[j] if j else v[j]
        np.testing.assert_allclose(q[:, j], rest / np.linalg.norm(rest), atol=1e-12)
    # a single direction given as [d] or [1, d]; a tiny but independent one is still accepted
    np.testing.assert_allclose(orthonormalize(v[0]), orthonormalize(v[:1]), atol=0)
    small = np.stack([v[0], v[0] + 1e-6 * v[1]])
    assert orthonormalize(small).shape == (24, 2)
    with pytest.raises(ValueError):
        orthonormalize(np.zeros((0, 4)))
    with pytest.raises(ValueError):
        orthonormalize(np.array([1.0, np.inf]))


@pytest.mark.parametrize("k", [1, 2])
def test_block_kernels_against_float64(k):
    from patcher_kernels.project import project_block_cols, project_block_rows, residual_coefficients

    d, n = 12, 9
    w = rng.standard_normal((d, n)).astype(np.float32)
    q = orthonormalize(rng.standard_normal((k, d)))
    coeff = residual_coefficients(w[4:9], q[4:9])
    np.testing.assert_allclose(coeff, q[4:9].T @ w[4:9].astype(np.float64), atol=1e-5)
    full = q.T @ w.astype(np.float64)
    got = project_block_rows(w[4:9].copy(), q[4:9], full, 0.75)
    np.testing.assert_allclose(got, w[4:9] - 0.75 * q[4:9] @ full, atol=1e-5)
    assert got.dtype == np.float32
    got1 = project_block_rows(w[4:9].copy(), q[4:9], full)  # default strength removes it all
    np.testing.assert_allclose(got1, w[4:9] - q[4:9] @ full, atol=1e-5)
    x = rng.standard_normal((5, d)).astype(np.float32)
    np.testing.assert_allclose(project_block_cols(x, q), x - (x @ q) @ q.T, atol=1e-5)
    np.testing.assert_allclose(project_block_cols(x, q, 0.25), x - 0.25 * (x @ q) @ q.T, atol=1e-5)
    np.testing.assert_allclose(project_block_cols(x, q, 0.5, coeff=np.zeros((5, k), np.float32)), x)
    np.testing.assert_allclose(project_full(w, q, 0), w - q @ full, atol=1e-6)
    np.testing.assert_allclose(project_full(x, q, 1, 0.5), x - 0.5 * (x @ q) @ q.T, atol=1e-6)
    np.testing.assert_allclose(bias_project(w[:, 0], q), w[:, 0] - q @ (q.T @ w[:, 0]), atol=1e-6)


def test_rescale_norms_numbers_and_zero_slices():
    from patcher_kernels.project import rescale_norms

    x = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    old = np.array([100.0, 9.0, 4.0])
    new = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    got = rescale_norms(x, old, new, axis=0)
    # the zero row stays zero
    np.testing.assert_allclose(got, [[6.0, 8.0], [0.0, 0.0], [2.0, 0.0]], atol=1e-6)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    cols = rescale_norms(x, np.array([40.0, 64.0]), np.einsum("ij,ij->j", x, x, dtype=np.float64), axis=1)
    np.testing.assert_allclose(np.linalg.norm(cols, axis=0), [np.sqrt(40.0), 8.0], rtol=1e-6)
    # a numerically vanished slice (1e-40 of its old norm²) is left as it is, not blown up
    tiny = rescale_norms(np.array([[1e-20]], np.float32), np.array([1.0]), np.array([1e-40]), axis=0)
    assert tiny[0, 0] == np.float32(1e-20)


def test_fp8_tiles_each_use_their_own_scale():
    w = rng.standard_normal((300, 260)).astype(np.float32)
    w *= np.repeat(np.repeat(10.0 ** rng.uniform(-3, 1, (3, 3)), 128, 0), 128, 1)[:300, :260].astype(
        np.float32
    )
    amax = block_amax(w)
    for i in range(3):
        for j in range(3):
            tile = w[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            assert amax[i, j] == np.abs(tile).max()
    scale = amax / FP8_MAX
    q = quantize_blocks(w, scale)
    back = dequantize_blocks(q, scale)
    for i in range(3):
        for j in range(3):
            sl = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            ref = q[sl].astype(np.float64) * float(scale[i, j])  # one tile's value, by hand
            np.testing.assert_array_equal(back[sl], ref.astype(np.float32))
            assert np.abs(back[sl] - w[sl]).max() <= 2**-4 * amax[i, j]  # e4m3 half-ulp at the top binade
    # the largest value of every tile maps to exactly ±448
    assert np.abs(q.astype(np.float32)).max() == FP8_MAX
    # a row block that starts at tile row 1 uses scale rows from 1 on
    np.testing.assert_array_equal(dequantize_blocks(q[128:300], scale[1:]), back[128:300])
    # other block sizes
    s16 = block_amax(w[:40, :40], 16) / FP8_MAX
    assert s16.shape == (3, 3)
    np.testing.assert_array_equal(
        dequantize_blocks(quantize_blocks(w[:40, :40], s16, 16), s16, 16)[:16, :16],
        dequantize_blocks(quantize_blocks(w[:16, :16], s16[:1, :1], 16), s16[:1, :1], 16),
    )


def test_fp8_requantize_and_zero_tiles():
    old = np.array([[1.0, 2.0], [0.5, 4.0]], np.float32)
    values = np.zeros((200, 150), np.float32)
    values[10, 10] = 448.0 * 3  # needs scale 3 > 1: grows
    values[130, 140] = 448.0 * 1  # needs 1 < 4: keeps 4
    values[5, 140] = 448.0 * 2  # needs exactly 2: keeps 2
    values[128, 0] = 448.0 * 0.75  # first row of tile row 1: grows 0.5 -> 0.75 (tile edges are at 128)
    new = requantize_scale(old, values)
    np.testing.assert_array_equal(new, [[3.0, 2.0], [0.75, 4.0]])
    assert new.dtype == np.float32
    # a tile whose scale is 0 (all-zero tile) quantizes to zeros, not NaN
    q = quantize_blocks(np.zeros((4, 4), np.float32), np.zeros((1, 1), np.float32))
    assert np.array_equal(q.astype(np.float32), np.zeros((4, 4), np.float32))
    # clip to ±448 exactly, both signs; inside the range values are rounded, not clipped
    q = quantize_blocks(np.array([[1000.0, -1000.0, 300.0, -0.5]], np.float32), np.ones((1, 1), np.float32))
    np.testing.assert_array_equal(q.astype(np.float32), [[448.0, -448.0, 288.0, -0.5]])
    assert FP8_MAX == 448.0


def test_ablate_blocks_rejects_unknown_modes():
    q = orthonormalize(rng.standard_normal(4))
    read = lambda s, e: np.ones((e - s, 4), np.float32)  # noqa: E731
    with pytest.raises(ValueError, match="preserve must be None, 'rows' or 'cols', got 'both'"):
        list(ablate_blocks(read, 4, q, 0, preserve="both"))
    with pytest.raises(ValueError, match="residual axis must be 0 or 1 for a matrix, got 2"):
        list(ablate_blocks(read, 4, q, 2))


def test_numerical_zero_thresholds():
    """The documented guards, at their edges: a slice counts as projected to zero when its squared norm
    is at most 1e-30 of the old one; directions are dependent when a QR pivot is at most 1e-12 of the
    largest."""
    from patcher_kernels.project import rescale_norms

    x = np.array([[1e-15], [1e-15], [1e-15]])
    got = rescale_norms(x, np.array([1.0, 1.0, 4.0]), np.array([1e-30, 1.5e-30, 1e-30]), axis=0)
    assert got[0, 0] == 1e-15  # exactly at the edge: left alone
    assert got[1, 0] == pytest.approx(1e-15 * np.sqrt(1 / 1.5e-30))  # just above: rescaled
    assert got[2, 0] == 1e-15  # 1e-30 < 1e-30 * 4: left alone
    v = rng.standard_normal(16)
    v *= 10 / np.linalg.norm(v)
    u = rng.standard_normal(16)
    u -= (u @ v) / (v @ v) * v
    u /= np.linalg.norm(u)
    assert orthonormalize(np.stack([v, v + 1.5e-11 * u])).shape == (16, 2)  # pivot ratio 1.5e-12: independent
    with pytest.raises(ValueError):
        orthonormalize(np.stack([v, v + 5e-12 * u]))  # ratio 5e-13: dependent


def test_fp8_max_matches_ml_dtypes():
    assert FP8_MAX == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


@pytest.mark.parametrize("axis", [0, 1])
def test_partial_cols_preserve_and_the_stats_callers_read(axis):
    """scale 0.5 with "cols": each written vector is the float64 partial projection rescaled to its old
    norm (small weights: squared norms below 1); stats add to what the caller had (a fused-expert tensor
    sums its matrices) and, on axis 1, hold each block's own W_b Q while it is yielded."""
    d, other, scale = 32, 50, 0.5
    w = (0.05 * rng.standard_normal((d, other) if axis == 0 else (other, d))).astype(np.float32)
    q = orthonormalize(rng.standard_normal(d))
    w64 = w.astype(np.float64)
    plain = project_full(w64, q, axis, scale)
    written = 0 if axis == 0 else 1
    assert np.all(np.sum(w64 * w64, axis=written) < 1)
    want = plain * np.sqrt(
        np.sum(w64**2, axis=written, keepdims=True) / np.sum(plain**2, axis=written, keepdims=True)
    )
    stats = {"component_sq": 2.0}
    blocks = []
    for s, e, out in ablate_blocks(
        lambda s, e: w[s:e].copy(), w.shape[0], q, axis, scale, preserve="cols", block_rows=16, stats=stats
    ):
        if axis == 1:
            np.testing.assert_allclose(stats["coeff"], w64[s:e] @ q, atol=1e-6)
        blocks.append(out.astype(np.float64))
    np.testing.assert_allclose(np.concatenate(blocks), want, atol=1e-6)
    comp = np.linalg.norm(q.T @ w64) if axis == 0 else np.linalg.norm(w64 @ q)
    assert stats["component_sq"] == pytest.approx(2.0 + comp**2, rel=1e-5)
