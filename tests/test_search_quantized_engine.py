"""`patcher search --engine onnx --engine-dtype int4|int8`: the search graph with the weights `patcher export`
stores for that variant, the edit still fed as float32 graph inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_path, run_cli
from test_search import make_search_fixture, plan_for, train_prompts
from test_search import refusal as refusal

from patcher.errors import PatcherError
from patcher.io.checkpoint import Checkpoint
from patcher.model.execution import StreamedModel
from patcher.model.prompts import left_pad
from patcher.onnx import storage
from patcher.onnx.export import FILES, export
from patcher.onnx.runtime import OnnxModel
from patcher.onnx.verify import StoredModel, stored_weights
from patcher.search import study as st
from patcher.search.engine import ResidentModel
from patcher.search.onnx_engine import OnnxEngine, build, graph_key

MODELS = ["llama", "gemma2", "qwen2_moe"]  # untied; tied with post-norms and softcaps; MoE experts
QUANTIZED = ["int4", "int8"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """patcher's own int4 and int8 exports of each fixture (the engine must match them exactly)."""
    root, done = tmp_path_factory.mktemp("exports"), {}

    def get(model_type):
        if model_type not in done:
            done[model_type] = export(fixture_path(model_type), root / model_type, dtype="int4,int8")
        return done[model_type]

    return get


def batch():
    ids, mask = left_pad([[1, 5, 9, 30, 7, 11], [1, 44, 3], [2, 8, 8, 8]], 0)
    return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_zero_edit_is_the_exported_variant(model_type, dtype, exported):
    """Strength 0 is the quantized original: onnxruntime on `patcher export --dtype DTYPE`'s file, prefill
    on a left-padded batch and one cached step (same rounding, same ops; measured |Δ| ~1e-7 relative)."""
    folder = exported(model_type)
    sm = StreamedModel(Checkpoint(fixture_path(model_type)))
    eng, ref = OnnxEngine(sm, dtype=dtype), OnnxModel(folder, FILES[dtype])
    ids, mask, pos = batch()
    real = mask.astype(bool)
    cache = eng.new_cache(3)
    got = eng.forward(ids, mask, pos, cache, None, last=None)
    want, past = ref.step(ids, mask, pos, ref.empty_cache(3))
    scale = np.abs(want[real]).max()
    assert np.abs(got - want)[real].max() <= 1e-5 * scale
    mask2 = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
    step = np.array([[12], [13], [14]])
    got = eng.forward(step, mask2, pos[:, -1:] + 1, cache, None)
    want, _ = ref.step(step, mask2, pos[:, -1:] + 1, past, keep=1)
    assert np.abs(got - want).max() <= 1e-5 * scale


# |edited engine - numpy engine on the weights the file stores|, relative to the logits' scale. int4: both
# compute P(W_stored x) in float32 (measured 2e-7..9e-7). int8 also rounds each activation row to 8 bits at
# run time (MatMulInteger), which the numpy reference does not model: measured 0.9..5.8 % here (MoE routing
# flips), so its bound only catches a lost or misplaced edit, which moves the logits by 12..21 %; the int8
# graph's edit is the same subgraph as int4's and its zero edit is checked exactly above.
BOUND = {"int4": 1e-4, "int8": 0.08}


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_edited_trial_is_the_numpy_engine_on_the_stored_weights(model_type, dtype, exported):
    folder = exported(model_type)
    sm = StreamedModel(Checkpoint(fixture_path(model_type)))
    plan = plan_for(sm)
    stored = ResidentModel(StoredModel(Checkpoint(fixture_path(model_type)), stored_weights(folder, dtype)))
    eng = OnnxEngine(sm, dtype=dtype)
    ids, mask, pos = batch()
    real = mask.astype(bool)
    a = stored.forward(ids, mask, pos, None, stored.edits(plan), last=None)
    b = eng.forward(ids, mask, pos, None, eng.edits(plan), last=None)
    zero = eng.forward(ids, mask, pos, None, None, last=None)
    scale = np.abs(a[real]).max()
    assert np.abs(b - zero)[real].max() >= 0.12 * scale  # the edit moves the logits well past the bounds
    assert np.abs(a - b)[real].max() <= BOUND[dtype] * scale


def test_graph_per_dtype_cached_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path))
    sm = StreamedModel(Checkpoint(fixture_path("llama")))
    keys = {d: graph_key(sm, d) for d in ("fp32", "int4", "int8")}
    assert len(set(keys.values())) == 3
    said = []
    for d in keys:
        OnnxEngine(sm, dtype=d, announce=said.append)
    assert [d for d in keys if any(keys[d] in s for s in said)] == list(keys)  # each built once, apart
    data = {d: sum(p.stat().st_size for p in (tmp_path / "search" / k).iterdir()) for d, k in keys.items()}
    assert data["int4"] < 0.3 * data["fp32"] and data["int8"] < 0.4 * data["fp32"], data
    assert not [p for p in (tmp_path / "search").iterdir() if "partial" in p.name]
    OnnxEngine(sm, dtype="int4", announce=said.append)
    assert len(said) == 3  # the second int4 engine loads the cached graph


def test_dtype_errors(tmp_path, refusal):
    sm = StreamedModel(Checkpoint(fixture_path("llama")))
    for bad in ("fp16", "q4f16", "int3"):
        with pytest.raises(PatcherError, match="--engine-dtype"):
            build(sm, bad)
    P, model = refusal / "prompts", refusal / make_search_fixture.NAME
    base = ("search", model, *train_prompts(P), "--study", tmp_path / "s.db", "--trials", "1")
    r = run_cli(*base, "--engine", "onnx", "--engine-dtype", "int3", expect=1)
    assert "--engine-dtype: must be one of fp32, int4, int8, got 'int3'" in " ".join(r.output.split())
    r = run_cli(*base, "--engine-dtype", "int4", expect=1)
    assert "--engine-dtype: int4 weights run on the onnx engine only" in " ".join(r.output.split())
    assert "Traceback" not in r.output and not (tmp_path / "s.db").exists()  # refused before any work


def test_int4_search_is_a_study_of_its_own(tmp_path, refusal):
    P, model = refusal / "prompts", refusal / make_search_fixture.NAME
    args = ["search", model, *train_prompts(P), "--no-chat-template", "--tokens", "8", "--max-prompts", "8"]
    args += ["--engine", "onnx", "--study", tmp_path / "q.db", "--no-heuristic", "--no-prune"]
    r = run_cli(*args, "--engine-dtype", "int4", "--trials", "2")
    study = st.open_study(tmp_path / "q.db", None, create=False)
    assert "Pareto front" in r.output and len(st.completed(study)) == 2
    assert st.study_attrs(study, tmp_path / "q.db")["evaluation"]["engine"] == "onnx-int4"
    r = run_cli(*args, "--trials", "3", expect=1)  # the same study on the fp32 engine: other scores
    assert "different evaluation" in r.output


def test_quantized_build_releases_each_source_tensor(tmp_path, monkeypatch):
    """Each matrix read through its mapped view leaves the resident set once quantized (a 1B llama's int4
    build otherwise held the whole 2.5 GB file: BENCHMARKS.md, Quantized onnx engine)."""
    sm = StreamedModel(Checkpoint(fixture_path("llama")))
    released: list[str] = []
    monkeypatch.setattr(sm.ck, "release", released.append)
    model = build(sm, "int4")
    storage.write_model(model, tmp_path / "model.onnx")
    quantized = set(json.loads(model.metadata_props["patcher.quantized"]))
    assert len(quantized) > 7 * sm.n_layers and quantized <= set(released)


def test_an_interrupted_build_leaves_no_graph(tmp_path, monkeypatch):
    from patcher.search import onnx_engine

    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path))
    sm = StreamedModel(Checkpoint(fixture_path("llama")))

    def interrupted(model, path, *a):
        (Path(path).parent / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(onnx_engine.storage, "write_model", interrupted)
        with pytest.raises(KeyboardInterrupt):
            OnnxEngine(sm, dtype="int4")
    assert not list((tmp_path / "search").iterdir())  # neither a graph nor its partial folder
    ids, mask, pos = batch()
    assert np.isfinite(OnnxEngine(sm, dtype="int4").forward(ids, mask, pos, None, None)).all()
