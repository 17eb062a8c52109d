"""GGUF in and out: tables against the gguf package's own name map, the HF view against the safetensors
fixtures, edits re-quantized with rounding that keeps the ablation (numbers from the gguf package's
dequantizer, not ours), hostile files, control vectors, diff; and llama.cpp itself (llama-cpp-python)
running what patcher wrote."""

import json
import math
import struct
import sys

import numpy as np
import pytest
from conftest import DEMO, FIXTURES, ROOT, fixture_path, run_cli, unit

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(ROOT / "scripts"))
import make_gguf_fixtures as mk  # noqa: E402

from patcher.io.gguf import GGUFFile  # noqa: E402
from patcher.model.architectures import TABLE_DIR, load_table, supported  # noqa: E402
from patcher.model.execution import StreamedModel  # noqa: E402
from patcher.model.opened import Model  # noqa: E402

DIRECTION = FIXTURES / "direction-64.npy"
R = unit(np.load(DIRECTION))
IDS = np.array([[5, 17, 40, 99, 3, 200, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])
FORWARD_ARCHS = ["llama", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "gpt2", "olmo2"]
# the targets: leakage after storage rounding, and weight error at most 1.25x plain re-rounding
LEAK_MAX = {
    "Q8_0": 0.005,
    "Q4_0": 0.01,
    "Q4_1": 0.01,
    "Q5_0": 0.01,
    "Q5_1": 0.01,
    "F16": 0.005,
    "BF16": 0.005,
}


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(model_type: str, qtype: str = "F32"):
        key = (model_type, qtype)
        if key not in made:
            made[key] = mk.convert(model_type, root / f"tiny-{model_type}-{qtype}.gguf", qtype)
        return made[key]

    return get


def _deq(path, name):
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == name)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)


# --- tables ---------------------------------------------------------------------------------------


def test_table_gguf_names_are_llama_cpps():
    """Every GGUF name in the tables is what gguf's TensorNameMap (convert_hf_to_gguf's map) makes of the
    HF name beside it, and a tensor kind llama.cpp declares for that architecture (MODEL_TENSORS)."""
    names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    checked = 0
    for mt in supported():
        a = load_table(TABLE_DIR / f"{mt}.toml")
        if a.gguf_layout is None or mt == "deepseek_v3":
            continue
        arch = names[a.gguf_layout.arch]
        tmap = gguf.TensorNameMap(arch, 4)
        declared = {gguf.TENSOR_NAMES[t].format(bid=0) for t in gguf.MODEL_TENSORS[arch]}
        for hf, gw in zip((*a.embeds, *a.writers), (*a.gguf.embeds, *a.gguf.writers)):
            full = a.prefixes[0] if hf.role == "embed" else a.prefixes[0] + a.layers.replace("{layer}", "0")
            hf_name = (full + hf.weight).replace(".{expert}", "").removesuffix(".weight")
            want = tmap.get_name(hf_name)
            got = ("" if hf.role == "embed" else "blk.0.") + gw.weight.removesuffix(".weight")
            if want is None:  # a writer llama.cpp's architecture does not have (qwen2moe's dense layers)
                assert got not in declared, (mt, got)
                continue
            assert want == got, (mt, hf_name, want, got)
            assert got in declared, (mt, got)
            if gw.post_norm:
                post = hf.post_norm.removesuffix(".weight")
                assert tmap.get_name(full + post) == "blk.0." + gw.post_norm.removesuffix(".weight"), (
                    mt,
                    post,
                )
            checked += 1
    assert checked >= 25


# --- reading ----------------------------------------------------------------------------------------


def test_inspect_gguf(ggufs):
    r = run_cli("inspect", ggufs("qwen3_moe", "Q4_1"), "--json")
    info = json.loads(r.output)
    assert info["format"] == "gguf" and info["gguf_architecture"] == "qwen3moe"
    assert (info["model_type"], info["layers"], info["d_model"]) == ("qwen3_moe", 3, 64)
    assert info["roles"]["mlp_out"] == [f"blk.{l}.ffn_down_exps.weight" for l in range(3)]
    assert info["quant_types_per_role"]["attn_out"] == {"Q4_1": 3}
    assert info["vocab"] == 384 and info["chat_template"]
    text = run_cli("inspect", ggufs("gemma2", "Q8_0")).output
    assert "post_attention_norm" not in text and "gemma2" in text and "Q8_0" in text


@pytest.mark.parametrize("model_type", FORWARD_ARCHS)
def test_forward_parity_with_safetensors(ggufs, model_type):
    """A float32 GGUF dequantizes to exactly the bf16 fixture: llama's q/k permutation, Gemma's 1 + w
    norms, GPT-2's transposes and the fused experts are all undone."""
    mask = np.ones_like(IDS)
    ref = StreamedModel(Model.open(fixture_path(model_type))).run(IDS, mask, logits=True)
    got = StreamedModel(Model.open(ggufs(model_type))).run(IDS, mask, logits=True)
    np.testing.assert_array_equal(got, ref)


def test_extract_parity_and_vocabulary(ggufs, tmp_path):
    from safetensors.numpy import load_file

    pos, neg = DEMO / "positive.txt", DEMO / "negative.txt"
    run_cli("extract", ggufs("qwen2"), "--positive", pos, "--negative", neg, "-o", tmp_path / "g.safetensors")
    run_cli(
        "extract",
        fixture_path("qwen2"),
        "--positive",
        pos,
        "--negative",
        neg,
        "-o",
        tmp_path / "s.safetensors",
    )
    a, b = load_file(tmp_path / "g.safetensors"), load_file(tmp_path / "s.safetensors")
    np.testing.assert_allclose(a["direction"], b["direction"], atol=1e-6)
    # the GGUF's own vocabulary and chat template tokenize like the tokenizer.json they came from
    from patcher.model.prompts import encode_prompts, load_tokenizer

    g = GGUFFile(ggufs("qwen2")).tokenizer()
    h = load_tokenizer(fixture_path("qwen2"))
    prompts = ["Tell me a story about a friendly robot.", "Numbers: 1 2 3 ünïcode"]
    assert encode_prompts(g, prompts) == encode_prompts(h, prompts)


def test_sentencepiece_vocabulary_tokenizes_like_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = mk.spm_vocab(tmp_path / "spm.gguf")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = GGUFFile(path).tokenizer()
    texts = [
        "the quick brown fox",
        "Tell me a story, über café!",
        "  two  spaces",
        "robot</s>x",
        "plants\ngrow",
    ]
    for text in texts:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text
    assert tok.decode(tok.encode(texts[1]), skip_special_tokens=True) == texts[1]
    llm.close()


# --- writing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"])
def test_ablate_round_trip(ggufs, tmp_path, qtype):
    src = ggufs("llama", qtype)
    out = tmp_path / "out.gguf"
    text = run_cli("ablate", src, "-d", DIRECTION, "-o", out).output
    assert "leakage written" in text and qtype in text
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
    # metadata: every key byte for byte, plus provenance
    for key, f in a.fields.items():
        if not key.startswith("GGUF."):
            g = b.fields[key]
            assert [bytes(p) for p in f.parts] == [bytes(p) for p in g.parts], key
    prov = json.loads(b.fields["patcher.edit"].contents())
    assert prov["op"] == "ablate" and prov["rounding"] == "orthogonal"
    edited = {"token_embd.weight"} | {
        f"blk.{l}.{n}.weight" for l in range(3) for n in ("attn_output", "ffn_down")
    }
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        assert tb[t.name].tensor_type == t.tensor_type  # the quant type is kept
        if t.name not in edited:
            assert bytes(t.data) == bytes(tb[t.name].data), t.name
    # leakage and weight error, measured with the gguf package's dequantizer and quantizer
    for name in sorted(edited):
        w = _deq(src, name)
        axis = 1 if name == "token_embd.weight" else 0
        comp = (R @ w) if axis == 0 else (w @ R)
        exact = w - np.outer(R, comp) if axis == 0 else w - np.outer(comp, R)
        stored = _deq(out, name)
        leak = np.linalg.norm(R @ stored if axis == 0 else stored @ R) / np.linalg.norm(comp)
        assert leak <= LEAK_MAX[qtype], (name, leak)
        t = gguf.GGMLQuantizationType[qtype]
        plain = np.asarray(
            gguf.quants.dequantize(gguf.quants.quantize(exact.astype(np.float32), t), t), np.float64
        )
        err, err_plain = np.linalg.norm(stored - exact), np.linalg.norm(plain - exact)
        assert err <= 1.25 * err_plain, (name, err / err_plain)
        if qtype in ("Q4_0", "Q4_1"):  # plain re-rounding undoes the ablation on 4-bit grids; ours does not
            plain_leak = np.linalg.norm(R @ plain if axis == 0 else plain @ R) / np.linalg.norm(comp)
            assert plain_leak > 10 * leak


def test_nearest_rounding_is_what_plain_requantizing_leaves(ggufs, tmp_path):
    out = tmp_path / "n.gguf"
    text = run_cli(
        "ablate", ggufs("llama", "Q4_1"), "-d", DIRECTION, "-o", out, "--rounding", "nearest"
    ).output
    assert "(nearest)" in text
    w, stored = _deq(ggufs("llama", "Q4_1"), "blk.1.ffn_down.weight"), _deq(out, "blk.1.ffn_down.weight")
    assert np.linalg.norm(R @ stored) / np.linalg.norm(R @ w) > 0.05


def _with_tensor_as(src, path, name, qtype, shape):
    """A copy of GGUF src with tensor `name` replaced by random valid `qtype` blocks of `shape`."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = f.contents()
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    rng = np.random.default_rng(0)
    for t in r.tensors:
        if t.name == name:
            w.add_tensor(
                t.name, mk._k_quant_bytes(shape, qtype, rng), raw_dtype=gguf.GGMLQuantizationType[qtype]
            )
        else:
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("source", ["Q4_K", "IQ4_XS"])
def test_k_quants_keep_their_type_iq_becomes_k(ggufs, tmp_path, source):
    """A K-quant is written in its own type by default (IQ: the nearest K type, said in the summary and
    the edit record); --requant still converts it."""
    name = "blk.0.ffn_down.weight"
    path = _with_tensor_as(ggufs("llama", "F32"), tmp_path / "k.gguf", name, source, (64, 256))
    before = _deq(path, name)
    for requant, stored, limit in (
        (None, "Q4_K", 0.01),
        ("q8_0", "Q8_0", 0.005),
        ("q4_0", "Q4_0", 0.01),
        ("q6_k", "Q6_K", 0.005),
    ):
        out = tmp_path / f"k-{requant}.gguf"
        args = ("--targets", "mlp_out", "--layers", "0") + (("--requant", requant) if requant else ())
        text = run_cli("ablate", path, "-d", DIRECTION, "-o", out, *args).output
        moved = f"{source}→{stored}"
        assert (moved in text) == (source != stored)
        record = json.loads(gguf.GGUFReader(out).fields["patcher.edit"].contents())
        assert record["gguf_requant"] == (requant.upper() if requant else "keep")
        assert record.get("gguf_retyped", {}).get(name) == (moved if source != stored else None)
        t = next(t for t in gguf.GGUFReader(out).tensors if t.name == name)
        assert t.tensor_type.name == stored
        after = _deq(out, name)
        assert np.linalg.norm(R @ after) / np.linalg.norm(R @ before) <= limit
        assert np.linalg.norm(after - (before - np.outer(R, R @ before))) / np.linalg.norm(before) < 0.1
    run_cli("ablate", path, "-d", DIRECTION, "-o", tmp_path / "x.gguf", "--requant", "q7_k", expect=1)


def test_post_norm_gguf_is_orthogonal_to_the_stored_gain(ggufs, tmp_path):
    """Gemma 2 stores g = 1 + w: the writers must be orthogonal to g ⊙ r̂, with g read as stored."""
    src, out = ggufs("gemma2", "F32"), tmp_path / "g2.gguf"
    run_cli("ablate", src, "-d", DIRECTION, "-o", out, "--targets", "attn_out")
    g = _deq(src, "blk.1.post_attention_norm.weight")
    u = unit(g * R)
    w = _deq(out, "blk.1.attn_output.weight")
    assert np.linalg.norm(u @ w) / np.linalg.norm(u @ _deq(src, "blk.1.attn_output.weight")) < 1e-5


def test_inject_bias_and_refusals(ggufs, tmp_path):
    out = tmp_path / "i.gguf"
    run_cli("inject", ggufs("llama", "Q8_0"), "-d", DIRECTION, "-o", out, "--layer", "1", "--alpha", "2.5")
    bias = _deq(out, "blk.1.ffn_down.bias")
    np.testing.assert_allclose(bias, 2.5 * R, atol=1e-6)
    r = run_cli(
        "inject",
        ggufs("qwen2"),
        "-d",
        DIRECTION,
        "-o",
        tmp_path / "q.gguf",
        "--layer",
        "1",
        "--alpha",
        "1",
        expect=1,
    )
    assert "--control-vector" in r.output and not (tmp_path / "q.gguf").exists()


def test_control_vector_file(ggufs, tmp_path):
    cv = tmp_path / "cv.gguf"
    run_cli(
        "inject",
        ggufs("qwen2", "Q8_0"),
        "-d",
        DIRECTION,
        "--control-vector",
        cv,
        "--layer",
        "1",
        "--alpha",
        "4",
    )
    r = gguf.GGUFReader(cv)
    assert r.fields["general.architecture"].contents() == "controlvector"
    assert r.fields["controlvector.model_hint"].contents() == "qwen2"
    (t,) = r.tensors
    assert t.name == "direction.1" and t.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(np.asarray(t.data), 4 * R, atol=1e-6)
    for bad in ("0", "3"):  # llama.cpp never reads direction.0 and applies 1..L-1 only
        run_cli(
            "inject",
            ggufs("qwen2"),
            "-d",
            DIRECTION,
            "--control-vector",
            tmp_path / f"b{bad}.gguf",
            "--layer",
            bad,
            "--alpha",
            "1",
            expect=1,
        )
        assert not (tmp_path / f"b{bad}.gguf").exists()


def test_diff_gguf(ggufs, tmp_path):
    src = ggufs("llama", "Q4_1")
    out = tmp_path / "a.gguf"
    run_cli("ablate", src, "-d", DIRECTION, "-o", out)
    rep = json.loads(run_cli("diff", src, out, "--json", "-d", DIRECTION, expect=1).output)
    changed = [t for t in rep["tensors"] if t["status"] == "changed"]
    assert len(changed) == 7 and all(t["rank99"] == 1 for t in changed)  # despite Q4_1 re-rounding noise
    assert "rank-1" in rep["verdict"] and rep["direction_cosine"] > 0.98
    # GGUF vs the safetensors it came from: same values, nothing changed
    rep = json.loads(run_cli("diff", fixture_path("llama"), ggufs("llama"), "--json").output)
    assert rep["verdict"] == "unchanged" and rep["counts"]["identical"] == rep["counts"]["base_tensors"] == 30


# --- hostile files --------------------------------------------------------------------------------------


def _corrupt(src, tmp_path, how):
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "magic":
        data[:4] = b"GGML"
    elif how == "count":
        data[8:16] = struct.pack("<Q", 1 << 40)
    elif how == "offset":
        r = gguf.GGUFReader(src)
        t = r.tensors[-1]
        at = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:-1])
        data[at : at + 8] = struct.pack("<Q", 1 << 30)
    path = tmp_path / f"{how}.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["truncated", "magic", "count", "offset"])
def test_hostile_gguf(ggufs, tmp_path, how):
    bad = _corrupt(ggufs("llama", "Q8_0"), tmp_path, how)
    for args in (("inspect", bad), ("ablate", bad, "-d", DIRECTION, "-o", tmp_path / "o.gguf")):
        r = run_cli(*args, expect=1)
        assert r.output.count("\n") == 1 and "error" in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


# --- llama.cpp itself ------------------------------------------------------------------------------------


def _llama(path, ids, cvec=None):
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, n_batch=64
    )
    try:
        if cvec is not None:  # the buffer llama.cpp's common loader builds from a control-vector file
            data = np.ascontiguousarray(cvec, dtype=np.float32).ravel()
            buf = (ctypes.c_float * data.size).from_buffer(data)
            n_embd = cvec.shape[1]
            assert llama_cpp.llama_set_adapter_cvec(llm.ctx, buf, data.size, n_embd, 1, cvec.shape[0]) == 0
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float64), llm.tokenize(
            b"The quick brown fox", add_bos=False
        )
    finally:
        llm.close()


def _cvec_buffer(path, n_layers):
    """Read a control vector file the way llama.cpp's llama_control_vector_load does."""
    r = gguf.GGUFReader(path)
    n = int(r.tensors[0].data.size)
    buf = np.zeros((n_layers - 1, n), dtype=np.float32)
    for t in r.tensors:
        layer = int(t.name.split(".")[1])
        assert layer >= 1
        buf[layer - 1] += np.asarray(t.data)
    return buf


# F32 weights: llama.cpp keeps the KV cache in f16 (relative 2^-11 per value); observed ≤ 3e-3 on
# logits ≤ 40.
# Quantized weights: ggml's CPU dot products also quantize the activations to 8 bits per block, observed
# ≤ 4 % of the largest logit; greedy tokens must agree wherever patcher's top-2 margin exceeds that.
F32_TOL, QUANT_TOL = 1e-2, 0.05


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gpt2", "olmo2"])
def test_llama_cpp_runs_the_fixtures_as_patcher_does(ggufs, model_type):
    path = ggufs(model_type)
    ids = IDS[0]
    ref = StreamedModel(Model.open(path)).run(ids[None], np.ones((1, len(ids)), np.int64), logits=True)[0]
    got, toks = _llama(path, ids)
    assert np.abs(got - ref).max() <= F32_TOL
    assert toks == GGUFFile(path).tokenizer().encode("The quick brown fox", add_special_tokens=False)


def test_llama_cpp_runs_edited_ggufs(ggufs, tmp_path):
    src = ggufs("llama", "Q4_1")
    out, inj, cv = tmp_path / "abl.gguf", tmp_path / "inj.gguf", tmp_path / "cv.gguf"
    text = run_cli("ablate", src, "-d", DIRECTION, "-o", out).output
    alpha, layer = 6.0, 1
    run_cli("inject", src, "-d", DIRECTION, "-o", inj, "--layer", layer, "--alpha", alpha)
    run_cli("inject", src, "-d", DIRECTION, "--control-vector", cv, "--layer", layer, "--alpha", alpha)
    ids = IDS[0]
    for path in (src, out, inj):
        ref = StreamedModel(Model.open(path)).run(ids[None], np.ones((1, len(ids)), np.int64), logits=True)[0]
        got, _ = _llama(path, ids)
        tol = QUANT_TOL * np.abs(ref).max()
        assert np.abs(got - ref).max() <= tol, path.name
        top2 = np.sort(ref, axis=-1)[:, -2:]
        sure = top2[:, 1] - top2[:, 0] > 2 * tol
        assert np.array_equal(got.argmax(-1)[sure], ref.argmax(-1)[sure])
    # the control vector, applied by llama.cpp, acts as the same vector as a bias: +alpha r̂ after block 1
    base, _ = _llama(src, ids)
    steered, _ = _llama(src, ids, _cvec_buffer(cv, 3))
    biased, _ = _llama(inj, ids)
    assert np.abs(steered - base).max() > 0.1  # it changes the logits ...
    np.testing.assert_allclose(steered, biased, atol=1e-3)  # ... as +alpha r̂ at resid_pre[2] predicts
    wrong, _ = _llama(src, ids, np.roll(_cvec_buffer(cv, 3), 1, axis=0))  # one block later: another result
    assert np.abs(wrong - biased).max() > 0.1
    # the ablated model's residual stream (patcher's forward of the dequantized GGUF llama.cpp just ran)
    worst = max(float(x) for x in _leakages(text))
    mask = np.ones_like(IDS)
    comps = {}
    for key, path in (("orig", src), ("abl", out)):
        acc = {}
        StreamedModel(Model.open(path)).run(
            IDS, mask, on_resid=lambda l, x: acc.__setitem__(l, x.astype(np.float64) @ R)
        )
        comps[key] = acc
    for l in comps["orig"]:
        share = np.abs(comps["abl"][l]).mean() / np.abs(comps["orig"][l]).mean()
        assert share <= min(0.01, 2 * worst), (l, share, worst)


def _leakages(text: str):
    """The per-tensor maximum the ablate summary reports ('max X (tensor)')."""
    import re

    return re.findall(r"max ([0-9.e+-]+) \(", text)


def test_leakage_summary_numbers_match_the_file(ggufs, tmp_path):
    out = tmp_path / "s.gguf"
    text = run_cli("ablate", ggufs("llama", "Q4_1"), "-d", DIRECTION, "-o", out).output
    reported = float(_leakages(text)[0])
    measured = []
    for name in ["token_embd.weight"] + [
        f"blk.{l}.{n}.weight" for l in range(3) for n in ("attn_output", "ffn_down")
    ]:
        w, s = _deq(ggufs("llama", "Q4_1"), name), _deq(out, name)
        axis = 1 if name == "token_embd.weight" else 0
        measured.append(
            np.linalg.norm(R @ s if axis == 0 else s @ R) / np.linalg.norm(R @ w if axis == 0 else w @ R)
        )
    assert math.isclose(max(measured), reported, rel_tol=0.02)


def test_fp8_requantize_keeps_the_ablation(tmp_path, direction64):
    """The same per-element rounding on the FP8 block grid (scales fixed first), row block by row block
    with the residual carried: leakage far below plain round-to-nearest's."""
    from patcher_kernels.fp8 import dequantize_blocks, quantize_blocks
    from test_fp8 import make_fp8_model

    from patcher.io.checkpoint import Checkpoint

    src = make_fp8_model(tmp_path, "F32")
    out = tmp_path / "out"
    run_cli("ablate", src, "-d", direction64, "-o", out, "--targets", "attn_out,mlp_out")
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    with Checkpoint(src) as a, Checkpoint(out) as b:
        w = dequantize_blocks(a.array(name), a.array(name + "_scale_inv").astype(np.float32)).astype(
            np.float64
        )
        scale = b.array(name + "_scale_inv").astype(np.float32)
        w2 = dequantize_blocks(b.array(name), scale).astype(np.float64)
    exact = w - np.outer(R, R @ w)
    plain = dequantize_blocks(quantize_blocks(exact.astype(np.float32), scale), scale).astype(np.float64)
    leak, leak_plain = (np.linalg.norm(R @ v) / np.linalg.norm(R @ w) for v in (w2, plain))
    assert leak <= 0.005 < leak_plain
    assert np.linalg.norm(w2 - exact) <= 1.3 * np.linalg.norm(plain - exact)  # measured 1.24x (e4m3: 3 bits)


def test_chunked_rounding_writes_the_same_bytes(ggufs, tmp_path, monkeypatch):
    """Written vectors round independently, so column chunks (residual axis 0) and row chunks
    (embeddings) that bound memory on big matrices change nothing in the file."""
    from patcher.edit import gguf_apply

    src = ggufs("llama", "Q4_1")
    run_cli("ablate", src, "-d", DIRECTION, "-o", tmp_path / "a.gguf")
    monkeypatch.setattr(gguf_apply, "COL_CHUNK", 32)
    monkeypatch.setattr(gguf_apply, "ROW_CHUNK", 100)
    run_cli("ablate", src, "-d", DIRECTION, "-o", tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
