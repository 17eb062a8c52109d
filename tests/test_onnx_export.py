"""ONNX export: every architecture's graph matches the numpy forward on a left-padded batch, for
prefill and 8 cached decode steps, and HF transformers; I/O names, dims and files follow the
conventions transformers.js / optimum loaders expect."""

import json

import numpy as np
import onnx
import pytest
from conftest import DEMO, MODEL_TYPES, fixture_path, run_cli

from patcher.io.checkpoint import Checkpoint
from patcher.model.execution import StreamedModel
from patcher.onnx.export import export
from patcher.onnx.runtime import OnnxModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(model_type, src=None):
        key = (model_type, str(src))
        if key not in cache:
            cache[key] = export(src or fixture_path(model_type), root / f"{model_type}-{len(cache)}")
        return cache[key]

    return get


def batch():
    ids = np.random.default_rng(1).integers(3, 380, size=(3, 7))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def numpy_logits(folder, ids, mask):
    with Checkpoint(folder) as ck:
        return StreamedModel(ck).run(ids, mask, logits=True)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prefill_and_cached_decode_match_numpy(model_type, exported):
    folder = exported(model_type)
    m = OnnxModel(folder)
    ids, mask = batch()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, past = m.step(ids, mask, pos, m.empty_cache(3))
    ref = numpy_logits(fixture_path(model_type), ids, mask)
    real = mask.astype(bool)
    assert np.abs(logits - ref)[real].max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # 8 decode steps with the cache == the numpy forward over the whole grown sequence
    full_ids, full_mask = ids, mask
    for _step in range(8):
        tok = logits[:, -1].argmax(-1)[:, None]
        full_ids = np.concatenate([full_ids, tok], 1)
        full_mask = np.concatenate([full_mask, np.ones_like(tok)], 1)
        logits, past = m.step(tok, full_mask, np.maximum(np.cumsum(full_mask, 1) - 1, 0)[:, -1:], past)
    ref = numpy_logits(fixture_path(model_type), full_ids, full_mask)[:, -1]
    assert np.abs(logits[:, -1] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "qwen2_moe", "deepseek_v3", "gpt_neox"])
def test_export_matches_hf(model_type, exported):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    model = T.AutoModelForCausalLM.from_pretrained(fixture_path(model_type), dtype=torch.float32).eval()
    ids, mask = batch()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        ).logits.numpy()
    got, _ = OnnxModel(exported(model_type)).step(
        ids, mask, pos, OnnxModel(exported(model_type)).empty_cache(3)
    )
    real = mask.astype(bool)
    assert np.abs(got - want)[real].max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_io_names_dims_and_files(exported):
    folder = exported("qwen3")
    assert (folder / "onnx" / "model.onnx").is_file() and (folder / "onnx" / "model.onnx_data").is_file()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).is_file()
    model = onnx.load(str(folder / "onnx" / "model.onnx"), load_external_data=False)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims["position_ids"] == ["batch_size", "sequence_length"]
    cfg = json.loads((folder / "config.json").read_text())
    for i in range(cfg["num_hidden_layers"]):
        for kind in ("key", "value"):
            assert dims[f"past_key_values.{i}.{kind}"] == [
                "batch_size",
                cfg["num_key_value_heads"],
                "past_sequence_length",
                cfg["head_dim"],
            ]
    outs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output
    }
    assert outs["logits"] == ["batch_size", "logits_sequence_length", cfg["vocab_size"]]
    assert dims["num_logits_to_keep"] == []  # a scalar, as transformers.js >= 4 sends it (1 when generating)
    assert outs["present.0.key"] == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # standard ops only


def test_edited_model_exports_with_injected_bias(tmp_path, direction64, exported):
    edited = tmp_path / "edited"
    run_cli(
        "inject",
        fixture_path("mistral"),
        "-d",
        direction64,
        "-o",
        tmp_path / "inj",
        "--layer",
        "1",
        "--alpha",
        "3",
    )
    run_cli("ablate", tmp_path / "inj", "-d", direction64, "-o", edited, "--layers", "2")
    folder = exported("mistral", edited)
    model = onnx.load(str(folder / "onnx" / "model.onnx"), load_external_data=False)
    assert any(i.name == "model.layers.1.mlp.down_proj.bias" for i in model.graph.initializer)
    ids, mask = batch()
    got, _ = OnnxModel(folder).step(
        ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0), OnnxModel(folder).empty_cache(3)
    )
    ref = numpy_logits(edited, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() <= 1e-4 * max(1.0, np.abs(ref).max())
    base = numpy_logits(fixture_path("mistral"), ids, mask)
    assert np.abs(base - ref)[real].max() > 1e-2  # the edit (bias HF would drop) is live in the export


def test_verify_cli_reports_parity_projection_and_behaviour(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))
    planted = DEMO / "model"
    direction = DEMO / "planted-direction.npy"
    prompts = DEMO / "positive.txt"
    edited = tmp_path / "edited"
    run_cli("ablate", planted, "-d", direction, "-o", edited)
    run_cli("export", edited, "-o", tmp_path / "onnx")
    res = run_cli(
        "verify",
        tmp_path / "onnx",
        "--reference",
        edited,
        "--original",
        planted,
        "--prompts",
        prompts,
        "-d",
        direction,
        "--json",
    )
    rep = json.loads(res.stdout)  # the cache export announcement goes to stderr
    assert rep["parity_ok"] and rep["max_abs_logit_diff"] <= 1e-4 * max(1, rep["max_abs_logit"])
    assert rep["top1_agreement"] == 1.0 and rep["greedy_token_match"] == 1.0
    assert all(row["edited"] < 1e-2 and row["original"] > 0.1 for row in rep["projections"])
    assert set(rep["marker_rate"]) == {"original", "edited"} and rep["first_token_kl"] > 0
    assert len(rep["completions"]["edited"]) == len(prompts.read_text().splitlines())


def test_verify_fails_on_a_mismatched_reference(tmp_path):
    run_cli("export", fixture_path("llama"), "-o", tmp_path / "onnx")
    res = run_cli("verify", tmp_path / "onnx", "--reference", fixture_path("mistral"), expect=1)
    assert "FAILED" in res.output


def test_marker_rate_matching():
    from patcher.onnx.verify import marker_rate

    assert (
        marker_rate(["I\u2019m sorry, no.", "Sure! Here it is.", "AS AN AI model", "i cannot do that"])
        == 0.75
    )


def test_generate_cli_streams_and_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))
    res = run_cli("generate", fixture_path("llama"), "--prompt", "Tell me a story", "--max-new-tokens", "5")
    assert (tmp_path / "cache" / "onnx").is_dir()  # a safetensors folder is exported to the cache first
    prompts = tmp_path / "p.txt"
    prompts.write_text("Describe the sea\nHow do plants grow?\n")
    res = run_cli(
        "generate",
        fixture_path("llama"),
        "--prompts",
        prompts,
        "--max-new-tokens",
        "4",
        "--sample",
        "--seed",
        "3",
    )
    assert res.output.count("> ") == 2


def test_int4_options_reach_the_quantizer(tmp_path):
    run_cli(
        "export",
        fixture_path("llama"),
        "-o",
        tmp_path / "q",
        "--dtype",
        "int4",
        "--int4-block",
        "64",
        "--int4-accuracy",
        "4",
    )
    nodes = [
        n
        for n in onnx.load(
            str(tmp_path / "q" / "onnx" / "model_q4.onnx"), load_external_data=False
        ).graph.node
        if n.op_type == "MatMulNBits"
    ]
    attrs = {a.name: a.i for a in nodes[0].attribute}
    assert attrs["block_size"] == 64 and attrs["accuracy_level"] == 4
    res = run_cli(
        "export",
        fixture_path("llama"),
        "-o",
        tmp_path / "bad",
        "--dtype",
        "int4",
        "--int4-block",
        "48",
        expect=1,
    )
    assert "power of two" in res.output and not (tmp_path / "bad").exists()


def test_fp16_export_runs(tmp_path):
    folder = export(fixture_path("qwen3"), tmp_path / "fp16", dtype="fp16")
    ids, mask = batch()
    m = OnnxModel(folder, "model_fp16.onnx")
    got, _ = m.step(ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0), m.empty_cache(3))
    ref = numpy_logits(fixture_path("qwen3"), ids, mask)
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() / np.abs(ref).max() <= 2e-2


def dequantize_matmulnbits(q4: np.ndarray, scales: np.ndarray, k: int, block: int) -> np.ndarray:
    """MatMulNBits' symmetric 4-bit layout, by hand: B [N, blocks, block/2] bytes, low nibble first,
    zero point 8, one scale per (row, block) -> the [N, K] = [out, in] weight it stands for."""
    n = q4.shape[0]
    nibbles = np.stack([q4 & 0x0F, q4 >> 4], axis=-1).reshape(n, -1, block).astype(np.float32)
    return ((nibbles - 8) * scales.reshape(n, -1, 1).astype(np.float32)).reshape(n, -1)[:, :k]


def test_cuda_provider_when_present(exported):
    """onnxruntime-gpu with a GPU: the same parity on CUDA. Skipped cleanly on CPU-only machines (CI)."""
    from patcher.onnx.runtime import available_providers

    if "cuda" not in available_providers():
        pytest.skip("CUDAExecutionProvider not available (onnxruntime-gpu and a GPU are needed)")
    folder = exported("llama")
    ids, mask = batch()
    m = OnnxModel(folder, provider="cuda")
    got, _ = m.step(ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0), m.empty_cache(3))
    ref = numpy_logits(fixture_path("llama"), ids, mask)
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() <= 1e-3 * max(1.0, np.abs(ref).max())  # TF32/cuBLAS rounding


def test_unavailable_provider_is_a_clear_error(exported):
    from patcher.errors import PatcherError
    from patcher.onnx.runtime import available_providers

    if "cuda" in available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(PatcherError, match="not available"):
        OnnxModel(exported("llama"), provider="cuda")


def test_transformers_js_config_permissions_and_chunks(tmp_path):
    """config.json says which files have external data and how many chunks (transformers.js fetches
    `<file>_data`, `<file>_data_1`, ... by that count); every file is world-readable; a tiny chunk limit
    splits the weights over many chunks that onnxruntime loads from the one .onnx."""
    import os

    out = export(fixture_path("qwen3"), tmp_path / "x", dtype="fp32", chunk_bytes=20_000)
    files = sorted(p.name for p in (out / "onnx").iterdir())
    chunks = [f for f in files if f.startswith("model.onnx_data")]
    cfg = json.loads((out / "config.json").read_text())["transformers.js_config"]
    assert cfg["use_external_data_format"] == {"model.onnx": len(chunks)} and cfg["dtype"] == "fp32"
    assert len(chunks) > 3 and set(chunks) == {"model.onnx_data"} | {
        f"model.onnx_data_{i}" for i in range(1, len(chunks))
    }
    model = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == set(chunks)
    per_chunk = {
        c: sum(1 for t in model.graph.initializer for e in t.external_data if e.value == c) for c in chunks
    }
    # one big tensor alone
    assert all((out / "onnx" / c).stat().st_size <= 20_000 or per_chunk[c] == 1 for c in chunks)
    for p in [out, *out.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p
    whole = export(fixture_path("qwen3"), tmp_path / "whole", dtype="fp32")
    ids, mask = batch()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    a, _ = OnnxModel(out).step(ids, mask, pos, OnnxModel(out).empty_cache(3))
    b, _ = OnnxModel(whole).step(ids, mask, pos, OnnxModel(whole).empty_cache(3))
    assert np.array_equal(a, b)  # same bytes, only spread over files
    assert json.loads((whole / "config.json").read_text())["transformers.js_config"][
        "use_external_data_format"
    ] == {"model.onnx": 1}
    assert sorted(os.listdir(whole / "onnx")) == ["model.onnx", "model.onnx_data"]


@pytest.mark.parametrize("other", ["qwen2", "gpt2"])
def test_verify_refuses_an_original_that_is_another_model(tmp_path, other):
    """An unrelated --original gave plausible leakage / KL numbers; now one line naming what differs."""
    run_cli("export", fixture_path("llama"), "-o", tmp_path / "onnx")
    res = run_cli(
        "verify",
        tmp_path / "onnx",
        "--reference",
        fixture_path("llama"),
        "--original",
        fixture_path(other),
        expect=1,
    )
    assert "is not the edited model's original (model_type llama vs " + other in res.output
    assert len(res.output.strip().splitlines()) == 1
