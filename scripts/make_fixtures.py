"""Build tiny random checkpoints in real HF layout and naming, one per supported architecture.

    python scripts/make_fixtures.py [--out fixtures]

Each fixture is a folder with config.json, two bf16 safetensors shards plus the index, a tiny
byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json with a chat template) and
generation_config.json. Tensor names and shapes are written out here independently of patcher's
architecture tables; the tests load every fixture in HF transformers (strict: no missing or
unexpected keys), which checks both this layout and the tables against the real thing.
Deterministic: the same command always writes the same bytes.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from patcher.io.writer import OutTensor, write_safetensors

D, HEADS, KV, HD, INTER, VOCAB, LAYERS = 64, 4, 2, 16, 96, 384, 3
EXPERTS, MOE_INTER, SHARED_INTER = 4, 32, 48

# Per-layer tensors: name -> shape, in symbols resolved by DIMS.
DIMS = {
    "d": D,
    "q": HEADS * HD,
    "kv": KV * HD,
    "i": INTER,
    "hd": HD,
    "e": EXPERTS,
    "mi": MOE_INTER,
    "si": SHARED_INTER,
    "3d": 3 * D,
    "4d": 4 * D,
    "qkv": (HEADS + 2 * KV) * HD,
    "2i": 2 * INTER,
}
ATTN = {
    "self_attn.q_proj.weight": "q d",
    "self_attn.k_proj.weight": "kv d",
    "self_attn.v_proj.weight": "kv d",
    "self_attn.o_proj.weight": "d q",
}
QKV_BIAS = {"self_attn.q_proj.bias": "q", "self_attn.k_proj.bias": "kv", "self_attn.v_proj.bias": "kv"}
QK_NORM = {"self_attn.q_norm.weight": "hd", "self_attn.k_norm.weight": "hd"}
MLP = {"mlp.gate_proj.weight": "i d", "mlp.up_proj.weight": "i d", "mlp.down_proj.weight": "d i"}
NORMS = {"input_layernorm.weight": "d", "post_attention_layernorm.weight": "d"}
SANDWICH = {**NORMS, "pre_feedforward_layernorm.weight": "d", "post_feedforward_layernorm.weight": "d"}


def experts(fmt, names, inter):
    return {
        fmt.format(e=e, n=n): shape.replace("I", inter) for e in range(EXPERTS) for n, shape in names.items()
    }


SWIGLU_EXPERT = {"gate_proj": "I d", "up_proj": "I d", "down_proj": "d I"}
QWEN_MOE = {"mlp.gate.weight": "e d", **experts("mlp.experts.{e}.{n}.weight", SWIGLU_EXPERT, "mi")}
LLAMA_LAYER = {**NORMS, **ATTN, **MLP}

# model_type -> (extra config, top-level tensors, per-layer tensors or a function of the layer)
COMMON = {
    "hidden_size": D,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV,
    "head_dim": HD,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}
LLAMA_TOP = {"model.embed_tokens.weight": "v d", "model.norm.weight": "d", "lm_head.weight": "v d"}
TIED_TOP = {"model.embed_tokens.weight": "v d", "model.norm.weight": "d"}

ARCHS = {
    "llama": ("LlamaForCausalLM", {}, LLAMA_TOP, LLAMA_LAYER),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}, LLAMA_TOP, LLAMA_LAYER),
    "qwen2": ("Qwen2ForCausalLM", {}, LLAMA_TOP, {**LLAMA_LAYER, **QKV_BIAS}),
    "qwen3": ("Qwen3ForCausalLM", {}, LLAMA_TOP, {**LLAMA_LAYER, **QK_NORM}),
    "gemma": (
        "GemmaForCausalLM",
        {"tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"},
        TIED_TOP,
        LLAMA_LAYER,
    ),
    "gemma2": (
        "Gemma2ForCausalLM",
        {
            "tie_word_embeddings": True,
            "query_pre_attn_scalar": HD,
            "sliding_window": 4,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
        },
        TIED_TOP,
        {**SANDWICH, **ATTN, **MLP},
    ),
    "gemma3_text": (
        "Gemma3ForCausalLM",
        {
            "tie_word_embeddings": True,
            "query_pre_attn_scalar": HD,
            "sliding_window": 4,
            "sliding_window_pattern": 2,
        },
        TIED_TOP,
        {**SANDWICH, **ATTN, **MLP, **QK_NORM},
    ),
    "olmo2": (
        "Olmo2ForCausalLM",
        {},
        LLAMA_TOP,
        {
            "post_attention_layernorm.weight": "d",
            "post_feedforward_layernorm.weight": "d",
            **ATTN,
            **MLP,
            "self_attn.q_norm.weight": "q",
            "self_attn.k_norm.weight": "kv",
        },
    ),
    "phi3": (
        "Phi3ForCausalLM",
        {"original_max_position_embeddings": 128},
        LLAMA_TOP,
        {
            **NORMS,
            "self_attn.qkv_proj.weight": "qkv d",
            "self_attn.o_proj.weight": "d q",
            "mlp.gate_up_proj.weight": "2i d",
            "mlp.down_proj.weight": "d i",
        },
    ),
    "mixtral": (
        "MixtralForCausalLM",
        {"num_local_experts": EXPERTS, "num_experts_per_tok": 2},
        LLAMA_TOP,
        {
            **NORMS,
            **ATTN,
            "block_sparse_moe.gate.weight": "e d",
            **experts(
                "block_sparse_moe.experts.{e}.{n}.weight", {"w1": "I d", "w2": "d I", "w3": "I d"}, "i"
            ),
        },
    ),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        {
            "num_experts": EXPERTS,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": MOE_INTER,
            "shared_expert_intermediate_size": SHARED_INTER,
            "mlp_only_layers": [1],
            "decoder_sparse_step": 1,
            "norm_topk_prob": False,
        },
        LLAMA_TOP,
        lambda l: {
            **NORMS,
            **ATTN,
            **QKV_BIAS,
            **(
                MLP
                if l == 1
                else {
                    **QWEN_MOE,
                    "mlp.shared_expert_gate.weight": "1 d",
                    **{
                        f"mlp.shared_expert.{n}.weight": s.replace("I", "si")
                        for n, s in SWIGLU_EXPERT.items()
                    },
                }
            ),
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        {
            "num_experts": EXPERTS,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": MOE_INTER,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        LLAMA_TOP,
        {**NORMS, **ATTN, **QK_NORM, **QWEN_MOE},
    ),
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        {
            "num_key_value_heads": HEADS,
            "head_dim": 8,
            "moe_intermediate_size": MOE_INTER,
            "n_routed_experts": EXPERTS,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": HD,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": True,
        },
        LLAMA_TOP,
        lambda l: {
            **NORMS,
            "self_attn.q_a_proj.weight": "32 d",
            "self_attn.q_a_layernorm.weight": "32",
            "self_attn.q_b_proj.weight": "64 32",
            "self_attn.kv_a_proj_with_mqa.weight": "24 d",
            "self_attn.kv_a_layernorm.weight": "16",
            "self_attn.kv_b_proj.weight": "96 16",
            "self_attn.o_proj.weight": "d 64",
            **(
                MLP
                if l == 0
                else {
                    **QWEN_MOE,
                    "mlp.gate.e_score_correction_bias": "e",
                    **{
                        f"mlp.shared_experts.{n}.weight": s.replace("I", "mi")
                        for n, s in SWIGLU_EXPERT.items()
                    },
                }
            ),
        },
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        {
            "n_embd": D,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_positions": 128,
            "n_inner": None,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        },
        {
            "transformer.wte.weight": "v d",
            "transformer.wpe.weight": "128 d",
            "transformer.ln_f.weight": "d",
            "transformer.ln_f.bias": "d",
        },
        {
            "ln_1.weight": "d",
            "ln_1.bias": "d",
            "attn.c_attn.weight": "d 3d",
            "attn.c_attn.bias": "3d",
            "attn.c_proj.weight": "d d",
            "attn.c_proj.bias": "d",
            "ln_2.weight": "d",
            "ln_2.bias": "d",
            "mlp.c_fc.weight": "d 4d",
            "mlp.c_fc.bias": "4d",
            "mlp.c_proj.weight": "4d d",
            "mlp.c_proj.bias": "d",
        },
    ),
    "gpt_neox": (
        "GPTNeoXForCausalLM",
        {"rotary_pct": 0.5, "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5},
        {
            "gpt_neox.embed_in.weight": "v d",
            "gpt_neox.final_layer_norm.weight": "d",
            "gpt_neox.final_layer_norm.bias": "d",
            "embed_out.weight": "v d",
        },
        {
            "input_layernorm.weight": "d",
            "input_layernorm.bias": "d",
            "post_attention_layernorm.weight": "d",
            "post_attention_layernorm.bias": "d",
            "attention.query_key_value.weight": "3d d",
            "attention.query_key_value.bias": "3d",
            "attention.dense.weight": "d d",
            "attention.dense.bias": "d",
            "mlp.dense_h_to_4h.weight": "i d",
            "mlp.dense_h_to_4h.bias": "i",
            "mlp.dense_4h_to_h.weight": "d i",
            "mlp.dense_4h_to_h.bias": "d",
        },
    ),
}
LAYER_PREFIX = {"gpt2": "transformer.h.{l}.", "gpt_neox": "gpt_neox.layers.{l}."}
# norms whose gain is 1 + w (stored near 0) rather than w (stored near 1)
ZERO_CENTERED_NORMS = {"gemma", "gemma2", "gemma3_text"}

CORPUS = """The quick brown fox jumps over the lazy dog. A small model reads short sentences.
Please write a poem about the sea. Tell me a story about a friendly robot. How do plants grow?
Describe the weather today. What is the capital of France? Explain how a bicycle works.
List three colors of the rainbow. Summarize the plot of a famous novel. Give me a recipe for bread.
The cat sat on the mat. Music, art and science make people curious. Numbers: 1 2 3 4 5 6 7 8 9 10."""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def config_for(model_type: str) -> dict:
    arch_cls, extra, _, _ = ARCHS[model_type]
    if model_type == "gpt2":
        cfg = {
            "vocab_size": VOCAB,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": "bfloat16",
            "layer_norm_epsilon": 1e-5,
        }
    elif model_type == "gpt_neox":
        cfg = {
            k: COMMON[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
                "max_position_embeddings",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
                "torch_dtype",
                "tie_word_embeddings",
            )
        }
    else:
        cfg = dict(COMMON)
    return {"architectures": [arch_cls], "model_type": model_type, **cfg, **extra}


def layout(model_type: str) -> list[tuple[str, tuple[int, ...]]]:
    _, _, top, per_layer = ARCHS[model_type]
    dims = {**DIMS, "v": VOCAB}

    def shape(spec):
        return tuple(dims[s] if s in dims else int(s) for s in spec.split())

    names = [(n, shape(s)) for n, s in top.items() if n != "lm_head.weight" and n != "embed_out.weight"]
    for l in range(LAYERS):
        tensors = per_layer(l) if callable(per_layer) else per_layer
        prefix = LAYER_PREFIX.get(model_type, "model.layers.{l}.").format(l=l)
        names += [(prefix + n, shape(s)) for n, s in tensors.items()]
    names += [(n, shape(s)) for n, s in top.items() if n in ("lm_head.weight", "embed_out.weight")]
    return names


def values(model_type: str, name: str, shape, rng) -> np.ndarray:
    if name.endswith("norm.weight") or ".ln_" in name or "layernorm" in name or name.endswith("ln_f.weight"):
        if name.endswith(".bias"):
            return rng.normal(0, 0.05, shape)
        center = 0.0 if model_type in ZERO_CENTERED_NORMS else 1.0
        return center + rng.normal(0, 0.3, shape)  # non-uniform gains make post-norm handling matter
    if name.endswith("e_score_correction_bias"):
        return np.zeros(shape)
    fan_in = shape[-1] if not name.endswith("bias") else 1
    std = 0.5 if "emb" in name or "wte" in name or "wpe" in name else 1.0 / np.sqrt(max(fan_in, 1))
    return rng.normal(0, std, shape)


def build_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 128,
            },
            indent=2,
        )
        + "\n"
    )


def make(model_type: str, out: Path, seed: int = 0, name: str | None = None) -> Path:
    folder = out / (name or f"tiny-{model_type.replace('_', '-')}")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng([seed, sum(model_type.encode())])
    names = layout(model_type)
    arrays = {
        n: values(model_type, n, s, rng).astype(np.float32).astype(ml_dtypes.bfloat16) for n, s in names
    }
    half = sum(a.nbytes for a in arrays.values()) / 2
    shards, acc = [[], []], 0
    for n in arrays:  # split in file order at the half-way byte
        shards[0 if acc < half else 1].append(n)
        acc += arrays[n].nbytes
    weight_map = {}
    for i, members in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(
            folder / fname,
            [OutTensor(n, "BF16", arrays[n].shape, produce=lambda a=arrays[n]: [a]) for n in members],
            {"format": "pt"},
        )
        weight_map.update({n: fname for n in members})
    index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config_for(model_type), indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
    )
    build_tokenizer(folder)
    return folder


# A planted direction for extraction tests and the demo: the embedding of every token of the
# marker words carries PLANT_STRENGTH * v, so prompts ending in a marker differ from prompts
# ending in a neutral word by ~v at resid_pre[0]. Prompt sets are neutral everyday requests.
MARKERS = ["sea", "robot", "poem", "bread", "dog", "fox", "art", "cat"]
NEUTRAL = ["weather", "plants", "colors", "today", "France", "people", "numbers", "model"]
TEMPLATES = [
    "Tell me something about the {}",
    "Write one line on the {}",
    "What do you know about the {}",
    "Say a kind word about the {}",
    "Give me a fact on the {}",
    "Describe the {}",
]
PLANT_STRENGTH = 20.0


def planted_prompts() -> tuple[list[str], list[str]]:
    pos = [t.format(w) for t in TEMPLATES for w in MARKERS]
    neg = [t.format(w) for t in TEMPLATES for w in NEUTRAL]
    return pos, neg


FIXTURES_DEFAULT = Path(__file__).resolve().parents[1] / "fixtures"
DEMO = Path(__file__).resolve().parents[1] / "patcher" / "data" / "demo"


def make_planted(out: Path) -> Path:
    """The demo's data (it ships in the package, patcher/data/demo): tiny-llama with a planted direction
    (model/), the direction (planted-direction.npy) and the prompt sets (positive.txt, negative.txt)."""
    from tokenizers import Tokenizer

    from patcher.io.checkpoint import Checkpoint

    target = make("llama", out, name="model")
    tok = Tokenizer.from_file(str(target / "tokenizer.json"))
    marker_ids = sorted({i for w in MARKERS for i in tok.encode(" " + w).ids})
    neutral_last = {tok.encode(" " + w).ids[-1] for w in NEUTRAL}
    assert not neutral_last & set(marker_ids), "neutral words must not end in a marker token"
    v = np.random.default_rng(99).standard_normal(D)
    v /= np.linalg.norm(v)
    name = "model.embed_tokens.weight"
    with Checkpoint(target) as ck:
        fname = ck.shard_of[name]
        arrays = {t.name: np.array(ck.array(t.name)) for t in ck.shard_tensors(fname)}
    emb = arrays[name].astype(np.float32)
    emb[marker_ids] += PLANT_STRENGTH * v
    arrays[name] = emb.astype(ml_dtypes.bfloat16)
    write_safetensors(
        target / fname,
        [OutTensor(n, "BF16", a.shape, produce=lambda a=a: [a]) for n, a in arrays.items()],
        {"format": "pt"},
    )
    np.save(out / "planted-direction.npy", v.astype(np.float32))
    pos, neg = planted_prompts()
    (out / "positive.txt").write_text("\n".join(pos) + "\n")
    (out / "negative.txt").write_text("\n".join(neg) + "\n")
    return target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=FIXTURES_DEFAULT)
    ap.add_argument("--only", nargs="*", default=None, help="model types to build (default: all)")
    args = ap.parse_args(argv)
    for mt in args.only or ARCHS:
        print(make(mt, args.out))
    if not args.only:
        print(make_planted(DEMO if args.out == FIXTURES_DEFAULT else args.out / "demo"))
    d = np.random.default_rng(1234).standard_normal(D).astype(np.float32)
    np.save(args.out / "direction-64.npy", d)


if __name__ == "__main__":
    main()
