"""Architecture tables: which tensors write into the residual stream, per model_type.

Each table is a TOML file (built-ins live in patcher/model/tables/; users may pass their own with
--arch-table). A table names tensors by pattern, `{layer}` and `{expert}` standing for indices, and
gives each tensor's residual axis; its [forward] section describes the forward pass (parsed by
patcher.model.forward). `extends` inherits another table: top-level keys override, `embed` / `writer`
lists are replaced when given, `inject` entries are merged per target, [forward] key by key at every depth.
"""

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeGuard

from patcher.errors import PatcherError
from patcher.model.forward import ForwardSpec, parse_forward

TABLE_DIR = Path(__file__).parent / "tables"
ROLES = ("embed", "attn_out", "mlp_out")
POST_NORM_GAINS = {"one_plus_weight": 1.0, "weight": 0.0}  # g = offset + w
_TOP_KEYS = {
    "model_type",
    "extends",
    "layers",
    "unembed",
    "tie_word_embeddings",
    "config",
    "prefixes",
    "post_norm_gain",
    "embed",
    "writer",
    "inject",
    "gguf",
    "forward",
}
_WRITER_KEYS = {
    "role",
    "weight",
    "bias",
    "residual_axis",
    "post_norm",
    "expert_axis",
    "gguf",
    "gguf_bias",
    "gguf_residual_axis",
    "gguf_post_norm",
}
_GGUF_KEYS = {"arch", "rope_permuted", "norm_shift", "inject", "config"}
# what each value must be (a table is user input: `--arch-table`)
_TOP_TYPES = {
    "model_type": str,
    "extends": str,
    "layers": str,
    "unembed": str,
    "tie_word_embeddings": bool,
    "config": dict,
    "prefixes": list,
    "post_norm_gain": str,
    "embed": list,
    "writer": list,
    "inject": dict,
    "gguf": dict,
    "forward": dict,
}
_WRITER_TYPES = {
    "role": str,
    "weight": str,
    "name": str,
    "bias": str,
    "post_norm": str,
    "gguf": str,
    "gguf_bias": str,
    "gguf_post_norm": str,
}
_AXES = {"residual_axis": (0, 1, 2), "expert_axis": (0, 1, 2), "gguf_residual_axis": (0, 1, 2)}


def _check_types(path, where: str, entry: dict, types: dict, axes=None) -> None:
    for key, value in entry.items():
        want = types.get(key)
        if want is not None and not isinstance(value, want):
            raise PatcherError(path, f"{where}{key} must be a {want.__name__}, got {value!r}")
        if axes and key in axes and (isinstance(value, bool) or value not in axes[key]):
            raise PatcherError(
                path, f"{where}{key} must be one of {axes[key]} (an axis of the weight), got {value!r}"
            )


GGUF_LAYERS = "blk.{layer}."
GGUF_UNEMBED = "output.weight"
_INJECT_KEYS = {"bias", "hf_loads", "config_flag", "siblings"}


@dataclass(frozen=True)
class Writer:
    role: str
    weight: str  # pattern relative to the layer prefix (or absolute for embeddings)
    residual_axis: int
    bias: str | None = None
    post_norm: str | None = None
    expert_axis: int = 0  # for fused 3-D expert tensors [experts, ...]
    gguf: tuple | None = None  # (weight, bias, post_norm, residual axis in GGUF order: ne0 first)


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp's converter stores this architecture: the GGUF `general.architecture`, and the
    transforms it applies that a reader must undo (rope permutation of q/k rows, norm gains + 1)."""

    arch: str
    rope_permuted: bool = False
    norm_shift: float = 0.0
    config: dict = field(default_factory=dict)  # config.json key -> the value it takes (GGUF has no such key)


@dataclass(frozen=True)
class InjectSlot:
    bias: str
    hf_loads: bool
    config_flag: str | None = None
    siblings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers: str
    unembed: str
    tie_word_embeddings: bool
    config_layers: str
    config_d_model: str
    embeds: tuple[Writer, ...]
    writers: tuple[Writer, ...]
    inject: dict = field(default_factory=dict)
    prefixes: tuple[str, ...] = ("",)
    post_norm_gain: str | None = None
    source: str = ""
    gguf_layout: GGUFLayout | None = None
    gguf: "Architecture | None" = None  # the same table with GGUF names and GGUF-order residual axes
    forward: ForwardSpec | None = None  # how the forward pass runs ([forward]); None: edits only


@dataclass(frozen=True)
class Target:
    """One concrete tensor an ablation may edit."""

    role: str
    layer: int | None  # None for embeddings
    weight: str
    residual_axis: int
    bias: str | None
    post_norm: str | None
    expert_axis: int


def _raw(path: Path) -> dict:
    from patcher.io.paths import read_text

    try:
        return tomllib.loads(read_text(path, "architecture table"))
    except tomllib.TOMLDecodeError as e:
        raise PatcherError(path, f"invalid TOML ({e})") from None


def _merged(path: Path, seen=()) -> dict:
    data = _raw(path)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PatcherError(path, f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    if not isinstance(data.get("forward", {}), dict):
        raise PatcherError(path, f"forward must be a table ([forward]), got {data['forward']!r}")
    parent = data.get("extends")
    if parent is None:
        return data
    if parent in seen:
        raise PatcherError(path, f"'extends' loops back to {parent!r}")
    base = _merged(
        TABLE_DIR / f"{parent}.toml"
        if (TABLE_DIR / f"{parent}.toml").is_file()
        else path.parent / f"{parent}.toml",
        (*seen, parent),
    )
    out = {**base, **{k: v for k, v in data.items() if k != "inject"}}
    out["inject"] = {**base.get("inject", {}), **data.get("inject", {})}
    if "forward" in base or "forward" in data:
        out["forward"] = _overlay(base.get("forward", {}), data.get("forward", {}))
    return out


def _overlay(base: dict, over: dict) -> dict:
    """`over` on top of `base`, key by key at every depth ([forward] and its sub-tables)."""
    both = lambda k: isinstance(base.get(k), dict) and isinstance(over[k], dict)  # noqa: E731
    return {**base, **{k: _overlay(base[k], v) if both(k) else v for k, v in over.items()}}


def _writer(path, entry, role=None) -> Writer:
    if not isinstance(entry, dict) or set(entry) - _WRITER_KEYS - {"name"}:
        raise PatcherError(path, f"bad writer entry {entry!r}; keys: {sorted(_WRITER_KEYS)}")
    _check_types(path, f"writer {entry.get('weight') or entry.get('name')!r}: ", entry, _WRITER_TYPES, _AXES)
    role = role or entry.get("role")
    if role not in ROLES:
        raise PatcherError(path, f"writer role {role!r} is not one of {ROLES}")
    weight = entry.get("weight") or entry.get("name")
    axis = entry.get("residual_axis")
    if not isinstance(weight, str) or not isinstance(axis, int):
        raise PatcherError(path, f"writer {entry!r} needs 'weight' (a name pattern) and 'residual_axis'")
    g = None
    if "gguf" in entry:
        if not isinstance(entry["gguf"], str) or not isinstance(entry.get("gguf_residual_axis"), int):
            raise PatcherError(path, f"writer {weight!r}: 'gguf' needs a name and 'gguf_residual_axis'")
        g = (entry["gguf"], entry.get("gguf_bias"), entry.get("gguf_post_norm"), entry["gguf_residual_axis"])
    return Writer(
        role, weight, axis, entry.get("bias"), entry.get("post_norm"), entry.get("expert_axis", 0), g
    )


def _gguf_writer(w: Writer) -> Writer | None:
    """A writer as GGUF stores it. numpy shapes are GGUF's ne reversed, so an axis counted from ne0
    becomes ndim-1-axis; HF's per-expert tensors are one fused 3-D `_exps` tensor (experts first)."""
    if w.gguf is None:
        return None
    name, bias, post, ne_axis = w.gguf
    ndim = 3 if "{expert}" in w.weight else 2
    return Writer(w.role, name, ndim - 1 - ne_axis, bias, post, 0)


def _gguf_arch(path, a: "Architecture", d: dict) -> "Architecture | None":
    g = d.get("gguf")
    if g is None:
        return None
    if not isinstance(g, dict) or set(g) - _GGUF_KEYS or not isinstance(g.get("arch"), str):
        raise PatcherError(path, f"bad [gguf] table {g!r}; keys: {sorted(_GGUF_KEYS)} ('arch' required)")
    config = g.get("config", {})
    if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
        raise PatcherError(
            path, f"[gguf] config must map config.json keys to the keys they copy, got {config!r}"
        )
    layout = GGUFLayout(
        g["arch"], bool(g.get("rope_permuted", False)), float(g.get("norm_shift", 0.0)), dict(config)
    )
    embeds = tuple(x for x in map(_gguf_writer, a.embeds) if x is not None)
    writers = tuple(x for x in map(_gguf_writer, a.writers) if x is not None)
    inject = {t: InjectSlot(bias, True) for t, bias in (g.get("inject") or {}).items()}
    gain = a.post_norm_gain
    if gain is not None:  # a stored gain of 1 + w is the gain itself
        offset = POST_NORM_GAINS[gain] - layout.norm_shift
        gain = next(k for k, v in POST_NORM_GAINS.items() if v == offset)
    return replace(
        a,
        layers=GGUF_LAYERS,
        unembed=GGUF_UNEMBED,
        embeds=embeds,
        writers=writers,
        inject=inject,
        prefixes=("",),
        post_norm_gain=gain,
        gguf_layout=layout,
    )


def load_table(path) -> Architecture:
    path = Path(path)
    d = _merged(path)
    missing = [k for k in ("model_type", "layers", "unembed", "config", "embed", "writer") if k not in d]
    if missing:
        raise PatcherError(path, f"architecture table lacks {missing}")
    _check_types(path, "", d, _TOP_TYPES)
    _check_types(path, "config.", d["config"], {"layers": str, "d_model": str})
    gain = d.get("post_norm_gain")
    if gain is not None and gain not in POST_NORM_GAINS:
        raise PatcherError(path, f"post_norm_gain must be one of {sorted(POST_NORM_GAINS)}")
    inject = {}
    for target, slot in d.get("inject", {}).items():
        if target not in ("attn_out", "mlp_out") or set(slot) - _INJECT_KEYS or "bias" not in slot:
            raise PatcherError(path, f"bad inject entry {target!r}: {slot!r}")
        inject[target] = InjectSlot(
            slot["bias"],
            bool(slot.get("hf_loads", False)),
            slot.get("config_flag"),
            tuple(slot.get("siblings", ())),
        )
    cfg = d["config"]
    tied = bool(d.get("tie_word_embeddings", False))
    arch = Architecture(
        model_type=d["model_type"],
        layers=d["layers"],
        unembed=d["unembed"],
        tie_word_embeddings=tied,
        config_layers=cfg.get("layers", "num_hidden_layers"),
        config_d_model=cfg.get("d_model", "hidden_size"),
        embeds=tuple(_writer(path, e, "embed") for e in d["embed"]),
        writers=tuple(_writer(path, w) for w in d["writer"]),
        inject=inject,
        prefixes=tuple(d.get("prefixes", ("",))),
        post_norm_gain=gain,
        source=str(path),
        forward=parse_forward(path, d["forward"], tied) if "forward" in d else None,
    )
    gg = _gguf_arch(path, arch, d)
    if gg is None:
        return arch
    return replace(arch, gguf_layout=gg.gguf_layout, gguf=gg)


def for_gguf_arch(gguf_arch: str, where) -> Architecture:
    """The table whose [gguf] arch is this `general.architecture` (the one named like it first)."""
    found = []
    for mt in supported():
        a = load_table(TABLE_DIR / f"{mt}.toml")
        if a.gguf_layout and a.gguf_layout.arch == gguf_arch:
            found.append(a)
    if not found:
        known = sorted(
            {a.gguf_layout.arch for a in map(load_table, sorted(TABLE_DIR.glob("*.toml"))) if a.gguf_layout}
        )
        raise PatcherError(
            where, f"GGUF architecture {gguf_arch!r} is not supported. Supported: {', '.join(known)}"
        )
    return next((a for a in found if a.model_type == gguf_arch), found[0])


def supported() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.toml"))


def for_model_type(model_type: str | None, where) -> Architecture:
    if model_type and (TABLE_DIR / f"{model_type}.toml").is_file():
        return load_table(TABLE_DIR / f"{model_type}.toml")
    what = f"model_type {model_type!r} is not supported" if model_type else "config.json has no model_type"
    raise PatcherError(
        where,
        f"{what}. Supported: {', '.join(supported())}. For another architecture, write a table "
        "(copy patcher/model/tables/llama.toml, edit the name patterns) and pass --arch-table FILE",
    )


# --- resolving a table against a checkpoint's tensor names ---------------------------------------


def _regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{layer\}|\{expert\})", pattern)
    out = "".join(
        {"{layer}": r"(?P<layer>\d+)", "{expert}": r"(?P<expert>\d+)"}.get(p, re.escape(p)) for p in parts
    )
    return re.compile(out + r"\Z")


def sub(pattern: str, layer: int) -> str:
    return pattern.replace("{layer}", str(layer))


@dataclass
class Resolved:
    """A table applied to one checkpoint: concrete targets per role and layer, and what is absent."""

    arch: Architecture
    prefix: str
    n_layers: int
    d_model: int
    tied: bool
    targets: list[Target]
    missing: list[tuple[str, int | None, str]]  # (role, layer, pattern) with no tensor at all

    def layer_prefix(self, layer: int) -> str:
        return self.prefix + sub(self.arch.layers, layer)

    def select(self, roles=ROLES, layers=None) -> list[Target]:
        return [
            t
            for t in self.targets
            if t.role in roles and (t.layer is None or layers is None or t.layer in layers)
        ]


def resolve(arch: Architecture, names, config: dict, where) -> Resolved:
    names = set(names)
    prefix = next(
        (p for p in arch.prefixes if all(p + e.weight in names for e in arch.embeds)), arch.prefixes[0]
    )
    n_layers, d_model = config.get(arch.config_layers), config.get(arch.config_d_model)
    if not (_is_int(n_layers) and _is_int(d_model)):
        raise PatcherError(
            where,
            f"config.json needs integer '{arch.config_layers}' and '{arch.config_d_model}' "
            f"for model_type {arch.model_type!r} (got {n_layers!r} and {d_model!r})",
        )
    tied = bool(config.get("tie_word_embeddings", arch.tie_word_embeddings))
    targets: list[Target] = []
    missing: list[tuple[str, int | None, str]] = []
    for e in arch.embeds:
        if prefix + e.weight in names:
            targets.append(
                Target(
                    "embed",
                    None,
                    prefix + e.weight,
                    e.residual_axis,
                    _present(prefix + e.bias, names) if e.bias else None,
                    None,
                    0,
                )
            )
        else:
            missing.append(("embed", None, prefix + e.weight))
    by_role_layer: dict[tuple[str, int], int] = {}
    for w in arch.writers:
        rx = _regex(prefix + arch.layers + w.weight)
        hits = []
        for n in names:
            m = rx.match(n)
            if m:
                hits.append((int(m["layer"]), int(m["expert"]) if "expert" in m.groupdict() else -1, n))
        for layer, _, n in sorted(hits):
            if layer >= n_layers:
                continue
            tail = n[len(prefix + sub(arch.layers, layer)) :]
            expert = _regex(w.weight).match(tail)
            bias = post = None
            if w.bias:
                bias = _present(_fill(prefix + sub(arch.layers, layer) + w.bias, expert), names)
            if w.post_norm:
                post = _fill(prefix + sub(arch.layers, layer) + w.post_norm, expert)
                if post not in names:
                    raise PatcherError(where, f"{n} is a post-norm writer but {post} is missing")
            targets.append(Target(w.role, layer, n, w.residual_axis, bias, post, w.expert_axis))
            by_role_layer[(w.role, layer)] = by_role_layer.get((w.role, layer), 0) + 1
    for role in ("attn_out", "mlp_out"):
        for layer in range(n_layers):
            if (role, layer) not in by_role_layer:
                missing.append((role, layer, " | ".join(w.weight for w in arch.writers if w.role == role)))
    return Resolved(arch, prefix, n_layers, d_model, tied, targets, missing)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _fill(pattern: str, match) -> str:
    return (
        pattern.replace("{expert}", match["expert"]) if match and "expert" in match.groupdict() else pattern
    )


def _present(name: str, names) -> str | None:
    return name if name in names else None


def markdown_table() -> str:
    """The architecture table of docs/models.md, generated from the tables themselves."""
    rows = [
        "| model_type | forward: norm, layout, qkv, MLP, attention | embeddings | attention writer "
        "| MLP writer(s) | post-norm | tied | inject attn_out / mlp_out |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def loads(slot):
        return (
            "—"
            if slot is None
            else (
                "HF" + (f" (`{slot.config_flag}`)" if slot.config_flag else "")
                if slot.hf_loads
                else "ONNX only"
            )
        )

    for mt in supported():
        a = load_table(TABLE_DIR / f"{mt}.toml")
        writers = lambda role: ", ".join(f"`{w.weight}`" for w in a.writers if w.role == role)  # noqa: E731
        f = a.forward
        kinds = ", ".join((f.norm, f.layout, f.qkv, f.mlp, f.attention)) if f else "—"
        rows.append(
            f"| {mt} | {kinds} | {', '.join(f'`{e.weight}`' for e in a.embeds)} | {writers('attn_out')} | "
            f"{writers('mlp_out')} | {a.post_norm_gain or '—'} | "
            f"{'yes' if a.tie_word_embeddings else 'no'} | "
            f"{loads(a.inject.get('attn_out'))} / {loads(a.inject.get('mlp_out'))} |"
        )
    return "\n".join(rows)
