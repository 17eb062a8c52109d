"""One description of each architecture's forward pass.

`block()` and `embed()` / `head()` are written once against an abstract `ops` object. The numpy
backend (patcher/numpy_ops.py) executes them; an ONNX backend emits the same calls as graph
nodes. Architectures differ only through data: a FORWARD entry per model_type (tensor names,
norm kind, residual layout, fused projections, MoE) and hyperparameters read from config.json.
"""

import math
from dataclasses import dataclass, field

from patcher.errors import PatcherError

LLAMA_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "embed": "model.embed_tokens",
    "final_norm": "model.norm",
    "lm_head": "lm_head",
}
SANDWICH_NAMES = {
    **LLAMA_NAMES,
    "mlp_norm": "pre_feedforward_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}
QWEN_MOE_NAMES = {
    **LLAMA_NAMES,
    "mlp_out_bias": "mlp.output_bias",
    "router": "mlp.gate",
    "experts": "mlp.experts.{e}",
    "expert_gate": "gate_proj",
    "expert_up": "up_proj",
    "expert_down": "down_proj",
    "shared": "mlp.shared_expert",
    "shared_gate": "mlp.shared_expert_gate",
}


@dataclass(frozen=True)
class ForwardSpec:
    """How one architecture computes a block (data, not code)."""

    names: dict
    norm: str = "rms"  # rms | layer
    norm_offset: float = 0.0  # RMSNorm gain is offset + w (Gemma: 1)
    layout: str = "pre"  # pre: x + f(norm(x)); sandwich: x + post(f(norm(x))); post: x + post(f(x)); parallel
    qkv: str = "separate"  # separate | fused (q|k|v concatenated) | per_head (NeoX [heads, 3, hd]) | conv1d
    qk_norm: str | None = None  # None | head (over head_dim) | full (over the whole projection)
    mlp: str = "gated"  # gated | gated_fused | plain | moe
    conv1d: bool = False  # GPT-2 stores [in, out]
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(d_model)
    positions: str | None = None  # learned position embedding tensor (GPT-2)
    act_keys: tuple = ("hidden_act",)
    act_default: str = "silu"
    rope: bool = True
    attention: str = "standard"  # standard | mla (DeepSeek multi-head latent attention)
    moe: dict = field(default_factory=dict)  # router semantics for MoE models


FORWARD = {
    "llama": ForwardSpec(LLAMA_NAMES),
    "mistral": ForwardSpec(LLAMA_NAMES),
    "qwen2": ForwardSpec(LLAMA_NAMES),
    "qwen3": ForwardSpec(LLAMA_NAMES, qk_norm="head"),
    "gemma": ForwardSpec(
        LLAMA_NAMES,
        norm_offset=1.0,
        embed_scale=True,
        act_keys=("hidden_activation", "hidden_act"),
        act_default="gelu_pytorch_tanh",
    ),
    "gemma2": ForwardSpec(
        SANDWICH_NAMES,
        norm_offset=1.0,
        embed_scale=True,
        layout="sandwich",
        act_keys=("hidden_activation", "hidden_act"),
        act_default="gelu_pytorch_tanh",
    ),
    "gemma3_text": ForwardSpec(
        SANDWICH_NAMES,
        norm_offset=1.0,
        embed_scale=True,
        layout="sandwich",
        qk_norm="head",
        act_keys=("hidden_activation", "hidden_act"),
        act_default="gelu_pytorch_tanh",
    ),
    "olmo2": ForwardSpec(
        {
            **LLAMA_NAMES,
            "attn_post_norm": "post_attention_layernorm",
            "mlp_post_norm": "post_feedforward_layernorm",
        },
        layout="post",
        qk_norm="full",
    ),
    "phi3": ForwardSpec(
        {**LLAMA_NAMES, "qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"},
        qkv="fused",
        mlp="gated_fused",
    ),
    "mixtral": ForwardSpec(
        {
            **LLAMA_NAMES,
            "mlp_out_bias": "block_sparse_moe.output_bias",
            "router": "block_sparse_moe.gate",
            "experts": "block_sparse_moe.experts.{e}",
            "expert_gate": "w1",
            "expert_up": "w3",
            "expert_down": "w2",
        },
        mlp="moe",
        moe={"normalize": True},
    ),
    "qwen2_moe": ForwardSpec(
        QWEN_MOE_NAMES,
        mlp="moe",
        moe={"normalize_key": "norm_topk_prob", "normalize": False, "sparse_rule": True},
    ),
    "qwen3_moe": ForwardSpec(
        QWEN_MOE_NAMES,
        qk_norm="head",
        mlp="moe",
        moe={"normalize_key": "norm_topk_prob", "normalize": True, "sparse_rule": True},
    ),
    "deepseek_v3": ForwardSpec(
        {
            **QWEN_MOE_NAMES,
            "shared": "mlp.shared_experts",
            "router_bias": "mlp.gate.e_score_correction_bias",
            "q_a": "self_attn.q_a_proj",
            "q_a_norm": "self_attn.q_a_layernorm",
            "q_b": "self_attn.q_b_proj",
            "kv_a": "self_attn.kv_a_proj_with_mqa",
            "kv_a_norm": "self_attn.kv_a_layernorm",
            "kv_b": "self_attn.kv_b_proj",
        },
        attention="mla",
        mlp="moe",
        moe={"normalize_key": "norm_topk_prob", "normalize": True, "router": "grouped"},
    ),
    "gpt2": ForwardSpec(
        {
            "qkv": "attn.c_attn",
            "o": "attn.c_proj",
            "attn_norm": "ln_1",
            "mlp_norm": "ln_2",
            "up": "mlp.c_fc",
            "down": "mlp.c_proj",
            "embed": "wte",
            "final_norm": "ln_f",
            "lm_head": "lm_head",
        },
        norm="layer",
        qkv="fused",
        mlp="plain",
        conv1d=True,
        positions="wpe",
        rope=False,
        act_keys=("activation_function",),
        act_default="gelu_new",
    ),
    "gpt_neox": ForwardSpec(
        {
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "attn_norm": "input_layernorm",
            "mlp_norm": "post_attention_layernorm",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
            "embed": "gpt_neox.embed_in",
            "final_norm": "gpt_neox.final_layer_norm",
            "lm_head": "embed_out",
        },
        norm="layer",
        qkv="per_head",
        mlp="plain",
        layout="parallel",
        act_default="gelu",
    ),
}


@dataclass
class Rope:
    theta: float
    dim: int  # rotated dims per head (partial rotary rotates the first `dim`)
    kind: str = "default"
    params: dict = field(default_factory=dict)
    interleaved: bool = False  # DeepSeek rotates (even, odd) pairs


@dataclass
class Hyper:
    """Hyperparameters read from config.json (v4 and v5 spellings)."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    act: str
    scale: float
    layer_types: list
    ropes: dict  # layer type -> Rope
    attn_softcap: float | None = None
    final_softcap: float | None = None
    window: int | None = None
    tied: bool = False
    moe: dict = field(default_factory=dict)
    parallel: bool = False
    mla: dict = field(default_factory=dict)  # DeepSeek latent-attention dims


def _rope_from(
    cfg: dict, block: dict | None, head_dim: int, theta_default: float, partial_default=1.0
) -> Rope:
    block = dict(block or {})
    scaling = cfg.get("rope_scaling") or {}
    kind = (
        block.get("rope_type")
        or block.get("type")
        or scaling.get("rope_type")
        or scaling.get("type")
        or "default"
    )
    theta = block.get("rope_theta", cfg.get("rope_theta", theta_default))
    partial = block.get(
        "partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", partial_default))
    )
    params = {"original_max_position_embeddings": cfg.get("max_position_embeddings"), **scaling, **block}
    if kind not in ROPE_KINDS:
        raise PatcherError(
            "config.json", f"rope type {kind!r} is not supported yet (supported: {', '.join(ROPE_KINDS)})"
        )
    numbers = [(f"rope_scaling.{k}", params[k]) for k in ROPE_NUMBERS if params.get(k) is not None]
    for key, value in [("rope_theta", theta), ("partial_rotary_factor", partial), *numbers]:
        positive = key in ("rope_theta", "rope_scaling.factor")  # 0 makes every rotation NaN
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (positive and value <= 0)
        ):
            raise ValueError(f"{key} must be a finite {'positive ' if positive else ''}number, got {value!r}")
    return Rope(float(theta), int(head_dim * partial), kind, params)


ROPE_NUMBERS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
)


ROPE_KINDS = ("default", "linear", "llama3", "yarn")


def hyper(model_type: str, cfg: dict) -> Hyper:
    spec = spec_for(model_type)
    g = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)  # noqa: E731
    d = int(g("hidden_size", "n_embd"))
    n_layers = int(g("num_hidden_layers", "n_layer"))
    heads = int(g("num_attention_heads", "n_head"))
    kv = int(g("num_key_value_heads", default=heads))
    head_dim = int(g("head_dim", default=d // heads))
    rope_dim = int(g("qk_rope_head_dim", default=head_dim))  # MLA rotates only its rope part
    eps = float(g("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5))
    act = next((cfg[k] for k in spec.act_keys if cfg.get(k)), spec.act_default)
    scale = (
        float(cfg["query_pre_attn_scalar"]) ** -0.5 if cfg.get("query_pre_attn_scalar") else head_dim**-0.5
    )
    if spec.attention == "mla":
        scale = _mla_scale(cfg)
    layer_types = list(cfg.get("layer_types") or _default_layer_types(model_type, cfg, n_layers))
    rp = cfg.get("rope_parameters")
    ropes = {}
    if spec.rope:
        partial_default = 0.25 if model_type == "gpt_neox" else 1.0
        theta_default = {"gemma3_text": 1_000_000.0}.get(model_type, 10000.0)
        for lt in set(layer_types):
            block = (
                rp.get(lt)
                if isinstance(rp, dict) and lt in rp
                else rp
                if isinstance(rp, dict) and "rope_theta" in rp
                else None
            )
            if model_type == "gemma3_text" and block is None and lt == "sliding_attention":
                block = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
            if model_type == "gpt_neox" and block is None and "rotary_emb_base" in cfg:
                block = {"rope_theta": cfg["rotary_emb_base"]}
            ropes[lt] = _rope_from(cfg, block, rope_dim, theta_default, partial_default)
            ropes[lt].interleaved = spec.attention == "mla" and bool(cfg.get("rope_interleave", True))
    moe = {}
    if spec.mlp == "moe":
        moe = {
            "experts": int(g("num_local_experts", "num_experts", "n_routed_experts")),
            "top_k": int(cfg["num_experts_per_tok"]),
            "normalize": bool(cfg.get(spec.moe.get("normalize_key", ""), spec.moe["normalize"])),
            "sparse_layers": _sparse_layers(spec, cfg, n_layers),
        }
        if spec.moe.get("router") == "grouped":
            moe["grouped"] = {
                "bias": spec.names["router_bias"],
                "n_group": int(cfg.get("n_group", 1) or 1),
                "topk_group": int(cfg.get("topk_group", 1) or 1),
                "scaling": float(cfg.get("routed_scaling_factor", 1.0)),
            }
    window = cfg.get("sliding_window") if (model_type != "qwen2" or cfg.get("use_sliding_window")) else None
    return Hyper(
        d,
        n_layers,
        heads,
        kv,
        head_dim,
        eps,
        act,
        scale,
        layer_types,
        ropes,
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
        window=window,
        tied=bool(cfg.get("tie_word_embeddings", model_type in ("gemma", "gemma2", "gemma3_text", "gpt2"))),
        moe=moe,
        parallel=bool(cfg.get("use_parallel_residual", True)),
        mla={k: int(cfg[k]) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")}
        if spec.attention == "mla"
        else {},
    )


def _default_layer_types(model_type: str, cfg: dict, n: int) -> list:
    """HF's defaults when config.json has no layer_types."""
    if model_type == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if model_type == "gemma3_text":
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if model_type == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        return [
            "sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
            for i in range(n)
        ]
    if model_type == "mistral" and cfg.get("sliding_window"):
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def _mla_scale(cfg: dict) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (DeepSeek)."""
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (rp.get("rope_type") or rp.get("type") or "default") != "default" and rp.get("mscale_all_dim"):
        m = 0.1 * rp["mscale_all_dim"] * math.log(rp["factor"]) + 1.0 if rp["factor"] > 1 else 1.0
        scale *= m * m
    return scale


def _sparse_layers(spec: ForwardSpec, cfg: dict, n: int) -> set:
    if "first_k_dense_replace" in cfg:  # DeepSeek: dense MLPs first, then MoE every moe_layer_freq
        k, freq = int(cfg["first_k_dense_replace"]), int(cfg.get("moe_layer_freq", 1) or 1)
        return {i for i in range(n) if i >= k and i % freq == 0}
    if not spec.moe.get("sparse_rule"):
        return set(range(n))
    only = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    return {i for i in range(n) if i not in only and (i + 1) % step == 0}


def spec_for(model_type: str) -> ForwardSpec:
    try:
        return FORWARD[model_type]
    except KeyError:
        raise PatcherError(
            "config.json",
            f"the forward pass for model_type {model_type!r} is not "
            f"implemented "
            f"(supported: {', '.join(sorted(FORWARD))})",
        ) from None


# --- the description itself, run by any `ops` backend --------------------------------------------


def embed(ops, spec: ForwardSpec, hp: Hyper, input_ids, position_ids):
    x = ops.embedding(spec.names["embed"] + ".weight", input_ids)
    if spec.embed_scale:
        x = ops.scale(x, math.sqrt(hp.d_model), round_to_dtype=True)
    if spec.positions:
        x = ops.add(x, ops.embedding(spec.positions + ".weight", position_ids))
    return x


def _norm(ops, spec, hp, x, name):
    if spec.norm == "layer":
        return ops.layer_norm(x, name + ".weight", name + ".bias", hp.eps)
    y = ops.rms_norm(x, name + ".weight", hp.eps, spec.norm_offset)
    # RMSNorm has no bias; one is present only where `patcher inject` put it after a post-norm
    return ops.add(y, ops.w(name + ".bias")) if ops.has(name + ".bias") else y


def _linear(ops, spec, x, name):
    return ops.linear(x, name + ".weight", name + ".bias" if ops.has(name + ".bias") else None, spec.conv1d)


def _attention(ops, spec: ForwardSpec, hp: Hyper, x, layer: int):
    if spec.attention == "mla":
        return _attention_mla(ops, spec, hp, x, layer, hp.mla)
    n = spec.names
    H, K, hd = hp.n_heads, hp.n_kv, hp.head_dim
    if spec.qkv == "separate":
        q, k, v = (_linear(ops, spec, x, n[p]) for p in ("q", "k", "v"))
    elif spec.qkv == "fused":
        q, k, v = ops.split(_linear(ops, spec, x, n["qkv"]), [H * hd, K * hd, K * hd])
    else:  # per_head: NeoX packs [heads, (q, k, v), head_dim]
        q, k, v = ops.split_per_head(_linear(ops, spec, x, n["qkv"]), H, 3, hd)
    if spec.qk_norm == "full":
        q = ops.rms_norm(q, n["q_norm"] + ".weight", hp.eps, spec.norm_offset)
        k = ops.rms_norm(k, n["k_norm"] + ".weight", hp.eps, spec.norm_offset)
    q, k, v = ops.heads(q, H, hd), ops.heads(k, K, hd), ops.heads(v, K, hd)
    if spec.qk_norm == "head":
        q = ops.rms_norm(q, n["q_norm"] + ".weight", hp.eps, spec.norm_offset)
        k = ops.rms_norm(k, n["k_norm"] + ".weight", hp.eps, spec.norm_offset)
    layer_type = hp.layer_types[layer]
    if spec.rope:
        rope = hp.ropes[layer_type]
        q, k = ops.rope(q, rope), ops.rope(k, rope)
    window = hp.window if layer_type == "sliding_attention" else None
    out = ops.attend(q, k, v, layer, hp.scale, hp.attn_softcap, window)
    return _linear(ops, spec, ops.merge_heads(out), n["o"])


def _attention_mla(ops, spec: ForwardSpec, hp: Hyper, x, layer: int, cfg: dict):
    """DeepSeek multi-head latent attention: low-rank q, one compressed kv latent plus a shared
    rotary key, expanded per head by kv_b."""
    n = spec.names
    H, nope, rope_d, v_d = hp.n_heads, cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    if ops.has(n["q_a"] + ".weight"):
        q = _linear(
            ops,
            spec,
            ops.rms_norm(_linear(ops, spec, x, n["q_a"]), n["q_a_norm"] + ".weight", hp.eps),
            n["q_b"],
        )
    else:
        q = _linear(ops, spec, x, n["q"])
    q_pass, q_rot = ops.split(ops.heads(q, H, nope + rope_d), [nope, rope_d])
    kv_nope, k_rot = ops.split(_linear(ops, spec, x, n["kv_a"]), [cfg["kv_lora_rank"], rope_d])
    kv = ops.heads(
        _linear(ops, spec, ops.rms_norm(kv_nope, n["kv_a_norm"] + ".weight", hp.eps), n["kv_b"]),
        H,
        nope + v_d,
    )
    k_nope, v = ops.split(kv, [nope, v_d])
    rope = hp.ropes[hp.layer_types[layer]]
    q = ops.concat([q_pass, ops.rope(q_rot, rope)])
    k = ops.concat([k_nope, ops.expand_heads(ops.rope(ops.heads(k_rot, 1, rope_d), rope), H)])
    out = ops.attend(q, k, v, layer, hp.scale, None, None)
    return _linear(ops, spec, ops.merge_heads(out), n["o"])


def _mlp_dense(ops, spec: ForwardSpec, hp: Hyper, x, names: dict):
    if spec.mlp == "plain":
        return _linear(ops, spec, ops.act(_linear(ops, spec, x, names["up"]), hp.act), names["down"])
    if spec.mlp == "gated_fused":
        gate, up = ops.split(_linear(ops, spec, x, names["gate_up"]), 2)
    else:
        gate, up = _linear(ops, spec, x, names["gate"]), _linear(ops, spec, x, names["up"])
    return _linear(ops, spec, ops.mul(ops.act(gate, hp.act), up), names["down"])


def _mlp(ops, spec: ForwardSpec, hp: Hyper, x, layer: int):
    out = _mlp_core(ops, spec, hp, x, layer)
    bias = spec.names.get("mlp_out_bias")  # MoE blocks have no bias slot: `patcher inject` names one
    return ops.add(out, ops.w(bias)) if bias and ops.has(bias) else out


def _mlp_core(ops, spec: ForwardSpec, hp: Hyper, x, layer: int):
    n = spec.names
    if spec.mlp != "moe" or layer not in hp.moe["sparse_layers"]:
        return _mlp_dense(ops, spec if spec.mlp != "moe" else _GATED, hp, x, n)
    experts = [
        {
            "gate": n["experts"].format(e=e) + "." + n["expert_gate"],
            "up": n["experts"].format(e=e) + "." + n["expert_up"],
            "down": n["experts"].format(e=e) + "." + n["expert_down"],
        }
        for e in range(hp.moe["experts"])
    ]
    out = ops.moe(
        x,
        n["router"] + ".weight",
        hp.moe["top_k"],
        hp.moe["normalize"],
        [lambda h, names=names: _mlp_dense(ops, _GATED, hp, h, names) for names in experts],
        hp.moe.get("grouped"),
    )
    if "shared" in n and ops.has(n["shared"] + ".down_proj.weight"):
        shared = _mlp_dense(
            ops,
            _GATED,
            hp,
            x,
            {
                "gate": n["shared"] + ".gate_proj",
                "up": n["shared"] + ".up_proj",
                "down": n["shared"] + ".down_proj",
            },
        )
        if ops.has(n["shared_gate"] + ".weight"):
            shared = ops.mul(ops.sigmoid(_linear(ops, _GATED, x, n["shared_gate"])), shared)
        out = ops.add(out, shared)
    return out


_GATED = ForwardSpec(LLAMA_NAMES)


def block(ops, spec: ForwardSpec, hp: Hyper, x, layer: int):
    """One decoder block: resid_pre[layer] -> resid_pre[layer + 1]."""
    n = spec.names
    if spec.layout == "parallel" and hp.parallel:
        a = _attention(ops, spec, hp, _norm(ops, spec, hp, x, n["attn_norm"]), layer)
        m = _mlp(ops, spec, hp, _norm(ops, spec, hp, x, n["mlp_norm"]), layer)
        return ops.add(ops.add(x, a), m)
    pre = spec.layout != "post"
    a = _attention(ops, spec, hp, _norm(ops, spec, hp, x, n["attn_norm"]) if pre else x, layer)
    if spec.layout in ("sandwich", "post"):
        a = _norm(ops, spec, hp, a, n["attn_post_norm"])
    x = ops.add(x, a)
    m = _mlp(ops, spec, hp, _norm(ops, spec, hp, x, n["mlp_norm"]) if pre else x, layer)
    if spec.layout in ("sandwich", "post"):
        m = _norm(ops, spec, hp, m, n["mlp_post_norm"])
    return ops.add(x, m)


def head(ops, spec: ForwardSpec, hp: Hyper, x):
    """Final norm and unembedding: resid_pre[L] -> logits."""
    n = spec.names
    h = _norm(ops, spec, hp, x, n["final_norm"])
    weight = (
        n["embed"] + ".weight"
        if hp.tied or not ops.has(n["lm_head"] + ".weight")
        else n["lm_head"] + ".weight"
    )
    logits = ops.linear(h, weight, None, False)
    if hp.final_softcap:
        logits = ops.softcap(logits, hp.final_softcap)
    return logits
