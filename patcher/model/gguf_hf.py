"""The files an HF model folder has beside its weights, made from a GGUF's metadata: config.json,
generation_config.json, tokenizer.json and tokenizer_config.json (special tokens, chat template).
`patcher convert` writes them next to the converted weights; `patcher export` of a GGUF next to the ONNX
graph, so transformers(.js) and `patcher generate` load either folder as they load a hub model."""

import json

import numpy as np

from patcher.errors import PatcherError

# the HF class config.json names, per model_type with a [gguf] table
HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "olmo2": "Olmo2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def hf_config(g, torch_dtype: str | None = None) -> dict:
    """config.json: the hyperparameters patcher reads from the metadata, the HF class, the token ids."""
    # GGUF stores float32: write each float's shortest float32 spelling (1e-05, not 9.9999997e-06)
    cfg = {
        k: float(str(np.float32(v))) if isinstance(v, float) else v
        for k, v in g.config.items()
        if not k.startswith("_")
    }
    model_type = cfg["model_type"]
    if model_type not in HF_CLASSES:
        raise PatcherError(g.path, f"no HF class is known for model_type {model_type!r}")
    if model_type != "gpt2":
        cfg.pop("n_head", None)  # patcher's reader adds it for GPT-2-style configs
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        i = g.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int):
            cfg[f"{name}_token_id"] = i
    out = {"architectures": [HF_CLASSES[model_type]], **cfg}
    if torch_dtype:
        out["torch_dtype"] = torch_dtype
    return out


def side_files(g, torch_dtype: str | None = None) -> dict[str, str]:
    """File name -> text. The vocabulary is read first: one patcher cannot read fails before any work."""
    from patcher.model.gguf_tokenizer import load_tokenizer

    tok = load_tokenizer(g)
    config = hf_config(g, torch_dtype)
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tok.special_tokens,
        "clean_up_tokenization_spaces": False,
    }
    if config.get("max_position_embeddings"):
        tc["model_max_length"] = config["max_position_embeddings"]
    if tok.add_bos_token is not None:
        tc["add_bos_token"] = tok.add_bos_token
    if tok.chat_template is not None:
        tc["chat_template"] = tok.chat_template
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    text = lambda d: json.dumps(d, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    return {
        "config.json": text(config),
        "generation_config.json": text(gen),
        "tokenizer.json": tok.tokenizer.to_str(pretty=True),
        "tokenizer_config.json": text(tc),
    }
