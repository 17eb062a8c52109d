"""Convert the tiny safetensors fixtures to GGUF the way llama.cpp's convert_hf_to_gguf.py does, with the
gguf package's own writer, quantizer and name map (TensorNameMap), independently of patcher's tables.

    python scripts/make_gguf_fixtures.py --out DIR [--types F32,Q8_0,Q4_1] [--archs llama,qwen2]

Converter transforms reproduced: llama q/k rows permuted for llama.cpp's rope, Gemma norm gains stored as
1 + w, GPT-2 Conv1D weights transposed, per-expert MoE weights stacked into 3-D `_exps` tensors. 2-D
weights take the requested type (as llama-quantize does); norms and biases stay F32. K-quant types
(Q4_K, Q6_K) and IQ4_XS, which the gguf package cannot quantize, get random valid blocks with sane scales,
so the re-quantization path can be tested. The vocabulary is the fixture's byte-level BPE (tokenizer.json) as
tokenizer.ggml.*; llama.cpp loads it. Deterministic.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

GGUF_ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "olmo2": "olmo2",
    "mistral": "llama",
    "qwen2_moe": "qwen2moe",
    "gemma": "gemma",
}
GEMMA = {"gemma", "gemma2", "gemma3_text"}
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# block, bytes, fp16 scale offsets (IQ4_XS: an IQ type, which patcher reads but writes as a K type)
K_QUANTS = {"Q4_K": (256, 144, (0, 2)), "Q6_K": (256, 210, (208,)), "IQ4_XS": (256, 136, (0,))}


def _finish(w) -> None:
    """GGUFWriter's closing sequence: header, metadata, tensors."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _load(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    arrays = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            arrays.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
        except TypeError:
            from patcher.io.checkpoint import Checkpoint

            with Checkpoint(folder) as ck:
                return cfg, {n: ck.array(n).astype(np.float32) for n in ck.tensors}
    return cfg, arrays


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_to_gguf(model_type: str, cfg: dict, arrays: dict) -> dict[str, np.ndarray]:
    import gguf

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[GGUF_ARCH[model_type]]
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    tmap = gguf.TensorNameMap(arch_id, layers)
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    kv = cfg.get("num_key_value_heads", heads)
    out, experts = {}, {}
    for name, w in arrays.items():
        if model_type == "gpt2" and name.endswith(CONV1D):
            w = w.T
        if model_type in GEMMA and name.endswith("norm.weight"):
            w = w + 1.0
        if GGUF_ARCH[model_type] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _permute(w, heads if "q_proj" in name else kv)
        m = re.match(r"(.*\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if m:
            experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = w
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SystemExit(f"no GGUF name for {name}")
        out[new] = w
    for base, by_e in experts.items():
        out[tmap.get_name(base) + ".weight"] = np.stack([by_e[e] for e in sorted(by_e)])
    return out


def _metadata(w, model_type: str, cfg: dict, arrays: dict) -> None:
    arch = GGUF_ARCH[model_type]
    g = lambda *ks, d=None: next((cfg[k] for k in ks if cfg.get(k) is not None), d)  # noqa: E731
    d = g("hidden_size", "n_embd")
    heads = g("num_attention_heads", "n_head")
    head_dim = g("head_dim", d=d // heads)
    w.add_context_length(g("max_position_embeddings", "n_positions", d=128))
    w.add_embedding_length(d)
    w.add_block_count(g("num_hidden_layers", "n_layer"))
    w.add_feed_forward_length(g("intermediate_size", d=4 * d))
    w.add_head_count(heads)
    w.add_head_count_kv(g("num_key_value_heads", d=heads))
    if model_type == "gpt2":
        w.add_layer_norm_eps(g("layer_norm_epsilon", d=1e-5))
    else:
        w.add_layer_norm_rms_eps(g("rms_norm_eps", d=1e-6))
        w.add_rope_freq_base(g("rope_theta", d=10000.0))
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if g("sliding_window"):
        w.add_sliding_window(g("sliding_window"))
    if g("sliding_window_pattern"):
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", g("sliding_window_pattern"))
    if g("attn_logit_softcapping"):
        w.add_attn_logit_softcapping(g("attn_logit_softcapping"))
    if g("final_logit_softcapping"):
        w.add_final_logit_softcapping(g("final_logit_softcapping"))
    if g("num_experts"):
        w.add_expert_count(g("num_experts"))
        w.add_expert_used_count(g("num_experts_per_tok"))
        w.add_expert_feed_forward_length(g("moe_intermediate_size"))
        if g("norm_topk_prob") is not None:
            w.add_expert_weights_norm(bool(g("norm_topk_prob")))
    w.add_file_type(0)


def _vocab(w, folder: Path) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"]: a["id"] for a in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # CONTROL / NORMAL
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(special[tc["bos_token"]])
    w.add_eos_token_id(special[tc["eos_token"]])
    w.add_pad_token_id(special[tc["pad_token"]])
    w.add_add_bos_token(False)  # tokenizer.json has no post-processor: no BOS, as HF tokenizes it
    w.add_chat_template(tc["chat_template"])


def _k_quant_bytes(shape, qtype: str, rng) -> np.ndarray:
    block, nbytes, scale_at = K_QUANTS[qtype]
    rows, n = int(np.prod(shape[:-1])), shape[-1]
    raw = rng.integers(0, 256, (rows, n // block, nbytes), dtype=np.uint8)
    for at in scale_at:
        raw[..., at : at + 2] = np.full((rows, n // block, 1), 0.002, dtype=np.float16).view(np.uint8)
    return raw.reshape(*shape[:-1], n // block * nbytes)


def convert(model_type: str, out: Path, qtype: str = "F32", src: Path | None = None) -> Path:
    import gguf

    folder = src or FIXTURES / f"tiny-{model_type.replace('_', '-')}"
    cfg, arrays = _load(folder)
    tensors = _hf_to_gguf(model_type, cfg, arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), GGUF_ARCH[model_type])
    w.add_name(f"tiny-{model_type}")
    _metadata(w, model_type, cfg, arrays)
    _vocab(w, folder)
    rng = np.random.default_rng(sum(model_type.encode()))
    for name, v in tensors.items():
        quantize = v.ndim >= 2 and qtype != "F32" and v.shape[-1] % 32 == 0
        if not quantize:
            w.add_tensor(name, v.astype(np.float32))
        elif qtype in K_QUANTS:
            if v.shape[-1] % K_QUANTS[qtype][0]:
                w.add_tensor(
                    name,
                    gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0),
                    raw_dtype=gguf.GGMLQuantizationType.Q8_0,
                )
            else:
                w.add_tensor(
                    name, _k_quant_bytes(v.shape, qtype, rng), raw_dtype=gguf.GGMLQuantizationType[qtype]
                )
        else:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(v, t), raw_dtype=t)
    _finish(w)
    return out


SPM_CORPUS = (
    "the quick brown fox jumps over the lazy dog tell me a story about a friendly robot how do plants grow"
)


def spm_vocab(out: Path) -> Path:
    """A vocabulary-only GGUF with a SentencePiece-BPE vocabulary (tokenizer.ggml.model 'llama'): specials,
    the 256 <0xXX> byte-fallback pieces, characters, and word pieces with shuffled scores."""
    import gguf

    rng = np.random.default_rng(1)
    tokens, types, scores = ["<unk>", "<s>", "</s>"], [2, 3, 3], [0.0, 0.0, 0.0]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    scores += [0.0] * 256
    pieces = ["\u2581", *sorted(set(SPM_CORPUS.replace(" ", "")))]
    for w in sorted(set(SPM_CORPUS.split())):
        pieces += [("\u2581" + w)[:n] for n in range(2, len(w) + 2)] + [
            w[n - 2 : n] for n in range(2, len(w))
        ]
    pieces = list(dict.fromkeys(pieces))
    for p, s in zip(pieces, -rng.permutation(len(pieces)).astype(float)):
        tokens.append(p)
        types.append(1)
        scores.append(float(s) if len(p) > 1 else -1000.0)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_context_length(64)
    w.add_head_count(4)
    w.add_feed_forward_length(64)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    _finish(w)
    return out


def big_vocab(out: Path, n_tokens: int = 262_144, d_model: int = 32, qtype: str = "Q8_0") -> Path:
    """A one-layer llama GGUF with an n_tokens byte-level BPE vocabulary (Gemma 3's size by default):
    every token past the 256 bytes is the merge of two earlier ones, with scores and token types, so
    the file is a valid model llama.cpp loads; random weights, the embedding in `qtype`."""
    import gguf

    rng = np.random.default_rng(262)
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x1A1)]
    tokens, merges, seen = alphabet[:256], [], set(alphabet[:256])
    while len(tokens) < n_tokens - 2:
        for a, b in rng.random((n_tokens, 2)):
            x, y = tokens[int(a * len(tokens))], alphabet[int(b * 256)]
            if x + y not in seen and len(tokens) < n_tokens - 2:
                seen.add(x + y)
                tokens.append(x + y)
                merges.append(f"{x} {y}")
    tokens += ["<bos>", "<eos>"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("synthetic-262k")
    w.add_context_length(128)
    w.add_embedding_length(d_model)
    w.add_block_count(1)
    w.add_feed_forward_length(2 * d_model)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(d_model // 2)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_scores((-np.arange(len(tokens), dtype=np.float32)).tolist())
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    d, f = d_model, 2 * d_model
    shapes = {
        "token_embd.weight": (len(tokens), d),
        "output_norm.weight": (d,),
        "blk.0.attn_norm.weight": (d,),
        "blk.0.ffn_norm.weight": (d,),
        "blk.0.attn_q.weight": (d, d),
        "blk.0.attn_k.weight": (d, d),
        "blk.0.attn_v.weight": (d, d),
        "blk.0.attn_output.weight": (d, d),
        "blk.0.ffn_gate.weight": (f, d),
        "blk.0.ffn_up.weight": (f, d),
        "blk.0.ffn_down.weight": (d, f),
    }
    for name, shape in shapes.items():
        v = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            w.add_tensor(name, v + 1.0)
        else:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(v, t), raw_dtype=t)
    _finish(w)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--types", default="F32,Q8_0,Q4_1")
    ap.add_argument("--archs", default=",".join(GGUF_ARCH))
    a = ap.parse_args()
    for mt in a.archs.split(","):
        for t in a.types.split(","):
            print(convert(mt, a.out / f"tiny-{mt}-{t}.gguf", t))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
