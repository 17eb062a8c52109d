"""Planning edits: turn (checkpoint, table, direction, options) into a readable list of tensor
operations before any byte is written. `--dry-run` prints exactly this plan; `apply` executes it.
"""

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from patcher_kernels.codecs import INTEGER_DTYPES, numpy_dtype
from patcher_kernels.ggml_quant import BYTES_PER_BLOCK, row_bytes
from patcher_kernels.project import orthonormalize

from patcher import __version__
from patcher.edit.directions import Direction
from patcher.errors import PatcherError
from patcher.model.architectures import POST_NORM_GAINS, ROLES, Resolved, Target
from patcher.model.opened import Model
from patcher.validate import parse_layers  # noqa: F401 - re-exported: one layer syntax everywhere

V = TypeVar("V")

# How each operation reads in the dry-run plan.
FORMULAS = {
    ("project", 0): "W - s Q(QᵀW)",
    ("project", 1): "W - s (WQ)Qᵀ",
    ("project_bias", None): "b - s Q(Qᵀb)",
    ("inject_bias", None): "b + α r̂",
    ("new_bias", None): "α r̂ (new)",
    ("zero_bias", None): "0 (new, enables the config flag)",
    ("copy_of", None): "copy of original",
    ("requant_scale", None): "max(s, amax/448)",
}


@dataclass
class TensorEdit:
    name: str
    role: str
    layer: int | None
    op: str  # a key of FORMULAS (first element)
    dtype: str
    shape: tuple[int, ...]
    shard: str
    residual_axis: int | None = None
    expert_axis: int = 0
    q: np.ndarray | None = None  # [d_model, k] orthonormal basis removed by projections
    scale: float = 1.0
    preserve: str | None = None
    vector: np.ndarray | None = None  # added by inject_bias / new_bias
    source: str | None = None  # copy_of: the tensor whose original bytes are copied
    fp8_scale: str | None = None  # name of the block-scale tensor of an fp8 weight

    # the fields an operation needs, present (the planner sets them; a hand-made plan may not)
    @property
    def axis(self) -> int:
        return _given(self, "residual_axis", self.residual_axis)

    @property
    def basis(self) -> np.ndarray:
        return _given(self, "q", self.q)

    @property
    def source_name(self) -> str:
        return _given(self, "source", self.source)

    @property
    def scale_name(self) -> str:
        return _given(self, "fp8_scale", self.fp8_scale)

    @property
    def formula(self) -> str:
        return FORMULAS[(self.op, self.residual_axis if self.op == "project" else None)]

    @property
    def nbytes(self) -> int:
        if self.dtype in BYTES_PER_BLOCK:  # GGUF block types
            return int(np.prod(self.shape[:-1], dtype=np.int64)) * row_bytes(self.dtype, self.shape[-1])
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize


def _given(edit: TensorEdit, what: str, value: V | None) -> V:
    if value is None:
        raise PatcherError(edit.name, f"a {edit.op} edit needs {what}, and this plan has none")
    return value


@dataclass
class Plan:
    ck: Model
    resolved: Resolved
    edits: dict[str, TensorEdit] = field(default_factory=dict)  # existing tensors rewritten
    new: list[TensorEdit] = field(default_factory=list)  # tensors added
    config_updates: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)  # the edit as JSON, for provenance

    def all(self) -> list[TensorEdit]:
        return [*self.edits.values(), *self.new]

    @property
    def bytes_edited(self) -> int:
        return sum(e.nbytes for e in self.all())


def resolved_table(ck: Model) -> Resolved:
    """The model's resolved architecture table (a clear error for a model opened without one)."""
    if ck.resolved is None:
        raise PatcherError(ck.source, ck.arch_note or "no architecture table was resolved for this model")
    return ck.resolved


def _fp8_scale_name(ck: Model, weight: str) -> str | None:
    if not ck.info(weight).dtype.startswith("F8"):
        return None
    scale = ck.fp8_scale(weight)
    if scale is None:
        raise PatcherError(
            ck.path,
            f"{weight} is FP8 but has no {weight}_scale_inv / {weight}_scale tensor; "
            f"per-tensor FP8 without block scales is not supported",
        )
    return scale


def _post_norm_basis(ck: Model, resolved: Resolved, target: Target, q: np.ndarray) -> np.ndarray:
    """Writers followed by g * RMSNorm(.) must be orthogonal to g * r, not r (docs/math.md)."""
    rule = resolved.arch.post_norm_gain
    if rule is None:  # the table names a writer's post-norm but not how its gain reads
        raise PatcherError(
            resolved.arch.source, f"{target.weight} has a post_norm but the table no post_norm_gain"
        )
    gain = POST_NORM_GAINS[rule] + ck.array(target.post_norm).astype(np.float64)
    return orthonormalize((gain[:, None] * q).T)


def _edit_for(ck: Model, name: str, role: str, layer, op: str, **kw) -> TensorEdit:
    info = ck.info(name)
    if info.dtype in INTEGER_DTYPES:  # a projection of integer codes is not the edit (and rounds to garbage)
        raise PatcherError(
            ck.folder / ck.shard_of[name],
            f"{name} is {info.dtype}, not a floating-point weight: it cannot be edited along a direction",
        )
    return TensorEdit(name, role, layer, op, info.dtype, info.shape, ck.shard_of[name], **kw)


def plan_ablation(
    ck: Model,
    direction: Direction,
    *,
    layers=None,
    roles=ROLES,
    scale: float | dict = 1.0,
    preserve: str | None = None,
    untie: bool = False,
) -> Plan:
    """`scale` is one strength, or a strength per layer (embeddings take layer 0's); a layer whose
    strength is 0 is left untouched."""
    resolved = resolved_table(ck)
    q0 = orthonormalize(direction.vectors)
    strength = (
        (lambda layer: float(scale.get(0 if layer is None else layer, 0.0)))
        if isinstance(scale, dict)
        else (lambda layer: float(scale))
    )
    plan = Plan(ck, resolved)
    targets = [t for t in resolved.select(roles, layers) if strength(t.layer) != 0.0]
    if not targets:
        raise PatcherError("--targets/--layers", "selects no tensor of this model")
    for t in targets:
        q = _post_norm_basis(ck, resolved, t, q0) if t.post_norm else q0
        info = ck.info(t.weight)
        if (
            len(info.shape) not in (2, 3)
            or t.residual_axis >= len(info.shape)
            or info.shape[t.residual_axis] != resolved.d_model
        ):
            raise PatcherError(
                ck.folder / ck.shard_of[t.weight],
                f"{t.weight} has shape {list(info.shape)}; the table says axis {t.residual_axis} is the "
                f"residual axis (d_model={resolved.d_model})",
            )
        fp8 = _fp8_scale_name(ck, t.weight)
        plan.edits[t.weight] = _edit_for(
            ck,
            t.weight,
            t.role,
            t.layer,
            "project",
            residual_axis=t.residual_axis,
            expert_axis=t.expert_axis,
            q=q,
            scale=strength(t.layer),
            preserve=preserve,
            fp8_scale=fp8,
        )
        if fp8:
            plan.edits[fp8] = _edit_for(ck, fp8, t.role, t.layer, "requant_scale", source=t.weight)
        if t.bias:
            plan.edits[t.bias] = _edit_for(
                ck, t.bias, t.role, t.layer, "project_bias", q=q, scale=strength(t.layer)
            )
    token_embed = resolved.prefix + resolved.arch.embeds[0].weight
    if resolved.tied and token_embed in plan.edits:
        if untie:
            unembed = resolved.arch.unembed
            if unembed in ck.tensors:
                plan.edits[unembed] = _edit_for(ck, unembed, "unembed", None, "copy_of", source=token_embed)
            else:
                info = ck.info(token_embed)
                plan.new.append(
                    TensorEdit(
                        unembed,
                        "unembed",
                        None,
                        "copy_of",
                        info.dtype,
                        info.shape,
                        ck.shard_of[token_embed],
                        source=token_embed,
                    )
                )
            plan.config_updates["tie_word_embeddings"] = False
            plan.notes.append(
                f"untied: {unembed} keeps the original embedding; config.json tie_word_embeddings=false"
            )
        else:
            plan.notes.append(
                "embeddings are tied: editing the embedding also edits the output unembedding "
                "(pass --untie-embeddings to keep the original unembedding)"
            )
    plan.record = {
        "op": "ablate",
        "direction": direction.source,
        "direction_sha256": direction.sha256,
        "rank": int(q0.shape[1]),
        "layers": _layers_text(layers),
        "targets": list(roles),
        "scale": {str(k): v for k, v in sorted(scale.items())} if isinstance(scale, dict) else scale,
        "norm_preserve": preserve,
        "untie_embeddings": untie,
        "post_norm_corrected": any(t.post_norm for t in targets),
        "patcher": __version__,
    }
    return plan


def plan_injection(
    ck: Model, direction: Direction, *, layer: int, alpha: float, target: str = "mlp_out"
) -> Plan:
    resolved = resolved_table(ck)
    arch = resolved.arch
    if not 0 <= layer < resolved.n_layers:
        raise PatcherError(
            "--layer", f"layer {layer} is out of range: the model has layers 0..{resolved.n_layers - 1}"
        )
    if direction.vectors.shape[0] != 1:
        raise PatcherError(direction.source, "inject takes one direction, not a rank-k set")
    slot = arch.inject.get(target)
    if slot is None:
        raise PatcherError("--target", ck.no_injection_slot(target))
    unit = direction.unit[0]
    vector = alpha * unit
    plan = Plan(ck, resolved)
    lp = resolved.layer_prefix(layer)
    bias = lp + slot.bias
    if bias in ck.tensors:
        plan.edits[bias] = _edit_for(ck, bias, target, layer, "inject_bias", vector=vector)
    else:
        writer = next((t for t in resolved.targets if t.layer == layer and t.role == target), None)
        like = ck.info(writer.weight) if writer else ck.info(next(n for n in ck.tensors if n.startswith(lp)))
        plan.new.append(
            TensorEdit(
                bias,
                target,
                layer,
                "new_bias",
                _bias_dtype(like.dtype),
                (resolved.d_model,),
                ck.shard_of[like.name],
                vector=vector,
            )
        )
    if slot.hf_loads and slot.config_flag and not resolved_flag(ck, slot.config_flag):
        plan.config_updates[slot.config_flag] = True
        for l in range(resolved.n_layers):
            for sib in slot.siblings:
                w, b = resolved.layer_prefix(l) + sib + ".weight", resolved.layer_prefix(l) + sib + ".bias"
                if w in ck.tensors and b not in ck.tensors and b != bias:
                    info = ck.info(w)
                    plan.new.append(
                        TensorEdit(
                            b,
                            "bias",
                            l,
                            "zero_bias",
                            _bias_dtype(info.dtype),
                            (info.shape[0],),
                            ck.shard_of[w],
                        )
                    )
        plan.notes.append(
            f"config.json {slot.config_flag}=true so HF transformers loads the bias; the "
            "other biases that flag requires are written as zeros"
        )
    if slot.hf_loads:
        plan.notes.append(f"{bias} is loaded by HF transformers and is active there and in the ONNX export")
    else:
        plan.notes.append(
            f"HF transformers has no bias slot at {bias} for {arch.model_type}: it ignores this tensor "
            "(an 'unused weights' warning). The ONNX export (patcher export) carries it"
        )
    plan.record = {
        "op": "inject",
        "direction": direction.source,
        "direction_sha256": direction.sha256,
        "layer": layer,
        "alpha": alpha,
        "target": target,
        "bias": bias,
        "hf_loads": slot.hf_loads,
        "patcher": __version__,
    }
    return plan


def resolved_flag(ck: Model, flag: str) -> bool:
    return bool(ck.config.get(flag, False))


def _bias_dtype(weight_dtype: str) -> str:
    # an FP8 weight's bias is kept in bf16: fp8 has no room for a bias's precision
    return "BF16" if weight_dtype.startswith("F8") else weight_dtype


def _layers_text(layers) -> str | None:
    return None if layers is None else ",".join(str(l) for l in sorted(layers))


def peak_kernel(n_layers: int, peak: float, center: float, minimum: float, width: float) -> dict[int, float]:
    """Per-layer strength that falls linearly from `peak` at layer `center` to `minimum` at distance
    `width`, and is 0 beyond (the layer kernel of the best-known peer's search; recipe kernel "peak")."""
    if width <= 0:
        raise PatcherError("width", "the peak kernel's width must be > 0")
    out = {}
    for l in range(n_layers):
        dist = abs(l - center)
        out[l] = 0.0 if dist > width else peak + (minimum - peak) * dist / width
    return out
