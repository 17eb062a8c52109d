"""`ablate --adapter OUT.gguf` in llama.cpp itself (llama-cpp-python, test extra): the base GGUF with the
LoRA applied (`lora_path=`) must compute what the GGUF of patcher's merged checkpoint computes.

The GGUFs are written here by a minimal safetensors -> GGUF converter for llama, qwen2 and qwen3_moe (F32,
names from the gguf package's TensorNameMap, llama's q/k rows permuted for llama.cpp's rope and experts
stacked into `_exps` tensors as convert_hf_to_gguf.py does), with the fixture's byte-level BPE vocabulary
as tokenizer.ggml.*.

Tolerances. Both llama.cpp runs use F32 weights and an f16 KV cache: the LoRA run computes Wx + B(Ax)
where the merged run computes W'x, so K/V values that differ by fp32 rounding can land on neighbouring
f16 values (2^-11 relative). Measured |LoRA - merged| ≤ 2.1e-4 on logits ≤ 4.3 (1e-6 where no f16 value
flips): we allow 1e-3. Against HF transformers on the merged checkpoint the f16 cache alone gives
≤ 2.3e-3 (as the gguf tests measure for plain F32 GGUFs): 1e-2. The edit moves the logits by ≥ 1.4.
"""

import json
import re

import numpy as np
import pytest
from conftest import fixture_path, run_cli
from test_adapter import f32_copy

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3_moe": "qwen3moe"}
EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(\w+_proj)\.weight")
SAME_TOL, HF_TOL = 1e-3, 1e-2


def _permute(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder, out):
    cfg = json.loads((folder / "config.json").read_text())
    mt = cfg["model_type"]
    arrays = {}
    for f in sorted(folder.glob("*.safetensors")):
        arrays.update({k: v.float().numpy() for k, v in load_file(f).items()})
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[ARCH[mt]]
    tmap = gguf.get_tensor_name_map(arch_id, cfg["num_hidden_layers"])
    w = gguf.GGUFWriter(str(out), ARCH[mt])
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    if cfg.get("num_experts"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
    w.add_file_type(0)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    special = {a["content"]: a["id"] for a in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(special["<s>"])
    w.add_eos_token_id(special["</s>"])
    w.add_add_bos_token(False)
    stacked = {}  # per-expert HF weights -> one [experts, out, in] tensor, as convert_hf_to_gguf.py does
    for name in [n for n in arrays if EXPERT.match(n)]:
        m = EXPERT.match(name)
        stacked.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = arrays.pop(name)
    arrays.update({n: np.stack([e[i] for i in sorted(e)]) for n, e in stacked.items()})
    for name, v in arrays.items():
        base, suffix = name.rsplit(".", 1)
        if mt == "llama" and base.endswith(("q_proj", "k_proj")):
            v = _permute(v, heads if base.endswith("q_proj") else kv)
        w.add_tensor(tmap.get_name(base) + "." + suffix, np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def run_llama(path, ids, lora=None):
    llm = llama_cpp.Llama(
        model_path=str(path),
        lora_path=str(lora) if lora else None,
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=1,
        n_batch=64,
    )
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


@pytest.mark.parametrize(
    "model_type,opts",
    [
        ("llama", ()),
        ("qwen2", ("--targets", "attn_out,mlp_out")),
        ("llama", ("--scale", "0.6", "--layers", "0,2")),
        ("qwen3_moe", ()),
    ],
)
def test_llama_cpp_lora_equals_merged_gguf(model_type, opts, tmp_path, direction64):
    src = f32_copy(model_type, tmp_path / "base")
    merged, lora = tmp_path / "merged", tmp_path / "edit.gguf"
    run_cli("ablate", src, "-d", direction64, "-o", merged, *opts)
    run_cli("ablate", src, "-d", direction64, "--adapter", lora, *opts)
    r = gguf.GGUFReader(lora)
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == 1.0
    assert json.loads(r.fields["patcher.edit"].contents())["adapter"] == "gguf"
    assert "config.json" in json.loads(r.fields["patcher.inputs"].contents())
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # GGUF order: ne0 first
    if model_type == "qwen3_moe":  # 4 experts, moe_intermediate 32, d_model 64, rank 1
        assert shapes["blk.0.ffn_down_exps.weight.lora_a"] == (32, 1, 4)
        assert shapes["blk.0.ffn_down_exps.weight.lora_b"] == (1, 64, 4)
    base_gguf = write_gguf(src, tmp_path / "base.gguf")
    merged_gguf = write_gguf(merged, tmp_path / "merged.gguf")
    ids = np.random.default_rng(2).integers(7, 380, size=16)
    z0 = run_llama(base_gguf, ids)
    want = run_llama(merged_gguf, ids)
    got = run_llama(base_gguf, ids, lora=lora)
    assert np.abs(want - z0).max() > 0.3, "the edit must move the logits, or the test says nothing"
    assert np.abs(got - want).max() <= SAME_TOL, f"max |LoRA - merged| = {np.abs(got - want).max():.3g}"
    # and llama.cpp agrees with HF transformers on the merged model (same weights, f16 KV cache)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids[None])).logits[0].double().numpy()
    assert np.abs(got - ref).max() <= HF_TOL, f"|llama.cpp LoRA - HF| = {np.abs(got - ref).max():.3g}"


def test_gguf_lora_refuses_tied_embedding(tmp_path, direction64):
    res = run_cli(
        "ablate", fixture_path("gemma2"), "-d", direction64, "--adapter", tmp_path / "a.gguf", expect=1
    )
    assert "tied embeddings" in res.output and not (tmp_path / "a.gguf").exists()
