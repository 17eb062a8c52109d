"""`patcher convert` on the fixtures: safetensors -> GGUF against the independent converter in
scripts/make_gguf_fixtures.py (the gguf package's writer and name map), the round trip safetensors ->
GGUF F32 -> safetensors exact, HF transformers loading the result strictly, llama.cpp running what convert
wrote, and the output and option rules. The real model (SmolLM2) is in tests/real/."""

import json
import sys

import numpy as np
import pytest
from conftest import ROOT, fixture_path, run_cli

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(ROOT / "scripts"))
import make_gguf_fixtures as mk  # noqa: E402

from patcher.model.opened import Model  # noqa: E402
from patcher.model.prompts import load_tokenizer  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gpt2", "olmo2"]
PROMPTS = ["Tell me a story", "How do plants grow? 1234 don't", "  spaces\nand lines"]


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def _weights(folder) -> dict:
    with Model.open(folder) as m:
        return {n: np.array(m.array(n)) for n in m.tensors}


@pytest.mark.parametrize("model_type", ARCHS)
def test_gguf_matches_the_reference_converter(model_type, tmp_path):
    """Every tensor (name, type, shape, bytes) and every hyperparameter and vocabulary key the gguf
    package's own writer puts in the file."""
    ours = tmp_path / "ours.gguf"
    run_cli("convert", fixture_path(model_type), "-o", ours, "--type", "F32")
    ref = mk.convert(model_type, tmp_path / "ref.gguf", "F32")
    a, b = _tensors(ours), _tensors(ref)
    assert set(a) == set(b)
    for name, t in b.items():
        assert a[name].tensor_type == t.tensor_type and list(a[name].shape) == list(t.shape), name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(t.data)), name
    fa, fb = _fields(ours), _fields(ref)
    for key in sorted(fb):
        if key.startswith(("general.name", "general.file_type")) or key.endswith("value_length"):
            continue
        assert key in fa, key
        assert fa[key] == pytest.approx(fb[key]) if isinstance(fb[key], float) else fa[key] == fb[key], key
    assert json.loads(fa["patcher.convert"])["type"] == "F32"


@pytest.mark.parametrize("model_type", ARCHS)
def test_round_trip_is_exact_and_loads_in_hf(model_type, tmp_path):
    """fixture (bf16) -> GGUF F32 -> HF bf16: the same bytes, the same token ids, and HF transformers
    loads it strictly and computes the fixture's logits."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    src = fixture_path(model_type)
    run_cli("convert", src, "-o", tmp_path / "m.gguf", "--type", "F32")
    run_cli("convert", tmp_path / "m.gguf", "-o", tmp_path / "back", "--dtype", "bf16")
    a, b = _weights(src), _weights(tmp_path / "back")
    assert set(a) <= set(b) and set(b) - set(a) <= {"lm_head.weight"}
    for name, v in a.items():
        assert b[name].dtype == v.dtype and np.array_equal(b[name].view(np.uint16), v.view(np.uint16)), name
    ta, tb = load_tokenizer(src), load_tokenizer(tmp_path / "back")
    for p in PROMPTS:
        assert ta.encode(ta.render(p)) == tb.encode(tb.render(p)), p
    ids = torch.tensor([ta.encode(ta.render(PROMPTS[1]))])
    logits = []
    for folder in (src, tmp_path / "back"):
        m, info = T.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            logits.append(m.eval()(ids).logits.numpy())
    assert np.abs(logits[0] - logits[1]).max() <= 1e-5 * max(1.0, np.abs(logits[0]).max())


@pytest.mark.parametrize("qtype,tol", [("F32", 1e-2), ("F16", 2e-2), ("BF16", 5e-2), ("Q8_0", 0.1)])
def test_llama_cpp_runs_what_convert_wrote(qtype, tol, tmp_path):
    """llama.cpp loads each type and computes HF's logits on the fixture (within the type's rounding),
    and tokenizes as the fixture's tokenizer.json does."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    llama_cpp = pytest.importorskip("llama_cpp")
    src = fixture_path("llama")
    out = tmp_path / f"m-{qtype}.gguf"
    run_cli("convert", src, "-o", out, "--type", qtype)
    tok = load_tokenizer(src)
    text = tok.render(PROMPTS[0])
    ids = tok.encode(text)
    with torch.no_grad():
        ref = (
            T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            .eval()(torch.tensor([ids]))
            .logits[0]
            .numpy()
        )
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max())
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types == {"F32"} if qtype == "F32" else types == {"F32", qtype}


@pytest.mark.parametrize(
    "dtype,numpy_dtype", [("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16")]
)
def test_gguf_to_hf_dtypes(dtype, numpy_dtype, tmp_path):
    """Each --dtype stores the GGUF's values rounded to nearest even; the manifest and config say so."""
    import ml_dtypes  # noqa: F401  (bfloat16 for numpy)

    src = mk.convert("qwen2", tmp_path / "src.gguf", "Q8_0")
    run_cli("convert", src, "-o", tmp_path / "out", "--dtype", dtype)
    with Model.open(src) as g:
        view = g.forward_model()
        want = {n: view.array(n) for n in view.tensors}
    got = _weights(tmp_path / "out")
    assert set(got) == set(want)
    for name, v in want.items():
        assert np.array_equal(got[name], v.astype(numpy_dtype)), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    made = json.loads((tmp_path / "out" / "patcher-manifest.json").read_text())
    assert made["kind"] == "convert" and src.name in made["inputs"] and "model.safetensors" in made["outputs"]


def test_large_models_are_sharded(tmp_path, monkeypatch):
    from patcher.pipelines import convert

    monkeypatch.setattr(convert, "SHARD_BYTES", 40_000)
    src = mk.convert("llama", tmp_path / "src.gguf", "F32")
    run_cli("convert", src, "-o", tmp_path / "out", "--dtype", "fp32")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with Model.open(src) as g:
        view = g.forward_model()
        want = {n: view.array(n) for n in view.tensors}
    got = _weights(tmp_path / "out")
    assert all(np.array_equal(got[n], v) for n, v in want.items())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--type", "Q4_K"], "--type: must be one of F32, F16, BF16, Q8_0"),
        (["--dtype", "int8"], "--dtype: must be one of bf16, fp16, fp32"),
        (["--to", "onnx"], "--to: must be hf or gguf"),
        (["--to", "hf"], "already HF safetensors"),
    ],
)
def test_bad_options_are_one_line(args, message, tmp_path):
    res = run_cli("convert", fixture_path("llama"), "-o", tmp_path / "x.gguf", *args, expect=1)
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x.gguf").exists()


def test_output_names_say_the_format(tmp_path):
    res = run_cli("convert", fixture_path("llama"), "-o", tmp_path / "model", expect=1)
    assert "name it *.gguf" in res.output and not (tmp_path / "model").exists()
    src = mk.convert("llama", tmp_path / "src.gguf", "F32")
    res = run_cli("convert", src, "-o", tmp_path / "out.gguf", expect=1)
    assert "writes a folder" in res.output and not (tmp_path / "out.gguf").exists()


def test_output_rules(tmp_path):
    src = tmp_path / "model"
    import shutil

    shutil.copytree(fixture_path("llama"), src)
    res = run_cli("convert", src, "-o", src / "inside.gguf", expect=1)
    assert "inside the input folder" in res.output
    (tmp_path / "mine.gguf").write_bytes(b"not patcher's")
    res = run_cli("convert", src, "-o", tmp_path / "mine.gguf", "--force", expect=1)
    assert "was not written by patcher" in res.output
    assert (tmp_path / "mine.gguf").read_bytes() == b"not patcher's"
    run_cli("convert", src, "-o", tmp_path / "ok.gguf")
    res = run_cli("convert", src, "-o", tmp_path / "ok.gguf", expect=1)
    assert "already exists" in res.output
    run_cli("convert", src, "-o", tmp_path / "ok.gguf", "--force")  # its own earlier output: replaced
    run_cli("convert", tmp_path / "ok.gguf", "-o", tmp_path / "hf")
    run_cli("convert", tmp_path / "ok.gguf", "-o", tmp_path / "hf", "--force")
    res = run_cli("convert", tmp_path / "ok.gguf", "-o", tmp_path / "x", "--to", "gguf", expect=1)
    assert "already GGUF" in res.output


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    from patcher.pipelines import convert

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")
        yield  # unreachable: makes this a generator, as the real producers are

    monkeypatch.setattr(convert, "_gguf_blocks", boom)
    monkeypatch.setattr(convert, "_hf_blocks", boom)
    run_cli("convert", fixture_path("llama"), "-o", tmp_path / "x.gguf", expect=1)
    src = mk.convert("llama", tmp_path / "src.gguf", "F32")
    run_cli("convert", src, "-o", tmp_path / "hf", expect=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]
