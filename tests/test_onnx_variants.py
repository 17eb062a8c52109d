"""The variants of one export folder (fp32, fp16, int4, q4f16, int8) as transformers.js names them:
each graph against the numpy forward of the weights it stores, the folder's bookkeeping (adding a variant,
refusing a folder of another source or a missing variant), the tied embedding stored once, the
last-position logits path, and the orthogonal rounding that keeps an ablation in 4 and 8 bits."""

import json
import os

import numpy as np
import onnx
import pytest
from conftest import DEMO, fixture_path, run_cli

from patcher.errors import PatcherError
from patcher.io.checkpoint import Checkpoint
from patcher.model.execution import StreamedModel
from patcher.onnx.export import FILES, VARIANTS, export, variant_file
from patcher.onnx.runtime import OnnxModel
from patcher.onnx.verify import StoredModel, stored_weights

ALL = ",".join(VARIANTS)
# relative max |Δ logits| against the numpy forward of the stored weights, measured on these fixtures:
# fp32 / int4 / int8 (float32 activations) 3e-7..9e-7, fp16 (bf16 fixtures: exact in float16) 8e-7,
# q4f16 (float16 activations and cache) 5e-4..2e-3; the bounds leave a 10x margin or more. int8 (dynamic:
# activations rounded to 8 bits per tensor at run time, not modelled by the reference) 1e-2..2.5e-1: its
# graph is checked exactly by test_int8_matmul_is_dynamic_quantization below.
TOL = {"fp32": 1e-5, "fp16": 1e-5, "int4": 1e-5, "int8": 0.35, "q4f16": 2e-2}


def batch():
    ids = np.random.default_rng(1).integers(3, 380, size=(3, 7))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = export(fixture_path(model_type), root / model_type, dtype=ALL)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "qwen2_moe", "deepseek_v3", "phi3"])
def test_every_variant_matches_numpy_of_its_stored_weights(model_type, folders):
    """Prefill on a left-padded batch, then 4 cached decode steps, for each variant: the graph computes
    what the numpy forward computes with the (dequantized) weights the file stores."""
    folder = folders(model_type)
    ids, mask = batch()
    real = mask.astype(bool)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    for dtype in VARIANTS:
        stored = stored_weights(folder, dtype)
        assert bool(stored) == bool(VARIANTS[dtype]["bits"])
        ref = StoredModel(Checkpoint(fixture_path(model_type)), stored)
        m = OnnxModel(folder, FILES[dtype])
        logits, past = m.step(ids, mask, pos, m.empty_cache(3))
        want = ref.run(ids, mask, logits=True)
        scale = max(1.0, np.abs(want).max())
        assert np.abs(logits - want)[real].max() <= TOL[dtype] * scale, dtype
        full_ids, full_mask = ids, mask
        for _ in range(4):
            tok = want[:, -1].argmax(-1)[:, None]  # the reference's tokens: both sides see the same sequence
            full_ids = np.concatenate([full_ids, tok], 1)
            full_mask = np.concatenate([full_mask, np.ones_like(tok)], 1)
            logits, past = m.step(
                tok, full_mask, np.maximum(np.cumsum(full_mask, 1) - 1, 0)[:, -1:], past, keep=1
            )
            want = ref.run(full_ids, full_mask, logits=True)
            assert logits.shape[1] == 1
            assert np.abs(logits[:, -1] - want[:, -1]).max() <= TOL[dtype] * scale, dtype
        if VARIANTS[dtype]["act"] == VARIANTS["q4f16"]["act"]:
            assert all(v.dtype == np.float16 for v in past.values())  # the KV cache is float16


def test_zero_point_blocks_match_numpy(tmp_path):
    out = tmp_path / "z"
    run_cli(
        "export",
        fixture_path("gpt2"),
        "-o",
        out,
        "--dtype",
        "int4,q4f16",
        "--zero-points",
        "--int4-block",
        "16",
    )
    ids, mask = batch()
    real = mask.astype(bool)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    for dtype in ("int4", "q4f16"):
        model = onnx.load(str(out / "onnx" / FILES[dtype]), load_external_data=False)
        assert any(t.name.endswith(".zero_points") for t in model.graph.initializer)
        want = StoredModel(Checkpoint(fixture_path("gpt2")), stored_weights(out, dtype)).run(
            ids, mask, logits=True
        )
        m = OnnxModel(out, FILES[dtype])
        got, _ = m.step(ids, mask, pos, m.empty_cache(3))
        assert np.abs(got - want)[real].max() <= TOL[dtype] * max(1.0, np.abs(want).max())


def test_int8_matmul_rounds_each_row_of_activations_on_its_own():
    """One linear through the int8 path against numpy's emulation: each row (token) of x rounded to
    8 bits with its own scale max|x_row| / 127 (codes offset by 128 for MatMulInteger), int8 per-channel
    weights, int32 products, both scales after. One outlier token (100x) leaves the other rows' error
    where it was; with one scale per tensor (the pattern before) their error grows tenfold and more."""
    import onnx_ir as ir
    import onnxruntime as ort

    from patcher.onnx.ops import Context

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 64)) * 0.05).astype(np.float32)
    ctx = Context(
        {"w": (w.shape, lambda: w)}, [], 1, quant={"bits": 8, "format": "int8-channel"}, logits_to_keep=False
    )
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 64]))
    y = ctx.matmul(x, "w")
    y.name, y.type = "y", ir.TensorType(ir.DataType.FLOAT)
    g = ir.Graph([x], [y], nodes=ctx.tape.nodes, initializers=ctx.tape.initializers, opset_imports={"": 17})
    proto = ir.serde.serialize_model(ir.Model(g, ir_version=8))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((2, 5, 64)).astype(np.float32)
    a[0, 0] *= 100  # an outlier token, as real models have (the first token's massive activations)
    got = session.run(None, {"x": a})[0]
    s = np.abs(a).max(-1, keepdims=True) / np.float32(127)  # float32 throughout, as the graph computes it
    xq = np.round(a / s).astype(np.float64)
    ws = (np.abs(w).max(1) / 127).astype(np.float32)
    codes = np.clip(np.round(w / ws[:, None]), -127, 127)
    want = (xq @ codes.T) * ws * s
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    exact = a.astype(np.float64) @ w.T.astype(np.float64)
    rest = np.ones(a.shape[:2], bool)
    rest[0, 0] = False  # the rows without the outlier
    st = np.float32(np.abs(a).max() / 127)  # one scale for the whole tensor
    per_tensor = (np.round(a / st).astype(np.float64) @ codes.T) * ws * st
    err_row, err_tensor = (np.abs(v - exact)[rest].max() for v in (got, per_tensor))
    assert err_tensor > 10 * err_row, (err_row, err_tensor)


def test_quantized_layout_is_matmulnbits_and_weights_stay_close(folders):
    folder = folders("llama")
    exact = StreamedModel(Checkpoint(fixture_path("llama")))
    for dtype, rel, op in (("int4", 0.12, "MatMulNBits"), ("int8", 0.01, "MatMulInteger")):
        model = onnx.load(str(folder / "onnx" / FILES[dtype]), load_external_data=False)
        nodes = [n for n in model.graph.node if n.op_type == op]
        assert len(nodes) == 7 * 3 + 1  # 7 linears per layer and the head, none left in float32
        if op == "MatMulNBits":
            assert all(n.domain == "com.microsoft" for n in nodes)
            assert {a.i for n in nodes for a in n.attribute if a.name == "bits"} == {4}
        else:  # standard ops only: per-row rounding + MatMulInteger, as transformers.js's q8 files
            assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        for name, w in stored_weights(folder, dtype).items():  # rounding error, measured 0.07 / 0.005
            x = exact._decode(name)
            assert np.linalg.norm(w - x) / np.linalg.norm(x) <= rel, (dtype, name)


def test_tied_embedding_is_stored_once(tmp_path):
    """gpt2 ties wte to the head: one [vocab, d] (or [d, vocab]) tensor in the file, not two."""
    out = export(fixture_path("gpt2"), tmp_path / "g", dtype="fp32,int4")
    with Checkpoint(fixture_path("gpt2")) as ck:
        vocab, d = ck.config["vocab_size"], ck.config["n_embd"]
        params = sum(int(np.prod(i.shape)) for i in ck.tensors.values())
    for dtype in ("fp32", "int4"):
        model = onnx.load(str(out / "onnx" / FILES[dtype]), load_external_data=False)
        # the matrix itself: [d, vocab] float32, or the [vocab, blocks, bytes] MatMulNBits codes (+ scales)
        big = [
            tuple(t.dims)
            for t in model.graph.initializer
            if tuple(t.dims)[:2] == (d, vocab) or (tuple(t.dims)[:1] == (vocab,) and len(t.dims) == 3)
        ]
        assert len(big) == 1, (dtype, big)
    data = sum(p.stat().st_size for p in (out / "onnx").glob("model.onnx_data*"))
    assert data <= 4 * params * 1.01  # float32, every checkpoint tensor once (tiny constants aside)


def test_adding_variants_to_an_export(tmp_path):
    out = tmp_path / "x"
    export(fixture_path("llama"), out, dtype="fp32")
    inode = (out / "onnx" / "model.onnx_data").stat().st_ino
    run_cli("export", fixture_path("llama"), "-o", out, "--dtype", "int8,q4f16")  # no --force needed
    assert (out / "onnx" / "model.onnx_data").stat().st_ino == inode  # kept (hard link), not rewritten
    info = json.loads((out / "patcher-export.json").read_text())
    assert info["dtypes"] == ["fp32", "q4f16", "int8"]
    cfg = json.loads((out / "config.json").read_text())["transformers.js_config"]
    assert cfg["use_external_data_format"] == {
        "model.onnx": 1,
        "model_q4f16.onnx": 1,
        "model_quantized.onnx": 1,
    }
    # fp32 is the best fit present on both devices (fp16 would come first: DEVICE_DEFAULTS)
    assert cfg["dtype"] == "fp32" and cfg["kv_cache_dtype"] == {"q4f16": "float16"}
    assert cfg["device_config"] == {"wasm": {"dtype": "fp32"}, "webgpu": {"dtype": "fp32"}}
    manifest = json.loads((out / "patcher-manifest.json").read_text())
    assert set(manifest["outputs"]) >= {
        "onnx/model.onnx",
        "onnx/model_quantized.onnx",
        "onnx/model_q4f16.onnx_data",
    }
    for p in [out, *out.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p
    # another model's export is not silently mixed in
    res = run_cli("export", fixture_path("mistral"), "-o", out, "--dtype", "int4", expect=1)
    assert "different source" in res.output and not (out / "onnx" / "model_q4.onnx").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = run_cli("export", fixture_path("llama"), "-o", other, "--dtype", "int4", expect=1)
    # a user's folder is never replaced, not even with --force (only a previous patcher output is)
    assert "refusing to replace it" in res.output and (other / "notes.txt").read_text() == "mine"


def test_missing_variant_is_refused_not_replaced(tmp_path):
    out = export(fixture_path("llama"), tmp_path / "q", dtype="int4")
    assert not (out / "onnx" / "model.onnx").exists()  # int4 alone: no fp32 beside it any more
    with pytest.raises(PatcherError, match="has no fp32 variant"):
        variant_file(out, "fp32")
    res = run_cli("generate", out, "--prompt", "hi", "--max-new-tokens", "2", expect=1)
    assert "has no fp32 variant" in res.output and "int4" in res.output
    run_cli("generate", out, "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "int4")
    res = run_cli("verify", out, "--reference", fixture_path("llama"), "--dtype", "int8", expect=1)
    assert "has no int8 variant" in res.output
    res = run_cli("export", fixture_path("llama"), "-o", tmp_path / "bad", "--dtype", "fp32,int3", expect=1)
    assert "int3" in res.output


def test_last_position_logits_equal_the_full_ones(folders):
    folder = folders("qwen2_moe")
    ids, mask = batch()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    for dtype in ("fp32", "int4"):
        m = OnnxModel(folder, FILES[dtype])
        full, _ = m.step(ids, mask, pos, m.empty_cache(3), keep=0)
        for k in (1, 3):
            last, _ = m.step(ids, mask, pos, m.empty_cache(3), keep=k)
            assert last.shape == (3, k, full.shape[2])
            assert np.allclose(last, full[:, -k:], rtol=0, atol=1e-5 * np.abs(full).max())


def test_chunked_quantized_export_loads(tmp_path):
    out = export(fixture_path("qwen3"), tmp_path / "c", dtype="int4", chunk_bytes=8_000)
    chunks = sorted(p.name for p in (out / "onnx").glob("model_q4.onnx_data*"))
    assert len(chunks) > 3
    cfg = json.loads((out / "config.json").read_text())["transformers.js_config"]
    assert cfg["use_external_data_format"] == {"model_q4.onnx": len(chunks)}
    whole = export(fixture_path("qwen3"), tmp_path / "w", dtype="int4")
    ids, mask = batch()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    a = OnnxModel(out, FILES["int4"]).step(ids, mask, pos, OnnxModel(out, FILES["int4"]).empty_cache(3))[0]
    b = OnnxModel(whole, FILES["int4"]).step(ids, mask, pos, OnnxModel(whole, FILES["int4"]).empty_cache(3))[
        0
    ]
    assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablated")
    planted = DEMO / "model"
    direction = DEMO / "planted-direction.npy"
    run_cli("ablate", planted, "-d", direction, "-o", root / "edited")
    return planted, direction, root / "edited", root


def test_quantized_export_of_an_ablation_keeps_it(ablated):
    """Plain round-to-nearest of the ablated weights puts part of the removed direction back; the export
    rounds against the direction it reads from the checkpoint's provenance. Leakage = |r̂ᵀW_stored| /
    |r̂ᵀW_original| over the edited tensors (the original's component is what the ablation removed)."""
    from patcher.onnx import export as ex

    planted, direction, edited, root = ablated
    out = export(edited, root / "onnx", dtype="int4,int8")
    plain = root / "plain"
    saved = ex.orthogonal_plan
    ex.orthogonal_plan = lambda q: None  # the same export with plain rounding, for comparison
    try:
        export(edited, plain, dtype="int4,int8")
    finally:
        ex.orthogonal_plan = saved
    res = run_cli(
        "verify",
        out,
        "--reference",
        edited,
        "--original",
        planted,
        "-d",
        direction,
        "--dtype",
        "int4",
        "--json",
        "--tokens",
        "4",
    )
    rep = json.loads(res.stdout)
    assert rep["parity_ok"] and rep["greedy_token_match"] == 1.0
    leak = rep["leakage"]["summary"]
    assert leak["tensors"] >= 7  # embedding + attention and MLP writers of the 3 layers
    from patcher_kernels.project import orthonormalize

    from patcher.edit.directions import load_direction
    from patcher.onnx.verify import leakage

    q = orthonormalize(load_direction(str(direction)).vectors)
    exact, orig = StreamedModel(Checkpoint(edited)), StreamedModel(Checkpoint(planted))
    for dtype, bound in (("int4", 0.02), ("int8", 0.02)):
        ours = leakage(stored_weights(out, dtype), exact, orig, q)["summary"]
        theirs = leakage(stored_weights(plain, dtype), exact, orig, q)["summary"]
        # measured: int4 plain 0.10 -> ours 0.0036 (the bf16 checkpoint itself: 0.0036); int8 0.0066 -> 0.0036
        assert ours["stored_of_original_max"] <= bound, (dtype, ours)
        assert ours["stored_of_original_max"] <= ours["exact_of_original_max"] * 1.5 + 1e-3
        if dtype == "int4":
            assert theirs["stored_of_original_max"] > 5 * ours["stored_of_original_max"]
    assert rep["leakage"]["summary"]["stored_of_original_max"] == pytest.approx(
        leakage(stored_weights(out, "int4"), exact, orig, q)["summary"]["stored_of_original_max"]
    )


def test_ablated_export_needs_its_direction(ablated, tmp_path):
    planted, direction, edited, root = ablated
    moved = tmp_path / "edited-moved"
    import shutil

    shutil.copytree(edited, moved)
    meta_dir = tmp_path / "dir.npy"
    shutil.copyfile(direction, meta_dir)
    # provenance names the direction by its path: a checkpoint whose direction file is gone asks for it
    from patcher.onnx import export as ex

    saved = ex._provenance
    ex._provenance = lambda ck: {
        "op": "ablate",
        "direction": str(tmp_path / "gone.npy"),
        "direction_sha256": "x",
    }
    try:
        with pytest.raises(PatcherError, match="--direction"):
            export(moved, tmp_path / "o1", dtype="int4")
        export(moved, tmp_path / "o2", dtype="int4", direction=meta_dir)
        export(moved, tmp_path / "o3", dtype="fp32")  # unquantized variants need no direction
    finally:
        ex._provenance = saved
    assert (tmp_path / "o2" / "onnx" / "model_q4.onnx").is_file()


def test_cuda_variants_when_present(folders):
    """onnxruntime-gpu with a GPU: every variant's parity on CUDA. Skipped cleanly on CPU-only machines."""
    from patcher.onnx.runtime import available_providers

    if "cuda" not in available_providers():
        pytest.skip("CUDAExecutionProvider not available (onnxruntime-gpu and a GPU are needed)")
    folder = folders("llama")
    ids, mask = batch()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    real = mask.astype(bool)
    for dtype in VARIANTS:
        ref = StoredModel(Checkpoint(fixture_path("llama")), stored_weights(folder, dtype)).run(
            ids, mask, logits=True
        )
        m = OnnxModel(folder, FILES[dtype], provider="cuda")
        got, _ = m.step(ids, mask, pos, m.empty_cache(3))
        assert np.abs(got - ref)[real].max() <= max(TOL[dtype], 1e-3) * max(1.0, np.abs(ref).max())


def test_environment_has_no_stale_partial_folders(tmp_path):
    export(fixture_path("llama"), tmp_path / "p", dtype="fp32")
    export(fixture_path("llama"), tmp_path / "p", dtype="int4")
    assert sorted(os.listdir(tmp_path)) == ["p"]
