"""One description of each architecture's forward pass.

`block()` and `embed()` / `head()` are written once against an abstract `ops` object. The numpy
backend (patcher/model/numpy_ops.py) executes them; an ONNX backend emits the same calls as graph
nodes. Architectures differ only through data: the [forward] section of their table in
patcher/model/tables/ (tensor names, norm kind, residual layout, fused projections, MoE, the defaults
config.json may leave out), parsed here into a ForwardSpec, and hyperparameters read from config.json.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from patcher.errors import PatcherError


@dataclass(frozen=True)
class Sliding:
    """Which layers use the sliding window when config.json has no `layer_types` (HF's defaults)."""

    layers: str = "none"  # none | all | pattern (every pattern-th layer is full) | from (layers >= from_key)
    requires: tuple[str, ...] = ()  # config keys that must all be true for any layer to slide
    pattern: int = 0
    pattern_keys: tuple[str, ...] = ()  # config keys read (first present) before `pattern`
    from_key: str = ""
    window_requires: tuple[str, ...] = ()  # config keys that must be true for sliding_window to apply

    def layer_types(self, cfg: dict, n: int) -> list[str]:
        if self.layers == "none" or not all(cfg.get(k) for k in self.requires):
            return ["full_attention"] * n
        if self.layers == "pattern":
            p = _first(cfg, self.pattern_keys, self.pattern)
            slides = [bool((i + 1) % p) for i in range(n)]
        elif self.layers == "from":
            slides = [i >= cfg.get(self.from_key, 0) for i in range(n)]
        else:
            slides = [True] * n
        return ["sliding_attention" if s else "full_attention" for s in slides]


@dataclass(frozen=True)
class LayerRope:
    """Rope settings one layer type takes when config.json gives none for it (Gemma 3's local layers)."""

    theta: float
    theta_keys: tuple[str, ...] = ()  # config keys read (first present) before `theta`
    rope_type: str | None = None


@dataclass(frozen=True)
class ForwardSpec:
    """How one architecture computes a block (data, not code): a table's [forward] section."""

    names: dict
    norm: str = "rms"  # rms | layer
    norm_offset: float = 0.0  # RMSNorm gain is offset + w (Gemma: 1)
    layout: str = "pre"  # pre: x + f(norm(x)); sandwich: x + post(f(norm(x))); post: x + post(f(x)); parallel
    qkv: str = "separate"  # separate | fused (q|k|v concatenated) | per_head (NeoX [heads, 3, hd])
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
    tied: bool = False  # tie_word_embeddings when config.json does not say (the table's top-level key)
    rope_theta: float = 10000.0  # when config.json has none
    rope_partial: float = 1.0  # rotated fraction of head_dim when config.json does not say
    rope_theta_keys: tuple[str, ...] = ()  # config keys read (first present) before rope_theta
    rope_layer_types: dict = field(default_factory=dict)  # layer type -> LayerRope
    sliding: Sliding = Sliding()


# --- a table's [forward] section -> ForwardSpec (a table is user input: every value is checked) -----

_KINDS = {
    "norm": ("rms", "layer"),
    "layout": ("pre", "sandwich", "post", "parallel"),
    "qkv": ("separate", "fused", "per_head"),
    "qk_norm": ("none", "head", "full"),
    "mlp": ("gated", "gated_fused", "plain", "moe"),
    "attention": ("standard", "mla"),
}
_VALUES = {
    "norm_offset": float,
    "conv1d": bool,
    "embed_scale": bool,
    "positions": str,
    "act_keys": list,
    "act_default": str,
    "rope": bool,
    "rope_theta": float,
    "rope_partial": float,
    "rope_theta_keys": list,
    "names": dict,
    "moe": dict,
    "sliding": dict,
    "rope_layer_types": dict,
}
_SLIDING = {
    "layers": ("none", "all", "pattern", "from"),
    "requires": list,
    "pattern": int,
    "pattern_keys": list,
    "from_key": str,
    "window_requires": list,
}
_MOE = {"normalize": bool, "normalize_key": str, "sparse_rule": bool, "router": ("topk", "grouped")}
_LAYER_ROPE = {"theta": float, "theta_keys": list, "rope_type": str}
# the tensor names (relative to a layer; embed, final_norm, lm_head to the checkpoint) each kind reads
_NEEDS = {
    ("qkv", "separate"): ("q", "k", "v"),
    ("qkv", "fused"): ("qkv",),
    ("qkv", "per_head"): ("qkv",),
    ("qk_norm", "head"): ("q_norm", "k_norm"),
    ("qk_norm", "full"): ("q_norm", "k_norm"),
    ("layout", "pre"): ("attn_norm", "mlp_norm"),
    ("layout", "parallel"): ("attn_norm", "mlp_norm"),
    ("layout", "sandwich"): ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm"),
    ("layout", "post"): ("attn_post_norm", "mlp_post_norm"),
    ("mlp", "gated"): ("gate", "up", "down"),
    ("mlp", "gated_fused"): ("gate_up", "down"),
    ("mlp", "plain"): ("up", "down"),
    ("mlp", "moe"): ("router", "experts", "expert_gate", "expert_up", "expert_down"),
    ("attention", "mla"): ("q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b"),
}
_ALWAYS: tuple[str, ...] = ("embed", "final_norm", "lm_head", "o")
_OPTIONAL = ("gate", "up", "down", "mlp_out_bias", "shared", "shared_gate", "router_bias")  # MoE extras
NAME_KEYS = tuple(dict.fromkeys((*_ALWAYS, *(n for need in _NEEDS.values() for n in need), *_OPTIONAL)))


def _check(path, where: str, section: dict, schema: dict) -> None:
    """Unknown keys, wrong types and values outside a kind's choices, each one line naming `where`."""
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise PatcherError(path, f"unknown keys {unknown} in {where}; allowed: {sorted(schema)}")
    for key, want in schema.items():
        if key not in section:
            continue
        value, at = section[key], f"{where} {key}"
        if isinstance(want, tuple):
            if value not in want:
                raise PatcherError(path, f"{at} must be one of {', '.join(want)}, got {value!r}")
            continue
        ok = (int, float) if want is float else want
        if isinstance(value, bool) != (want is bool) or not isinstance(value, ok):
            raise PatcherError(path, f"{at} must be a {want.__name__}, got {value!r}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise PatcherError(path, f"{at} must be a list of config key names, got {value!r}")


def parse_forward(path, section: dict, tied: bool) -> ForwardSpec:
    """A table's (merged) [forward] section as a ForwardSpec; `tied` is the table's tie_word_embeddings."""
    _check(path, "[forward]", section, {**_KINDS, **_VALUES})
    kinds = {k: section.get(k, ForwardSpec.__dataclass_fields__[k].default) for k in _KINDS}
    _check(path, "[forward.moe]", section.get("moe", {}), _MOE)
    _check_names(path, section.get("names", {}), kinds, section.get("moe", {}))
    plain = {k: v for k, v in section.items() if k not in ("names", "qk_norm", "sliding", "rope_layer_types")}
    lists = {k: tuple(v) for k, v in plain.items() if isinstance(v, list)}
    floats = {k: float(v) for k, v in plain.items() if _VALUES.get(k) is float}
    return ForwardSpec(
        **{**plain, **lists, **floats},
        names=dict(section.get("names", {})),
        qk_norm=None if kinds["qk_norm"] == "none" else kinds["qk_norm"],
        tied=tied,
        rope_layer_types=_layer_ropes(path, section.get("rope_layer_types", {})),
        sliding=_sliding(path, section.get("sliding", {})),
    )


def _check_names(path, names: dict, kinds: dict, moe: dict) -> None:
    """Every tensor name the chosen kinds read is given (a typo'd key is unknown, not silently unused)."""
    _check(path, "[forward.names]", names, dict.fromkeys(NAME_KEYS, str))
    needs: list[tuple[str, tuple[str, ...]]] = [("every forward pass", _ALWAYS)]
    needs += [(f"{k} = {v!r}", need) for (k, v), need in _NEEDS.items() if kinds[k] == v]
    if moe.get("router") == "grouped":
        needs.append(("[forward.moe] router = 'grouped'", ("router_bias",)))
    for why, need in needs:
        missing = [n for n in need if n not in names]
        if missing:
            raise PatcherError(path, f"[forward.names] lacks {missing}, which {why} reads")
    if kinds["mlp"] == "moe" and "{e}" not in names["experts"]:
        raise PatcherError(path, "[forward.names] experts must hold {e} (the expert index)")


def _sliding(path, section: dict) -> Sliding:
    _check(path, "[forward.sliding]", section, _SLIDING)
    if section.get("layers") == "pattern" and section.get("pattern", 0) < 1:
        raise PatcherError(path, "[forward.sliding] layers = 'pattern' needs pattern >= 1")
    if section.get("layers") == "from" and not section.get("from_key"):
        raise PatcherError(path, "[forward.sliding] layers = 'from' needs from_key (a config key)")
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
    return Sliding(**values)


def _layer_ropes(path, section: dict) -> dict:
    out = {}
    for layer_type, rope in section.items():
        where = f"[forward.rope_layer_types.{layer_type}]"
        if not isinstance(rope, dict) or "theta" not in rope:
            raise PatcherError(path, f"{where} must be a table with theta (and theta_keys, rope_type)")
        _check(path, where, rope, _LAYER_ROPE)
        out[layer_type] = LayerRope(
            float(rope["theta"]), tuple(rope.get("theta_keys", ())), rope.get("rope_type")
        )
    return out


def _first(cfg: dict, keys, default):
    """The value of the first of `keys` config.json has, else `default`."""
    return next((cfg[k] for k in keys if k in cfg), default)


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


def hyper(spec: ForwardSpec, cfg: dict) -> Hyper:
    """The forward pass's hyperparameters: config.json's values, the table's declared defaults."""
    g = lambda *keys, default=None: _set(cfg, keys, default)  # noqa: E731
    d = int(g("hidden_size", "n_embd"))
    n_layers = int(g("num_hidden_layers", "n_layer"))
    heads = int(g("num_attention_heads", "n_head"))
    head_dim = int(g("head_dim", default=d // heads))
    scale = (
        float(cfg["query_pre_attn_scalar"]) ** -0.5 if cfg.get("query_pre_attn_scalar") else head_dim**-0.5
    )
    layer_types = list(cfg.get("layer_types") or spec.sliding.layer_types(cfg, n_layers))
    rope_dim = int(g("qk_rope_head_dim", default=head_dim))  # MLA rotates only its rope part
    mla = spec.attention == "mla"
    return Hyper(
        d,
        n_layers,
        heads,
        int(g("num_key_value_heads", default=heads)),
        head_dim,
        float(g("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
        next((cfg[k] for k in spec.act_keys if cfg.get(k)), spec.act_default),
        _mla_scale(cfg) if mla else scale,
        layer_types,
        _ropes(spec, cfg, layer_types, rope_dim) if spec.rope else {},
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
        window=cfg.get("sliding_window") if all(cfg.get(k) for k in spec.sliding.window_requires) else None,
        tied=bool(cfg.get("tie_word_embeddings", spec.tied)),
        moe=_moe(spec, cfg, n_layers) if spec.mlp == "moe" else {},
        parallel=bool(cfg.get("use_parallel_residual", True)),
        mla={k: int(cfg[k]) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")}
        if mla
        else {},
    )


def _set(cfg: dict, keys, default=None):
    """The first of `keys` config.json sets (not null), else `default`."""
    return next((cfg[k] for k in keys if cfg.get(k) is not None), default)


def _ropes(spec: ForwardSpec, cfg: dict, layer_types: list, dim: int) -> dict:
    rp = cfg.get("rope_parameters")
    ropes = {}
    for lt in set(layer_types):
        block = (
            (rp.get(lt) if lt in rp else rp if "rope_theta" in rp else None) if isinstance(rp, dict) else None
        )
        if block is None:
            block = _declared_rope(spec, cfg, lt)
        ropes[lt] = _rope_from(cfg, block, dim, spec.rope_theta, spec.rope_partial)
        ropes[lt].interleaved = spec.attention == "mla" and bool(cfg.get("rope_interleave", True))
    return ropes


def _declared_rope(spec: ForwardSpec, cfg: dict, layer_type: str) -> dict | None:
    """Rope settings the table declares where config.json's rope_parameters says nothing."""
    own = spec.rope_layer_types.get(layer_type)
    if own is not None:
        return {
            **({"rope_type": own.rope_type} if own.rope_type else {}),
            "rope_theta": _first(cfg, own.theta_keys, own.theta),
        }
    key = next((k for k in spec.rope_theta_keys if k in cfg), None)
    return {"rope_theta": cfg[key]} if key else None


def _moe(spec: ForwardSpec, cfg: dict, n_layers: int) -> dict:
    moe = {
        "experts": int(_set(cfg, ("num_local_experts", "num_experts", "n_routed_experts"))),
        "top_k": int(cfg["num_experts_per_tok"]),
        "normalize": bool(cfg.get(spec.moe.get("normalize_key", ""), spec.moe.get("normalize", False))),
        "sparse_layers": _sparse_layers(spec, cfg, n_layers),
    }
    if spec.moe.get("router") == "grouped":
        moe["grouped"] = {
            "bias": spec.names["router_bias"],
            "n_group": int(cfg.get("n_group", 1) or 1),
            "topk_group": int(cfg.get("topk_group", 1) or 1),
            "scaling": float(cfg.get("routed_scaling_factor", 1.0)),
        }
    return moe


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


# --- the description itself, run by any `ops` backend --------------------------------------------


def embed(ops, spec: ForwardSpec, hp: Hyper, input_ids, position_ids):
    x = ops.embedding(spec.names["embed"] + ".weight", input_ids)
    if spec.embed_scale:
        x = ops.scale(x, math.sqrt(hp.d_model))
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


_GATED = ForwardSpec({})  # experts and dense MoE layers: gated, names given per call


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
