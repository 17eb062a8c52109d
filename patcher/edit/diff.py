"""`patcher diff BASE CANDIDATE`: audit a checkpoint against a trusted base.

Both checkpoints are streamed tensor by tensor: byte-identical tensors are skipped after a chunked
byte comparison; each changed matrix is analysed row block by row block (kernels/lowrank.py: exact
‖Δ‖², top singular values by a randomized range finder, the storage-rounding bound). For residual
writers whose change is rank 1 the residual-side singular vector is the removed direction (left for
residual axis 0, right for axis 1; divided by the post-norm gain g of the BASE for post-norm
writers, whose edit removes u ∝ g⊙r̂); one more pass over the candidate measures the leakage
|uᵀW'| / |uᵀW|, which tells removal (< 1) from amplification (> 1). Biases, norms, added and removed
tensors and config.json are compared too, and everything is summed up in one plain verdict:
  "unchanged" (exit 0), "rank-1 directional ablation along one shared direction (N tensors)",
  "bias injection at layer L" or "other changes" (exit 1); an error exits 2.
"""

import json
import math
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
from patcher_kernels.codecs import FLOAT_DTYPES
from patcher_kernels.fp8 import dequantize_blocks
from patcher_kernels.lowrank import (
    MANTISSA_BITS,
    off_direction_energy,
    rank_for_energy,
    rounding_floor,
    shared_direction,
    top_singular,
)
from patcher_kernels.project import orthonormalize

from patcher.edit.directions import Direction, load_direction
from patcher.io.checkpoint import fp8_weight_of
from patcher.model.architectures import POST_NORM_GAINS, Resolved, Target, resolve
from patcher.model.opened import FP8_TILE, Model

TOP_K = 8  # singular values estimated per changed matrix
ENERGY = 0.99  # "rank99": how many singular values carry 99 % of ‖Δ‖²
CONSISTENT = 0.99  # min cosine to the shared direction for "one shared direction"
REMOVED = 0.9  # an ablation leaves at most this fraction of the component along the direction
BLOCK_BYTES = 8 << 20  # per row block and per byte-comparison chunk
_COSMETIC_CONFIG = {"_name_or_path", "transformers_version"}
_NORM_NAME = re.compile(r"norm|(^|\.)ln_")


@dataclass
class TensorDiff:
    name: str
    role: str  # embed / attn_out / mlp_out, <role>_bias, norm, fp8_scale, unembed, other, unknown
    layer: int | None
    status: str  # changed / added / removed / dtype_changed / shape_changed
    dtype: str
    shape: tuple
    relative_change: float | None = None  # ‖Δ‖ / ‖W_base‖
    delta_norm: float | None = None
    rank99: int | None = None
    rank99_above: int | None = None  # set when the top TOP_K do not reach 99 %
    singular_values: list = field(default_factory=list)
    top1_share: float | None = None  # σ₁² / ‖Δ‖²
    rounding_share: float | None = None  # storage-rounding bound / ‖Δ‖²
    cos_shared: float | None = None
    cos_direction: float | None = None
    leakage: float | None = None  # |component along the recovered direction| after / before
    ignorable: bool = False  # zero bias added, untied copy, FP8 scale of an analysed weight
    note: str = ""
    # not in JSON: the recovered residual direction (unit) or a 1-D tensor's change, and its rounding bound
    recovered: np.ndarray | None = None
    delta: np.ndarray | None = None
    values: np.ndarray | None = None  # a 1-D tensor's candidate values
    floor: float = 0.0
    target: Target | None = None

    def to_json(self) -> dict:
        skip = {"recovered", "delta", "values", "floor", "target"}
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if k not in skip
        }


@dataclass
class DiffReport:
    base: str
    candidate: str
    model_type: str | None
    table: str | None
    counts: dict
    tensors: list[TensorDiff]
    verdict: str = "unchanged"
    shared: dict | None = None
    direction: np.ndarray | None = None  # the recovered shared (or injected) direction, unit
    injection: dict | None = None
    config_changes: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return self.verdict != "unchanged"

    @property
    def direction_cosine(self) -> float | None:
        """Cosine of the recovered direction (shared, or injected) with the given --direction."""
        found = self.shared or self.injection or {}
        return found.get("cos_to_direction")

    def to_json(self) -> dict:
        return {
            "base": self.base,
            "candidate": self.candidate,
            "model_type": self.model_type,
            "architecture_table": self.table,
            "verdict": self.verdict,
            "changed": self.changed,
            "direction_cosine": self.direction_cosine,
            "counts": self.counts,
            "tensors": [t.to_json() for t in self.tensors],
            "shared_direction": self.shared,
            "injection": self.injection,
            "config_changes": self.config_changes,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }

    # the report also reads as its JSON dict (report["verdict"], report.get("direction_cosine"))
    def __getitem__(self, key):
        return self.to_json()[key]

    def get(self, key, default=None):
        return self.to_json().get(key, default)


# --- roles --------------------------------------------------------------------------------------


class _Roles:
    """Which part each tensor name plays, from the architecture table (or "unknown" without one)."""

    def __init__(self, res: Resolved | None, names: set, fp8_weight):
        self.res, self.names, self.fp8_weight = res, names, fp8_weight
        self.weights: dict[str, Target] = {}
        self.biases: dict[str, Target] = {}
        self.slots: dict[str, tuple[str, int]] = {}
        self.norms: set[str] = set()
        if res is None:
            return
        for t in res.targets:
            self.weights[t.weight] = t
            if t.bias:
                self.biases[t.bias] = t
            if t.post_norm:
                self.norms.add(t.post_norm)
        for layer in range(res.n_layers):
            for role, slot in res.arch.inject.items():
                self.slots[res.layer_prefix(layer) + slot.bias] = (role + "_bias", layer)
        head, _, tail = (res.prefix + res.arch.layers).partition("{layer}")
        self._layer_rx = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))

    def layer_of(self, name: str) -> int | None:
        m = self._layer_rx.match(name) if self.res else None
        return int(m[1]) if m else None

    def of(self, name: str, ndim: int) -> tuple[str, int | None, Target | None]:
        if self.res is None:
            return "unknown", None, None
        if name in self.weights:
            t = self.weights[name]
            return t.role, t.layer, t
        if name in self.biases:
            t = self.biases[name]
            return t.role + "_bias", t.layer, t
        if name in self.slots:
            return (*self.slots[name], None)
        layer = self.layer_of(name)
        if self.fp8_weight(name):
            return "fp8_scale", layer, None
        if name == self.res.arch.unembed:
            return "unembed", None, None
        if name in self.norms or (ndim == 1 and _NORM_NAME.search(name)):
            return "norm", layer, None
        return "other", layer, None


# --- reading ------------------------------------------------------------------------------------


def _same_bytes(a: Model, name_a: str, b: Model, name_b: str) -> bool:
    """Byte comparison of two equally sized tensors in chunks (pread copies: nothing stays resident)."""
    info = a.info(name_a)
    if info.nbytes == 0:
        return True
    row_len = info.shape[-1] if info.shape and info.shape[-1] else 1
    rows = info.numel // row_len
    step = max(1, BLOCK_BYTES // (info.nbytes // rows))
    for s in range(0, rows, step):
        e = min(rows, s + step)
        x, y = a.read_rows(name_a, s, e, row_len), b.read_rows(name_b, s, e, row_len)
        if x.dtype != y.dtype:  # a GGUF's values against another storage: compare values
            if not np.array_equal(x.astype(np.float32), y.astype(np.float32)):
                return False
        elif not np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)):
            return False
    return True


@dataclass
class _Geometry:
    """A tensor seen as the 2-D matrix the analysis streams. `experts` > 1 with axis 0: a fused
    [E, d_model, b] tensor read as [d_model, E·b] (all experts side by side share r̂ on the left)."""

    n_rows: int
    n_cols: int
    axis: int | None  # residual axis of the 2-D view; None for non-writers
    experts: int = 1

    @classmethod
    def of(cls, shape: tuple, target: Target | None) -> "_Geometry":
        axis = target.residual_axis if target else None
        if len(shape) == 3 and target and target.expert_axis == 0 and axis in (1, 2):
            if axis == 2:
                return cls(shape[0] * shape[1], shape[2], 1)
            return cls(shape[1], shape[0] * shape[2], 0, experts=shape[0])
        if len(shape) >= 2:
            return cls(shape[0], math.prod(shape[1:]), axis if len(shape) == 2 else None)
        return cls(1, max(1, math.prod(shape)), None)


class _Rows:
    """Rows [s, e) of one checkpoint's tensor in its 2-D view, as float32 (FP8 dequantised), and the
    per-element storage-grid scale needed for the rounding bound."""

    def __init__(self, ck: Model, name: str, geom: _Geometry):
        self.ck, self.name, self.geom = ck, name, geom
        self.dtype = ck.info(name).dtype
        scale = ck.fp8_scale(name)
        self.scale = ck.array(scale).astype(np.float32) if scale and len(ck.info(name).shape) == 2 else None

    def raw(self, s: int, e: int) -> np.ndarray:
        g = self.geom
        if g.experts == 1:
            return self.ck.read_rows(self.name, s, e, g.n_cols)
        per = g.n_cols // g.experts  # fused experts: row i of the view is row i of every expert
        return np.concatenate(
            [self.ck.read_rows(self.name, x * g.n_rows + s, x * g.n_rows + e, per) for x in range(g.experts)],
            axis=1,
        )

    def values(self, raw: np.ndarray, s: int, e: int) -> np.ndarray:
        if self.scale is not None:
            return dequantize_blocks(raw, self.scale[s // FP8_TILE : -(-e // FP8_TILE)], FP8_TILE)
        return raw.astype(np.float32)

    def floor(self, raw: np.ndarray, values: np.ndarray) -> float:
        quant = getattr(self.ck.storage, "quant_floor", None)  # GGUF: the block grid of its own type
        if quant is not None:
            return quant(self.name, values)
        bits = MANTISSA_BITS.get(self.dtype)
        if bits is None:
            return 0.0
        if self.scale is None:
            return rounding_floor(values, bits)
        q = raw.astype(np.float32)  # FP8: the grid is the fp8 grid of q times its tile scale
        return rounding_floor(q, bits, np.divide(values, q, out=np.zeros_like(values), where=q != 0))


def _block_rows(geom: _Geometry, fp8: bool) -> int:
    rows = max(1, BLOCK_BYTES // (4 * geom.n_cols))
    return max(FP8_TILE, rows - rows % FP8_TILE) if fp8 else rows  # FP8 blocks never split a scale tile


# --- analysis -----------------------------------------------------------------------------------


def _analyse(base: Model, cand: Model, td: TensorDiff, d_model: int | None, gain) -> None:
    """Fill in the numbers of a changed tensor (same shape and dtype in both)."""
    if td.dtype not in FLOAT_DTYPES:
        td.note = "non-float tensor changed"
        return
    geom = _Geometry.of(td.shape, td.target)
    if td.shape and math.prod(td.shape) == 0:
        return
    rb, rc = _Rows(base, td.name, geom), _Rows(cand, td.name, geom)
    sums = {"base": 0.0, "floor": 0.0, "next": 0}

    def read(s, e):
        xb, xc = rb.raw(s, e), rc.raw(s, e)
        b, c = rb.values(xb, s, e), rc.values(xc, s, e)
        if s == sums["next"]:  # the first sweep sees every row once, in order: exact sums go here
            sums["next"] = e
            sums["base"] += float(np.einsum("ij,ij->", b, b, dtype=np.float64))
            sums["floor"] += rc.floor(xc, c)
        return c - b

    if len(td.shape) <= 1:  # biases, norms, scalars: small; keep the change itself
        delta = read(0, 1).astype(np.float64).reshape(-1)
        energy = float(delta @ delta)
        td.delta, td.floor = delta, sums["floor"]
        td.values = rc.values(rc.raw(0, 1), 0, 1).astype(np.float64).reshape(-1)
    else:
        spec = top_singular(
            read,
            geom.n_rows,
            geom.n_cols,
            k=TOP_K,
            block_rows=_block_rows(geom, rb.scale is not None or rc.scale is not None),
        )
        energy, td.floor = spec.energy, sums["floor"]
        td.singular_values = [float(x) for x in spec.sigma]
        if energy > 0:
            td.top1_share = float(spec.sigma[0] ** 2 / energy)
            td.rank99 = rank_for_energy(spec.sigma, energy, ENERGY, td.floor)
            if td.rank99 is None:
                td.rank99_above = len(spec.sigma)
            if td.rank99 == 1 and geom.axis is not None:
                v = spec.left[:, 0] if geom.axis == 0 else spec.right[:, 0]
                if d_model is None or v.shape[0] == d_model:
                    td.recovered = _undo_post_norm(v, base, td.target, gain)
                    td.leakage = _leakage(rc, geom, spec, _block_rows(geom, rc.scale is not None))
    td.delta_norm = math.sqrt(energy)
    td.rounding_share = td.floor / energy if energy else None
    td.relative_change = math.sqrt(energy / sums["base"]) if sums["base"] > 0 else None


def _leakage(cand: _Rows, geom: _Geometry, spec, block: int) -> float | None:
    """|component of W' along the residual-side vector| / |that of W| (what `ablate` calls leakage):
    below 1 the edit removed the direction, above 1 it amplified it. One pass over the candidate; the
    base's component follows from the SVD (aᵀΔ = σ₁b₁ᵀ, Δb₁ = σ₁a₁), so the base is not read
    again."""
    a, b, sigma = spec.left[:, 0], spec.right[:, 0], spec.sigma[0]
    comp = np.zeros(geom.n_cols if geom.axis == 0 else geom.n_rows)
    for s in range(0, geom.n_rows, block):
        e = min(s + block, geom.n_rows)
        w = cand.values(cand.raw(s, e), s, e).astype(np.float64)
        if geom.axis == 0:
            comp += a[s:e] @ w
        else:
            comp[s:e] = w @ b
    before = np.linalg.norm(comp - sigma * (b if geom.axis == 0 else a))
    return float(np.linalg.norm(comp) / before) if before > 0 else None


def _post_norm_gain(base: Model, target: Target | None, gain) -> np.ndarray | None:
    if target is None or not target.post_norm or gain is None:
        return None
    return POST_NORM_GAINS[gain] + base.array(target.post_norm).astype(np.float64)


def _undo_post_norm(v: np.ndarray, base: Model, target: Target | None, gain) -> np.ndarray:
    """A post-norm writer was orthogonalised against u ∝ g⊙r̂; r̂ ∝ u / g, with g from the base."""
    g = _post_norm_gain(base, target, gain)
    if g is not None:
        v = v / np.where(np.abs(g) > 1e-12, g, 1e-12)
    return v / np.linalg.norm(v)


def _added(base: Model, cand: Model, td: TensorDiff, res: Resolved | None) -> None:
    """An added tensor: a zero bias only enables a config flag; a copy of the base embedding is an untie."""
    info = cand.info(td.name)
    if res is not None and td.name == res.arch.unembed:
        embed = res.prefix + res.arch.embeds[0].weight
        same_kind = embed in base.tensors and (base.info(embed).shape, base.info(embed).dtype) == (
            info.shape,
            info.dtype,
        )
        if same_kind:
            if _same_bytes(cand, td.name, base, embed):  # cand[unembed] == base[embed], byte for byte
                td.ignorable, td.note = True, "untied: holds the base embedding"
                return
    if len(info.shape) == 1 and info.dtype in FLOAT_DTYPES:
        v = cand.read_rows(td.name, 0, 1, info.shape[0]).astype(np.float64).reshape(-1)
        td.delta, td.values, td.delta_norm = v, v, float(np.linalg.norm(v))
        bits = MANTISSA_BITS.get(info.dtype)
        td.floor = rounding_floor(v, bits) if bits else 0.0
        if not v.any():
            td.ignorable, td.note = True, "zero bias (enables a config flag)"


# --- the whole comparison -----------------------------------------------------------------------


def _architecture(base: Model, cand: Model, arch_table, notes: list) -> tuple[Model, Resolved | None]:
    if arch_table is not None and base.config:
        base = base.with_table(arch_table)
    if base.arch is None or not base.config:
        what = base.arch_note or "the base has no config.json"
        notes.append(f"{what}: roles are unknown and no direction is recovered (pass --arch-table FILE)")
        return base, None
    names = set(base.tensors) | set(cand.tensors)  # biases an edit added resolve too
    return base, resolve(base.arch, names, base.config, base.config_path)


def diff(base_path, cand_path, direction: "str | Direction | None" = None, arch_table=None) -> DiffReport:
    """Compare CANDIDATE with BASE (folders or files); `direction` is a spec as on the command line or a
    loaded Direction."""
    t0 = time.perf_counter()
    with ExitStack() as stack:
        base = stack.enter_context(Model.open(base_path, require_arch=False, arch_optional=True))
        cand = stack.enter_context(Model.open(cand_path, require_arch=False, arch_optional=True))
        notes: list[str] = []
        mixed, cross = base.is_gguf or cand.is_gguf, base.is_gguf != cand.is_gguf
        if mixed:  # GGUF: compared as the HF model it stores (dequantized values under HF names)
            base, cand = base.forward_model(), cand.forward_model()
            notes.append(
                "GGUF compared by dequantized values under HF names; rank estimates allow for the "
                "quantization grid of the candidate's storage type"
            )
        base, res = _architecture(base, cand, arch_table, notes)
        if res and cand.model_type and cand.model_type != base.model_type:
            notes.append(f"candidate model_type is {cand.model_type!r}, base {base.model_type!r}")
        d_model = res.d_model if res else None
        given = load_direction(direction, d_model) if isinstance(direction, str) else direction
        basis = orthonormalize(given.vectors) if given is not None else None  # [d_model, k]
        union = {**base.tensors, **cand.tensors}
        roles = _Roles(res, set(union), lambda name: fp8_weight_of(union, name))
        gain = res.arch.post_norm_gain if res else None

        tensors, identical = [], 0
        for name, info in base.tensors.items():
            role, layer, target = roles.of(name, len(info.shape))
            if name not in cand.tensors:
                tensors.append(TensorDiff(name, role, layer, "removed", info.dtype, info.shape))
                continue
            other = cand.info(name)
            if other.shape != info.shape or (other.dtype != info.dtype and not mixed):
                status = "shape_changed" if other.shape != info.shape else "dtype_changed"
                tensors.append(
                    TensorDiff(
                        name,
                        role,
                        layer,
                        status,
                        f"{info.dtype}→{other.dtype}",
                        info.shape if other.shape == info.shape else (info.shape, other.shape),
                    )
                )
                continue
            scale = base.fp8_scale(name)
            if _same_bytes(base, name, cand, name) and (
                scale is None or scale not in cand.tensors or _same_bytes(base, scale, cand, scale)
            ):
                identical += 1
                continue
            td = TensorDiff(
                name,
                role,
                layer,
                "changed",
                info.dtype if other.dtype == info.dtype else "F32",
                info.shape,
                target=target,
            )
            _analyse(base, cand, td, d_model, gain)
            tensors.append(td)
        for name, info in cand.tensors.items():
            if name not in base.tensors:
                role, layer, target = roles.of(name, len(info.shape))
                td = TensorDiff(name, role, layer, "added", info.dtype, info.shape, target=target)
                _added(base, cand, td, res)
                tensors.append(td)
        analysed = {t.name for t in tensors if t.status == "changed" and t.singular_values}
        for t in tensors:  # an FP8 scale changes with its weight, which is analysed dequantised
            if t.role == "fp8_scale" and fp8_weight_of(cand.tensors, t.name) in analysed:
                t.ignorable, t.note = True, "block scale of an analysed FP8 weight"

        rep = DiffReport(
            str(base.path),
            str(cand.path),
            base.model_type,
            res.arch.source if res else None,
            {
                "base_tensors": len(base.tensors),
                "identical": identical,
                "changed": sum(t.status != "added" and t.status != "removed" for t in tensors),
                "added": sum(t.status == "added" for t in tensors),
                "removed": sum(t.status == "removed" for t in tensors),
            },
            tensors,
            notes=notes,
        )
        if not cross:  # GGUF metadata and config.json say the same things in different words
            _config_changes(base, cand, res, rep)
        _shared(rep, base, basis, gain)
        _verdict(rep, basis)
        rep.seconds = time.perf_counter() - t0
        return rep


def _config_changes(base: Model, cand: Model, res: Resolved | None, rep: DiffReport) -> None:
    flags = {s.config_flag for s in res.arch.inject.values() if s.config_flag} if res else set()
    expected = {"tie_word_embeddings"} | flags  # what ablate --untie-embeddings / inject may set
    for key in sorted(set(base.config) | set(cand.config)):
        old, new = base.config.get(key), cand.config.get(key)
        if old != new and key not in _COSMETIC_CONFIG:
            rep.config_changes[key] = {"base": old, "candidate": new, "expected_for_an_edit": key in expected}


def _writer_weights(rep: DiffReport) -> list[TensorDiff]:
    return [t for t in rep.tensors if t.status == "changed" and t.role in ("embed", "attn_out", "mlp_out")]


def _biases(rep: DiffReport) -> list[TensorDiff]:
    """1-D changes that act as residual biases (writer biases, injection slots), not ignorable."""
    return [
        t
        for t in rep.tensors
        if t.role.endswith("_bias")
        and t.delta is not None
        and not t.ignorable
        and t.status in ("changed", "added")
    ]


def _cos_to(basis: np.ndarray | None, v: np.ndarray) -> float | None:
    """Cosine of v to the --direction (norm of its projection on their span when several are given)."""
    if basis is None or v.shape[0] != basis.shape[0]:
        return None
    proj = basis.T @ (v / np.linalg.norm(v))
    return float(proj[0]) if basis.shape[1] == 1 else float(np.linalg.norm(proj))


def _shared(rep: DiffReport, base: Model, basis, gain) -> None:
    """The common direction of the rank-1 writer changes, and each one's cosine to it."""
    rank1 = [(t, t.recovered) for t in _writer_weights(rep) if t.recovered is not None]
    if not rank1:
        return
    ref = basis[:, 0] if basis is not None else None
    s, cos = shared_direction(
        np.stack([r for _, r in rank1]), np.array([t.top1_share for t, _ in rank1]), ref
    )
    for (t, r), c in zip(rank1, cos):
        t.cos_shared = float(c)
        cos_direction = _cos_to(basis, r)
        if cos_direction is not None:
            t.cos_direction = abs(cos_direction)
    rep.direction = s
    rep.shared = {
        "tensors": len(rank1),
        "cos_min": float(cos.min()),
        "cos_median": float(np.median(cos)),
        "cos_to_direction": _cos_to(basis, s),
    }
    for t in _biases(rep):  # an ablation projects writer biases too: Δb along u, and uᵀb shrinks
        assert t.delta is not None  # _biases keeps only tensors with a change
        g = _post_norm_gain(base, t.target, gain)
        u = s if g is None else (g * s) / np.linalg.norm(g * s)
        after = abs(u @ t.values) if t.values is not None else 0.0
        before = abs(u @ (t.values - t.delta)) if t.values is not None else 0.0
        t.cos_shared = float(abs(u @ t.delta) / np.linalg.norm(t.delta)) if t.delta.any() else None
        t.leakage = after / before if before > 0 else None
        along = off_direction_energy(t.delta, u) <= max((1 - ENERGY) * float(t.delta @ t.delta), t.floor)
        if along and after <= REMOVED * before + math.sqrt(t.floor):
            t.note = "projected along the shared direction"


def _verdict(rep: DiffReport, basis) -> None:
    relevant = [t for t in rep.tensors if not t.ignorable]
    weights, biases = _writer_weights(rep), _biases(rep)
    others = [t for t in relevant if t not in weights and t not in biases]
    unexpected = [k for k, v in rep.config_changes.items() if not v["expected_for_an_edit"]]
    if unexpected:
        rep.notes.append(f"config.json changes beyond edit flags: {', '.join(unexpected)}")
    if not relevant and not unexpected:
        rep.verdict = "unchanged"
        if rep.tensors or rep.config_changes:
            rep.notes.append(
                "only zero biases, untied copies or edit flags were added: the model computes the same"
            )
        return
    rep.verdict = "other changes"
    if others or unexpected:
        return
    if weights:
        projected = all(t.note == "projected along the shared direction" for t in biases)
        if (
            rep.shared
            and projected
            and all(
                t.rank99 == 1
                and t.cos_shared is not None
                and t.cos_shared >= CONSISTENT
                and t.leakage is not None
                and t.leakage <= REMOVED
                for t in weights
            )
        ):
            n = len(weights)
            rep.verdict = (
                f"rank-1 directional ablation along one shared direction ({n} tensor{'s' if n != 1 else ''})"
            )
        return
    layers = {t.layer for t in biases}
    if biases and len(layers) == 1 and None not in layers:
        total = np.sum([t.delta for t in biases if t.delta is not None], axis=0)  # all have one
        layer = layers.pop()
        rep.verdict = f"bias injection at layer {layer}"
        rep.direction = total / np.linalg.norm(total) if total.any() else None
        for t in biases:
            t.cos_direction = _cos_to(basis, t.delta) if t.delta is not None and t.delta.any() else None
        rep.injection = {
            "layer": layer,
            "tensors": [t.name for t in biases],
            "norm": float(np.linalg.norm(total)),
            "cos_to_direction": _cos_to(basis, total) if total.any() else None,
        }


# --- command line -------------------------------------------------------------------------------


def _fmt(v, spec=".3g") -> str:
    return "—" if v is None else format(v, spec)


def print_report(rep: DiffReport, out, max_rows: int = 60) -> None:
    from rich.table import Table

    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_row("base", rep.base)
    head.add_row("candidate", rep.candidate)
    head.add_row("model_type", f"{rep.model_type} ({rep.table or 'no architecture table'})")
    c = rep.counts
    head.add_row(
        "tensors",
        f"{c['base_tensors']} in base: {c['identical']} identical, {c['changed']} changed, {c['added']} "
        f"added, {c['removed']} removed ({rep.seconds:.2f} s)",
    )
    out.print(head)
    if rep.tensors:
        t = Table(title="tensors that differ", title_justify="left")
        for col in (
            "tensor",
            "role",
            "layer",
            "status",
            "|Δ|",
            "|Δ|/|W|",
            "rank99",
            "σ₁² share",
            "leakage",
            "cos shared",
            "cos -d",
        ):
            t.add_column(
                col, justify="left" if col in ("tensor", "role", "status") else "right", overflow="fold"
            )
        for td in rep.tensors[:max_rows]:
            rank = str(td.rank99) if td.rank99 else (f">{td.rank99_above}" if td.rank99_above else "—")
            status = td.status + (f" ({td.note})" if td.note else "")
            t.add_row(
                td.name,
                td.role,
                _fmt(td.layer, "d"),
                status,
                _fmt(td.delta_norm),
                _fmt(td.relative_change),
                rank,
                _fmt(td.top1_share, ".4f"),
                _fmt(td.leakage, ".2e"),
                _fmt(td.cos_shared, ".6f"),
                _fmt(td.cos_direction, ".6f"),
            )
        out.print(t)
        if len(rep.tensors) > max_rows:
            out.print(f"… and {len(rep.tensors) - max_rows} more (--json lists every one)")
    if rep.shared:
        s = rep.shared
        line = (
            f"shared direction: {s['tensors']} rank-1 tensors, cosine to it min {s['cos_min']:.6f}, "
            f"median {s['cos_median']:.6f}"
        )
        if s["cos_to_direction"] is not None:
            line += f"; cosine to --direction {s['cos_to_direction']:.6f}"
        out.print(line, highlight=False)
    if rep.injection:
        i = rep.injection
        line = f"injected vector at layer {i['layer']} ({', '.join(i['tensors'])}): norm {i['norm']:.4g}"
        if i["cos_to_direction"] is not None:
            line += f", cosine to --direction {i['cos_to_direction']:.6f}"
        out.print(line, highlight=False)
    for k, v in rep.config_changes.items():
        out.print(
            f"config.json: {k}: {json.dumps(v['base'])} → {json.dumps(v['candidate'])}"
            + (" (an edit flag)" if v["expected_for_an_edit"] else ""),
            highlight=False,
        )
    for n in rep.notes:
        out.print(f"[yellow]note:[/] {n}", highlight=False)
    out.print(f"verdict: {rep.verdict}", highlight=False, soft_wrap=True)
