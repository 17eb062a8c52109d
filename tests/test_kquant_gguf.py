"""K-quant GGUFs as llama.cpp makes them: a synthetic llama (d_model 256, so K super-blocks fit) quantized by
llama.cpp's own llama_model_quantize to Q4_K_M, Q5_K_M, Q6_K, Q3_K_M and Q2_K, ablated by patcher, then
checked with the gguf package's dequantizers (types kept, untouched tensors byte for byte, leakage) and run
by llama.cpp (logits equal patcher's forward pass of the same file)."""

import ctypes
import json
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
sys.path.insert(0, str(ROOT / "scripts"))
import make_gguf_fixtures as mk  # noqa: E402

from patcher.model.execution import StreamedModel  # noqa: E402
from patcher.model.opened import Model  # noqa: E402

D, FF, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
IDS = np.array([5, 17, 40, 99, 3, 200, 7, 8, 61, 33])
FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q3_K_M": 12, "Q2_K": 10}
# llama.cpp's CPU matmuls quantize activations to 8 bits per block (see test_gguf.py): observed ≤ 4 % of
# the largest logit on quantized weights
QUANT_TOL = 0.05


def _synthetic_llama(path, tmp_path):
    """The tiny llama fixture's vocabulary and metadata around random weights of d_model 256."""
    src = gguf.GGUFReader(mk.convert("llama", tmp_path / "tiny-llama.gguf", "F32"))
    sizes = {
        "llama.embedding_length": D,
        "llama.feed_forward_length": FF,
        "llama.block_count": LAYERS,
        "llama.rope.dimension_count": D // HEADS,
        "llama.attention.key_length": D // HEADS,
        "llama.attention.value_length": D // HEADS,
    }
    w = gguf.GGUFWriter(str(path), "llama")
    for key, f in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        value = sizes.get(key, f.contents())
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    rng = np.random.default_rng(11)
    vocab = int(next(t for t in src.tensors if t.name == "token_embd.weight").shape[1])
    hd = D // HEADS

    def dense(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w.add_tensor("token_embd.weight", dense(vocab, D) * 4)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.add_tensor("output.weight", dense(vocab, D))
    for b in range(LAYERS):
        for name, shape in (
            ("attn_q", (D, D)),
            ("attn_k", (KV_HEADS * hd, D)),
            ("attn_v", (KV_HEADS * hd, D)),
            ("attn_output", (D, D)),
            ("ffn_gate", (FF, D)),
            ("ffn_up", (FF, D)),
            ("ffn_down", (D, FF)),
        ):
            w.add_tensor(f"blk.{b}.{name}.weight", dense(*shape))
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{b}.{norm}.weight", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def k_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquant")
    f32 = _synthetic_llama(root / "synthetic-F32.gguf", root)
    made = {}

    def get(ftype: str):
        if ftype not in made:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[ftype]
            params.nthread = 1
            out = root / f"synthetic-{ftype}.gguf"
            assert (
                llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
                == 0
            )
            made[ftype] = out
        return made[ftype]

    return get


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _deq(t):
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(
        [int(n) for n in reversed(t.shape)]
    )


def _logits(path):
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, n_batch=64
    )
    try:
        llm.eval(list(IDS))
        return np.array(llm.scores[: len(IDS)], dtype=np.float64)
    finally:
        llm.close()


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_llama_cpp_k_quant_file_ablated_keeps_types_and_runs(ftype, k_files, tmp_path):
    src = k_files(ftype)
    rng = np.random.default_rng(5)
    r = rng.standard_normal(D)
    r /= np.linalg.norm(r)
    direction = tmp_path / "r.npy"
    np.save(direction, r.astype(np.float32))
    out = tmp_path / "ablated.gguf"
    text = run_cli("ablate", src, "-d", direction, "-o", out).output
    before, after = _tensors(src), _tensors(out)
    assert list(before) == list(after)
    edited = {"token_embd.weight"} | {
        f"blk.{b}.{n}.weight" for b in range(LAYERS) for n in ("attn_output", "ffn_down")
    }
    k_types = set()
    for name, t in before.items():
        assert after[name].tensor_type == t.tensor_type, name  # every type kept, K-quants included
        if name not in edited:
            assert bytes(t.data) == bytes(after[name].data), name
            continue
        k_types.add(t.tensor_type.name)
        w, stored = _deq(t), _deq(after[name])
        axis = 1 if name == "token_embd.weight" else 0
        comp = w @ r if axis else r @ w
        leak = np.linalg.norm(stored @ r if axis else r @ stored) / np.linalg.norm(comp)
        assert leak <= 0.01, (name, t.tensor_type.name, leak)
    assert k_types & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}, k_types  # the file has edited K tensors
    record = json.loads(gguf.GGUFReader(out).fields["patcher.edit"].contents())
    assert record["gguf_requant"] == "keep" and "gguf_retyped" not in record
    assert "→" not in text  # nothing re-typed
    # llama.cpp loads and runs what patcher wrote, and computes what patcher's forward of it computes
    got = _logits(out)
    ref = StreamedModel(Model.open(out)).run(IDS[None], np.ones((1, len(IDS)), np.int64), logits=True)[0]
    assert np.abs(got - ref).max() <= QUANT_TOL * np.abs(ref).max()
    diff = np.abs(got - ref).max() / np.abs(ref).max()
    edit = np.abs(got - _logits(src)).max() / np.abs(ref).max()
    assert edit > 3 * diff  # the ablation shows through llama.cpp's noise (measured 13-31 % vs 2-3 %)
