"""`patcher audit MODEL`: signs of an edit in a checkpoint alone, without its base.

Weight orthogonalization makes every edited residual writer write less (strength s: (1 − s)²) of r̂.
The checkpoint is streamed once, writer by writer (column blocks of [d_model, in] weights, row blocks of
[in, d_model] ones, FP8 dequantised per tile): each group — one layer's attention output, one layer's
MLP output with all its experts, the embeddings — accumulates its Gram Σ W Wᵀ, normalised to mean
eigenvalue 1, summarised by the low end of its spectrum (kernels/annihilation.py) and kept in a
temporary file (GramStore), so memory is a few d_model² buffers whatever the model size. Three signals,
calibrated on a real model and its clean-but-changed controls, give one of three verdicts (abliterated /
inconclusive / no sign): a direction several groups write no more of than their dtype's storage floor;
one direction every layer writes less of, attention and MLP agreeing; per-layer directions moving
smoothly across layers (heretic's kernels). A second signature covers baked bias injection: a writer
bias alone among zero siblings, an outlier norm, or biases of different layers sharing one direction.
"""

import math
import tempfile
import time
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
from patcher_kernels import annihilation as an
from patcher_kernels.codecs import decode
from patcher_kernels.fp8 import dequantize_blocks
from patcher_kernels.lowrank import MANTISSA_BITS

from patcher.edit.plan import resolved_table
from patcher.errors import PatcherError
from patcher.model.architectures import POST_NORM_GAINS, Resolved, Target
from patcher.model.opened import Model

BLOCK_BYTES = 32 << 20  # float32 bytes of one streamed block
SAMPLE = 4  # written vectors read per group, × d_model (the rest adds cost, not information)
NULL_SAMPLES = 24  # random-orientation models in the null
MARGIN = 2.0  # signal 4: observed evidence must exceed the null's best by this factor …
MIN_GROUPS = 3  # … and at least this many groups must annihilate (signal 1: be at the floor along) it
# Thresholds measured on SmolLM2-135M-Instruct (bf16) and its clean-but-changed controls (docs/audit.md
# "Measured on a real model" gives the confusion table and the false-positive rate at each threshold)
FLOOR_ABS, FLOOR_TIMES, FLOOR_USABLE = 1e-3, 100.0, 1e-2  # signal 1: the storage floor
SHARED_MIN_LAYERS = 8  # signals 2-3 need this many layers
ISOLATION = {"abliterated": 0.6, "inconclusive": 0.85}  # signal 2: clean 0.94-0.97
AGREE = 0.5  # signal 2: geometric-mean energy every role must stay below along the direction
LINK = 0.4  # signal 3: |cos| between neighbouring layers' directions that continues a track
CLEAN_DEPTH = 1.7  # signal 3: decades below typical that clean layers reach (clean max 1.55)
TRACK_SCORE = {"abliterated": 2.0, "inconclusive": 0.5}
NAMED_DEPTH = 1.8  # signal 3: layers named (and their directions saved) only where the edit outweighs the
# natural low directions (at 1.7 the per-layer direction still mixes with them: |cos| 0.93)
FP8_TILE = 128
BIAS_OUTLIER = 4.0  # a bias this many times the median norm of its role stands out
BIAS_SHARED_COS = 0.9  # biases of different layers this aligned share one direction


@dataclass
class Group:
    label: str
    role: str
    layer: int | None
    tensors: list[str]
    dtype: str
    spectrum: an.Spectrum
    slot: int  # its Gram in the GramStore


@dataclass
class AuditReport:
    model: str
    model_type: str | None
    groups: list[dict] = field(default_factory=list)
    verdict: str = ""
    level: str = "no sign"  # abliterated / inconclusive / no sign
    edited: bool = False  # level == abliterated
    directions: list[dict] = field(default_factory=list)  # per found direction: evidence, profile
    signals: list[dict] = field(default_factory=list)  # every signal measured, with its verdict
    layer_profile: list[dict] = field(default_factory=list)  # per layer, for per-layer directions
    biases: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    direction: np.ndarray | None = None  # [d] or [k, d]: what was recovered

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("direction", "signals")}
        out["signals"] = [
            {k: v for k, v in s.items() if k not in ("direction", "profile", "layer_profile")}
            for s in self.signals
        ]
        out["direction"] = None if self.direction is None else np.asarray(self.direction).tolist()
        return out


# --- streaming one writer into a Gram --------------------------------------------------------------


def _vectors(ck: Model, t: Target, d_model: int) -> int:
    """How many written vectors (columns in residual orientation) a writer tensor holds."""
    return ck.info(t.weight).numel // d_model


def _blocks(ck: Model, t: Target, d_model: int, share: float = 1.0):
    """Float32 blocks M_b [d_model, c] with Σ M_b M_bᵀ = W Wᵀ in residual orientation, over a central
    window holding `share` of each matrix's written vectors (an ablated W has every column ⟂ r̂, so
    any subset keeps the fingerprint exactly; a clean spectrum needs only a few × d_model of them)."""
    info = ck.info(t.weight)
    raw = ck.array(t.weight)
    scale_name = ck.fp8_scale(t.weight)
    scale = ck.array(scale_name).astype(np.float32) if scale_name else None
    mats = [raw] if raw.ndim == 2 else [raw[x] for x in range(raw.shape[t.expert_axis])]
    axis = t.residual_axis if raw.ndim == 2 else t.residual_axis - 1
    for m in mats:
        if m.shape[axis] != d_model:
            raise PatcherError(ck.path, f"{t.weight}: shape {info.shape} has no residual axis of {d_model}")
        full = m.shape[1 - axis]
        length = max(1, min(full, math.ceil(full * share)))
        lo = (full - length) // 2
        if scale is not None:  # FP8: whole scale tiles
            lo -= lo % FP8_TILE
        step = max(1, BLOCK_BYTES // (4 * d_model))
        if scale is not None:
            step = max(FP8_TILE, step - step % FP8_TILE)
        for s in range(lo, lo + length, step):
            e = min(lo + length, s + step)
            part = m[:, s:e] if axis == 0 else m[s:e, :]
            if scale is not None:
                tiles = (
                    scale[:, s // FP8_TILE : -(-e // FP8_TILE)]
                    if axis == 0
                    else scale[s // FP8_TILE : -(-e // FP8_TILE), :]
                )
                block = dequantize_blocks(np.ascontiguousarray(part), tiles, FP8_TILE)
            else:
                block = decode(np.ascontiguousarray(part))
            yield block if axis == 0 else block.T


def _post_norm_gain(ck: Model, res: Resolved, t: Target) -> np.ndarray | None:
    if not t.post_norm or res.arch.post_norm_gain is None or t.post_norm not in ck.tensors:
        return None
    return POST_NORM_GAINS[res.arch.post_norm_gain] + decode(ck.array(t.post_norm)).astype(np.float64)


class GramStore:
    """Every group's normalised Gram, float64, in an unnamed temporary file: the scan needs exact
    energies of every group along directions only known at the end, and memory must not grow with
    the number of layers (one d_model² buffer is in memory at a time)."""

    def __init__(self, d: int):
        self.d, self.count = d, 0
        self.file = tempfile.TemporaryFile(prefix="patcher-audit-")

    def add(self, gram: np.ndarray) -> int:
        self.file.seek(self.count * self.d * self.d * 8)
        self.file.write(np.ascontiguousarray(gram, dtype=np.float64).tobytes())
        self.count += 1
        return self.count - 1

    def get(self, i: int) -> np.ndarray:
        n = self.d * self.d * 8
        self.file.seek(i * n)
        return np.frombuffer(self.file.read(n), dtype=np.float64).reshape(self.d, self.d)

    def close(self) -> None:
        self.file.close()


def _groups(ck: Model, res: Resolved, store: GramStore, progress=None, exact: bool = False):
    """Writer groups with their spectra (Grams kept in `store`), and the bytes read."""
    d = res.d_model
    groups, read = [], 0
    key = lambda t: (-1 if t.layer is None else t.layer, t.role)  # noqa: E731
    for (_, role), run in groupby(sorted(res.targets, key=key), key=key):
        members = list(run)
        gram = np.zeros((d, d))
        vectors = sum(_vectors(ck, t, d) for t in members)
        share = 1.0 if exact else min(1.0, SAMPLE * d / vectors)
        for t in members:
            for block in _blocks(ck, t, d, share):
                gram += (block @ block.T).astype(np.float64)
            nbytes = math.ceil(ck.info(t.weight).nbytes * share)
            read += nbytes
            ck.release(t.weight)
            if progress:
                progress(nbytes)
        trace = np.trace(gram)
        if not trace > 0:
            continue  # an all-zero group writes nothing: nothing to learn from it
        gram *= d / trace  # mean eigenvalue 1
        t0 = members[0]
        label = "embeddings" if t0.layer is None else f"layer {t0.layer} {role}"
        dtype = ck.info(t0.weight).dtype
        floor = storage_floor(dtype)
        groups.append(
            Group(
                label,
                role,
                t0.layer,
                [t.weight for t in members],
                dtype,
                an.summarize(gram, gain=_post_norm_gain(ck, res, t0), floor=floor),
                store.add(gram),
            )
        )
    return groups, read


# --- bias signature -------------------------------------------------------------------------------


def _bias_signs(ck: Model, res: Resolved) -> list[dict]:
    found = []
    by_role: dict[str, list[tuple[Target, np.ndarray]]] = {}
    for t in res.targets:
        if t.bias and t.bias in ck.tensors:
            by_role.setdefault(t.role, []).append((t, decode(ck.array(t.bias)).astype(np.float64).ravel()))
    for role, items in by_role.items():
        norms = np.array([np.linalg.norm(b) for _, b in items])
        nonzero = norms > 0
        if nonzero.any() and nonzero.sum() <= max(1, len(items) // 4) and len(items) > 1:
            for (t, _b), n in zip(items, norms):
                if n > 0:
                    found.append(
                        {
                            "kind": "lone bias",
                            "tensor": t.bias,
                            "layer": t.layer,
                            "norm": float(n),
                            "why": f"{int((~nonzero).sum())} of {len(items)} {role} biases are exactly zero",
                        }
                    )
            continue
        med = float(np.median(norms[nonzero])) if nonzero.any() else 0.0
        for (t, _b), n in zip(items, norms):
            if med > 0 and n > BIAS_OUTLIER * med:
                found.append(
                    {
                        "kind": "outlier bias",
                        "tensor": t.bias,
                        "layer": t.layer,
                        "norm": float(n),
                        "why": f"{n / med:.1f}× the median {role} bias norm",
                    }
                )
    flat = [(t, b) for items in by_role.values() for t, b in items if np.linalg.norm(b) > 0]
    unit = [b / np.linalg.norm(b) for _, b in flat]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            if flat[i][0].layer != flat[j][0].layer and abs(unit[i] @ unit[j]) > BIAS_SHARED_COS:
                found.append(
                    {
                        "kind": "shared bias direction",
                        "tensor": f"{flat[i][0].bias}, {flat[j][0].bias}",
                        "layer": flat[j][0].layer,
                        "norm": float(np.linalg.norm(flat[j][1])),
                        "why": f"|cos| {abs(unit[i] @ unit[j]):.3f} between layers "
                        f"{flat[i][0].layer} and {flat[j][0].layer}",
                    }
                )
    return found


# --- the scan --------------------------------------------------------------------------------------


# GGML block types: effective bits of the rounding relative to the block's largest value (so the error
# of a typical weight is ~3× larger than a float type's with the same bits: the 9 in storage_floor)
QUANT_BITS = {
    "Q8_0": 7,
    "Q8_1": 7,
    "Q8_K": 7,
    "Q6_K": 5,
    "Q5_0": 4,
    "Q5_1": 4,
    "Q5_K": 4,
    "Q4_0": 3,
    "Q4_1": 3,
    "Q4_K": 3,
    "IQ4_NL": 3,
    "IQ4_XS": 3,
    "Q3_K": 2,
    "IQ3_S": 2,
    "IQ3_XXS": 2,
    "Q2_K": 1,
    "IQ2_XXS": 1,
    "IQ2_XS": 1,
    "IQ2_S": 1,
}


def storage_floor(dtype: str) -> float:
    """Energy along any direction that storage rounding alone leaves, in mean-eigenvalue units (an
    exact ablation stored in this dtype keeps about this much along r̂): uniform rounding of half an
    ulp, 2^-bits of each value."""
    bits = MANTISSA_BITS.get(dtype)
    if bits is not None:
        return 4.0 ** (-bits) / 12.0
    return 9 * 4.0 ** (-QUANT_BITS.get(dtype, 1)) / 12.0


def floor_level(dtype: str) -> float | None:
    """Energy at or below which a group counts as 'at the storage floor' along a direction (strength
    ≥ 0.97 in float types), or None where the dtype's own rounding reaches the energies real models
    have naturally (≥ 0.01: 4-6-bit GGUF types): there the floor says nothing."""
    level = max(FLOOR_ABS, FLOOR_TIMES * storage_floor(dtype))
    return level if level <= FLOOR_USABLE else None


def _energies(groups: list[Group], store: GramStore, v: np.ndarray) -> np.ndarray:
    """Exact energy of every group along each residual direction v [d, m] → [groups, m]."""
    v = np.asarray(v, dtype=np.float64).reshape(store.d, -1)
    out = np.empty((len(groups), v.shape[1]))
    for i, g in enumerate(groups):
        t = an.seen_by(g.spectrum, v)
        out[i] = np.maximum(np.einsum("dm,dm->m", t, store.get(g.slot) @ t), g.spectrum.floor)
    return out


def _profile(groups: list[Group], e: np.ndarray) -> list[dict]:
    return [
        {
            "group": g.label,
            "layer": g.layer,
            "role": g.role,
            "energy": float(ei),
            "annihilates": bool(ei < an.TAU),
            "at_floor": bool(floor_level(g.dtype) is not None and ei <= floor_level(g.dtype)),
            "strength_estimate": float(an.strength(np.array([ei]))[0]),
            "storage_floor": storage_floor(g.dtype),
        }
        for g, ei in zip(groups, e)
    ]


def _span(layers: list[int], embeddings: bool = False) -> str:
    layers = sorted(set(layers))
    parts, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            parts.append(f"{start}" if start == l else f"{start}-{l}")
            start = None
    named = ["embeddings"] if embeddings else []
    return ", ".join(named + ([f"layers {', '.join(parts)}"] if parts else []))


def _where(rows: list[dict], key: str = "annihilates") -> str:
    return _span(
        [r["layer"] for r in rows if r[key] and r["layer"] is not None],
        any(r[key] and r["layer"] is None for r in rows),
    )


def _rate(value: float, thresholds: dict, below: bool = True) -> str:
    """The verdict a measured value earns against {verdict: threshold} (abliterated first)."""
    for level in ("abliterated", "inconclusive"):
        if (value < thresholds[level]) if below else (value >= thresholds[level]):
            return level
    return "no sign"


def _shared_at_floor(groups, store, max_rank: int) -> list[dict]:
    """Signal 1: directions that ≥ MIN_GROUPS groups (besides the one proposing it) write no more of
    than their storage floor. Natural low directions of real models sit at 0.01-0.2, never there.
    Further directions are reported only if they pass the same test (a real rank-k edit)."""
    spectra = [g.spectrum for g in groups]
    level = np.array([floor_level(g.dtype) or 0.0 for g in groups])[:, None]
    cands, source = an.candidates(spectra)
    found = np.zeros((store.d, 0))
    out: list[dict] = []
    for _ in range(max_rank):
        v = cands - found @ (found.T @ cands) if found.shape[1] else cands
        keep = np.linalg.norm(v, axis=0) > 0.5
        if not keep.any():
            break
        v, src = an._unit_cols(v[:, keep]), source[keep]
        e = _energies(groups, store, v)
        hits = e <= level
        hits[src, np.arange(len(src))] = False
        n = hits.sum(axis=0)
        best = int(np.lexsort((an.evidence(e, src), n))[-1])
        if n[best] < MIN_GROUPS - 1:  # the proposing group itself makes the third
            if not out:  # what the best candidate reached, for the report
                out.append(
                    {
                        "signal": "shared direction at the storage floor",
                        "verdict": "no sign",
                        "groups_at_floor": int(n[best]),
                        "direction": None,
                    }
                )
            break
        u = an.refine(spectra, v[:, best], exclude=found if found.shape[1] else None)
        e_u = _energies(groups, store, u)[:, 0]
        rows = _profile(groups, e_u)
        at_floor = sum(r["at_floor"] for r in rows)
        if at_floor < MIN_GROUPS:
            if not out:
                out.append(
                    {
                        "signal": "shared direction at the storage floor",
                        "verdict": "no sign",
                        "groups_at_floor": at_floor,
                        "direction": None,
                    }
                )
            break
        out.append(
            {
                "signal": "shared direction at the storage floor",
                "verdict": "abliterated",
                "groups_at_floor": at_floor,
                "groups_annihilating": sum(r["annihilates"] for r in rows),
                "evidence": float(an.evidence(e_u[:, None])[0]),
                "where": _where(rows, "at_floor"),
                "profile": rows,
                "direction": u,
            }
        )
        found = np.concatenate([found, u[:, None]], axis=1)
    return out


def _isolated(groups, store) -> dict | None:
    """Signal 2: one direction shared by the writers of every layer at a reduced energy — the smallest
    eigenvalue of the mean layer Gram standing below the rest (a partial ablation of strength s
    leaves (1 − s)² of it) with attention and MLP writers agreeing (a natural low direction of a
    real model is the MLP writers' alone)."""
    layer_groups = [g for g in groups if g.layer is not None]
    if len({g.layer for g in layer_groups}) < SHARED_MIN_LAYERS:
        return None
    mean = sum(store.get(g.slot) for g in layer_groups) / len(layer_groups)
    ratio, v, _ = an.isolation(mean)
    e = _energies(groups, store, v)[:, 0]
    by_role: dict[str, list[float]] = {}
    for g, ei in zip(groups, e):
        if g.layer is not None:
            by_role.setdefault(g.role, []).append(ei)
    geo = {r: float(np.exp(np.mean(np.log(x)))) for r, x in by_role.items()}
    agree = all(x < AGREE for x in geo.values())
    verdict = _rate(ratio, ISOLATION) if agree else "no sign"
    rows = _profile(groups, e)
    return {
        "signal": "one direction every layer writes less of",
        "verdict": verdict,
        "isolation": ratio,
        "thresholds": ISOLATION,
        "geomean_energy_by_role": geo,
        "roles_agree": agree,
        "groups_annihilating": sum(r["annihilates"] for r in rows),
        "where": _where(rows),
        "profile": rows,
        "direction": v,
    }


def _layer_track(groups, store, n_layers: int) -> dict | None:
    """Signal 3: per-layer directions (heretic's per-layer difference of means with a strength kernel)
    — in each layer the direction its attention and MLP writers together write least, and the runs of
    layers along which it moves smoothly. A run's score sums how far each layer's depth (decades below
    a typical direction, geometric mean of the two roles) exceeds what clean layers reach."""
    pairs: dict[int, dict[str, Group]] = {}
    for g in groups:
        if g.layer is not None and g.role in ("attn_out", "mlp_out"):
            pairs.setdefault(g.layer, {})[g.role] = g
    layers = [l for l in sorted(pairs) if len(pairs[l]) == 2]
    if len(layers) < SHARED_MIN_LAYERS:
        return None
    dirs, e = an.layer_directions(
        [(store.get(pairs[l]["attn_out"].slot), store.get(pairs[l]["mlp_out"].slot)) for l in layers]
    )
    depth = -0.5 * np.log10(e[:, 0] * e[:, 1])
    runs = an.tracks(dirs, LINK)
    scores = [float(np.maximum(0.0, depth[a:b] - CLEAN_DEPTH).sum()) for a, b in runs]
    best = int(np.argmax(scores))
    a, b = runs[best]
    edited = [i for i in range(a, b) if depth[i] > NAMED_DEPTH]
    direction = np.zeros((n_layers, store.d))
    for i in edited:  # each role weighted by how little it writes: the deeper one pins the direction
        ga, gm = store.get(pairs[layers[i]]["attn_out"].slot), store.get(pairs[layers[i]]["mlp_out"].slot)
        u = np.linalg.eigh(ga / e[i, 0] + gm / e[i, 1])[1][:, 0]
        direction[layers[i]] = u * np.sign(u @ dirs[i] or 1.0)
    profile = [
        {
            "layer": layers[i],
            "energy_attn": float(e[i, 0]),
            "energy_mlp": float(e[i, 1]),
            "depth": float(depth[i]),
            "in_track": a <= i < b,
            "edited": i in edited,
            "link_to_previous": float(abs(dirs[i] @ dirs[i - 1])) if i else None,
            "strength_attn": float(an.strength(e[i, :1])[0]),
            "strength_mlp": float(an.strength(e[i, 1:])[0]),
        }
        for i in range(len(layers))
    ]
    return {
        "signal": "per-layer directions moving smoothly across layers",
        "verdict": _rate(scores[best], TRACK_SCORE, below=False),
        "score": scores[best],
        "thresholds": TRACK_SCORE,
        "clean_depth": CLEAN_DEPTH,
        "where": _span([layers[i] for i in edited]),
        "track": [layers[a], layers[b - 1]],
        "layer_profile": profile,
        "direction": direction if edited else None,
        "max_depth": float(depth.max()),
    }


def _graded(groups, store, spectra) -> dict | None:
    """Signal 4 (small models, where signals 2-3 have too few layers): a direction the groups'
    low spectra share beyond a random-orientation null of the same spectra (graded, any strength),
    attention and MLP writers agreeing, and at least half the layer groups annihilating it."""
    null = an.null_evidence(spectra, NULL_SAMPLES)
    threshold = MARGIN * float(null.max()) + 0.5
    v, ev = an.best_direction(spectra)
    if ev <= threshold:
        return None
    v = an.refine(spectra, v)
    e = _energies(groups, store, v)[:, 0]
    rows = _profile(groups, e)
    hit = [r for r in rows if r["annihilates"]]
    layer_groups = [g for g in groups if g.layer is not None]
    roles = {g.role for g in layer_groups}
    agree = {r["role"] for r in hit if r["layer"] is not None} >= roles or len(roles) == 1
    share = sum(r["layer"] is not None for r in hit) / max(len(layer_groups), 1)
    verdict = (
        "abliterated"
        if agree and share >= 0.5 and len(hit) >= MIN_GROUPS
        else "inconclusive"
        if agree and len(hit) >= MIN_GROUPS
        else "no sign"
    )
    ev_v = float(an.evidence(e[:, None])[0])
    return {
        "signal": "direction shared beyond the random-orientation null",
        "verdict": verdict,
        "evidence": ev_v,
        "evidence_over_null": ev_v / max(float(null.max()), 1e-9),
        "null": {"samples": NULL_SAMPLES, "best_evidence": float(null.max()), "threshold": threshold},
        "groups_annihilating": len(hit),
        "where": _where(rows),
        "profile": rows,
        "direction": v,
    }


LEVELS = ("abliterated", "inconclusive", "no sign")


def audit(
    model,
    arch_table=None,
    resolved: Resolved | None = None,
    max_rank: int = 4,
    progress=None,
    exact: bool = False,
) -> AuditReport:
    """Scan MODEL (a folder or file) for directions its writers cannot write, and for baked biases."""
    t0 = time.perf_counter()
    with Model.open(model, arch_table, require_arch=False, arch_optional=True) as ck:
        if resolved is None:
            if not ck.config and arch_table is None:
                raise PatcherError(model, "auditing needs a model folder with config.json")
            # without a table, opening it as an edit would name the unsupported model_type
            resolved = resolved_table(ck if ck.resolved else Model(ck.storage))
        rep = AuditReport(str(ck.path), ck.model_type)
        store = GramStore(resolved.d_model)
        try:
            groups, rep.bytes_read = _groups(ck, resolved, store, progress, exact)
            rep.biases = _bias_signs(ck, resolved)
            if len(groups) < 2:
                raise PatcherError(model, "fewer than two writer groups: nothing to compare")
            _scan(rep, groups, store, max_rank, resolved.n_layers)
        finally:
            store.close()
    rep.seconds = time.perf_counter() - t0
    return rep


def _scan(rep: AuditReport, groups: list[Group], store: GramStore, max_rank: int, n_layers: int) -> None:
    spectra = [g.spectrum for g in groups]
    rep.groups = [
        {
            "group": g.label,
            "tensors": len(g.tensors),
            "dtype": g.dtype,
            "storage_floor": storage_floor(g.dtype),
            "floor_level": floor_level(g.dtype),
            "low_spectrum": [float(x) for x in g.spectrum.low],
            "rest_mean": g.spectrum.rest,
        }
        for g in groups
    ]
    if any(floor_level(g.dtype) is None for g in groups):
        rep.notes.append(
            "some writers are stored in a type whose rounding reaches the energies clean "
            "models have (4-6-bit GGUF): the storage-floor signal is off for them"
        )
    measured = _shared_at_floor(groups, store, max_rank)
    shared = [s for s in measured if s["verdict"] != "no sign"]
    signals = [s for s in (_isolated(groups, store), _layer_track(groups, store, n_layers)) if s]
    if not shared and not signals:  # too few layers for signals 2-3 (and for a real-model calibration)
        graded = _graded(groups, store, spectra)
        signals += [graded] if graded else []
    if shared:  # one edit, one verdict: signals 2-4 would describe the same direction again
        signals = [
            s
            for s in signals
            if s["signal"].startswith("per-layer") and _varies(s["direction"], shared[0]["direction"])
        ]
    rep.signals = (shared or measured) + signals
    decided = [s for s in rep.signals if s["verdict"] != "no sign"]
    decided.sort(key=lambda s: LEVELS.index(s["verdict"]))
    rep.level = decided[0]["verdict"] if decided else "no sign"
    if rep.biases and rep.level != "abliterated":
        rep.level = "abliterated"
    rep.edited = rep.level == "abliterated"
    if shared:
        rep.directions = [{k: v for k, v in s.items() if k != "direction"} for s in shared]
        rep.direction = (
            shared[0]["direction"] if len(shared) == 1 else np.stack([s["direction"] for s in shared])
        )
    elif decided:
        first = decided[0]
        rep.directions = [{k: v for k, v in first.items() if k not in ("direction", "layer_profile")}]
        rep.direction = first["direction"]
        if "layer_profile" in first:
            rep.layer_profile = first["layer_profile"]
    rep.verdict = _verdict(rep, len(groups), decided)


def _varies(per_layer: np.ndarray | None, v: np.ndarray) -> bool:
    if per_layer is None:
        return False
    rows = per_layer[np.linalg.norm(per_layer, axis=1) > 0]
    return bool(len(rows)) and float(np.median(np.abs(rows @ v))) < 0.9


def _verdict(rep: AuditReport, n_groups: int, decided: list[dict]) -> str:
    parts = []
    for s in decided[:1]:
        if s["signal"].startswith("shared direction"):
            kind = (
                "directional ablation"
                if len(rep.directions) == 1
                else f"rank-{len(rep.directions)} subspace ablation"
            )
            strengths = [r["strength_estimate"] for r in s["profile"] if r["annihilates"]]
            parts.append(
                f"abliterated ({kind}): {s['groups_at_floor']} of {n_groups} writer groups "
                f"({s['where']}) write no more of one shared direction than their storage floor; "
                f"strength ≈ {np.median(strengths):.2f}"
            )
        elif s["signal"].startswith("one direction"):
            strengths = [r["strength_estimate"] for r in s["profile"] if r["layer"] is not None]
            parts.append(
                f"{s['verdict']}: every layer's writers write less of one direction (its energy "
                f"{s['isolation']:.2f}× the next lowest; attention and MLP agree); strength ≈ "
                f"{np.median(strengths):.2f}"
            )
        elif s["signal"].startswith("per-layer"):
            prof = [r for r in rep.layer_profile if r["edited"]]
            kernel = ", ".join(f"{r['layer']}:{max(r['strength_attn'], r['strength_mlp']):.2f}" for r in prof)
            parts.append(
                f"{s['verdict']}: per-layer directions moving smoothly across {s['where']} "
                f"(score {s['score']:.1f}); strength by layer {kernel}"
            )
        else:
            parts.append(
                f"{s['verdict']}: {s['groups_annihilating']} of {n_groups} writer groups "
                f"({s['where']}) share a low direction, evidence {s['evidence_over_null']:.0f}× "
                "the random-orientation null's best"
            )
    for b in rep.biases[:1]:
        layer = "" if b["layer"] is None else f" at layer {b['layer']}"
        parts.append(f"signs of bias injection{layer} ({b['kind']}: {b['why']})")
    if not parts:
        return (
            "no sign of an edit (no direction shared by the writers at their storage floor, none "
            "every layer writes less of, no smooth per-layer track, no suspicious bias)"
        )
    return "; ".join(parts)


def _signal_line(s: dict) -> str:
    measured = {
        "isolation": "isolation {:.2f}",
        "score": "score {:.2f}",
        "groups_at_floor": "{} groups at floor",
        "evidence_over_null": "evidence {:.0f}× null",
    }
    values = [f.format(s[k]) for k, f in measured.items() if k in s]
    where = f" ({s['where']})" if s.get("where") and s["verdict"] != "no sign" else ""
    return f"{s['signal']}: {', '.join(values)} → {s['verdict']}{where}"


def print_report(rep: AuditReport, out, max_rows: int = 40) -> None:
    from rich.table import Table

    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_row("model", rep.model)
    head.add_row("model_type", str(rep.model_type))
    head.add_row(
        "writer groups", f"{len(rep.groups)} ({rep.bytes_read / 2**20:.1f} MiB read in {rep.seconds:.2f} s)"
    )
    for s in rep.signals:
        head.add_row("signal", _signal_line(s))
    out.print(head)
    for i, d in enumerate(rep.directions if not rep.layer_profile else []):
        t = Table(
            title=f"direction {i + 1}: {d['groups_annihilating']} groups annihilate it", title_justify="left"
        )
        for c in ("group", "energy along it (typical 1)", "at storage floor", "strength ≈"):
            t.add_column(c, justify="left" if c == "group" else "right")
        for r in d["profile"][:max_rows]:
            t.add_row(
                r["group"],
                f"{r['energy']:.2e}",
                "yes" if r["at_floor"] else "",
                f"{r['strength_estimate']:.2f}" if r["annihilates"] else "",
            )
        out.print(t)
    if rep.layer_profile:
        t = Table(title="per-layer directions (the layer profile; * named)", title_justify="left")
        for c in ("layer", "attn energy", "mlp energy", "|cos| to previous", "strength attn", "strength mlp"):
            t.add_column(c, justify="right")
        for r in rep.layer_profile[:max_rows]:
            link = "" if r["link_to_previous"] is None else f"{r['link_to_previous']:.2f}"
            # strength only where the edit outweighs the natural minima (elsewhere 1 − √energy would
            # read those minima as an edit)
            strengths = [f"{r[k]:.2f}" if r["edited"] else "" for k in ("strength_attn", "strength_mlp")]
            t.add_row(
                str(r["layer"]) + (" *" if r["edited"] else ""),
                f"{r['energy_attn']:.2e}",
                f"{r['energy_mlp']:.2e}",
                link,
                *strengths,
            )
        out.print(t)
    for b in rep.biases:
        out.print(
            f"[yellow]bias:[/] {b['kind']}: {b['tensor']} (norm {b['norm']:.4g}): {b['why']}", highlight=False
        )
    for n in rep.notes:
        out.print(f"[yellow]note:[/] {n}", highlight=False)
    out.print(f"verdict: {rep.verdict}", highlight=False, soft_wrap=True)


def plot(rep: AuditReport, path) -> None:
    """SVG, one point per writer group (log energy, a typical direction = 1): each group's smallest
    eigenvalue, and the energy it puts along each recovered direction."""
    from xml.sax.saxutils import escape

    from patcher.io.paths import SVG_MARK

    W, H, pad = 760, 420, 56
    series = [("smallest eigenvalue of the group", "#1f77b4", [g["low_spectrum"][0] for g in rep.groups])]
    colors = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    for i, d in enumerate(d for d in rep.directions if "profile" in d):
        series.append(
            (f"energy along recovered direction {i + 1}", colors[i % 4], [r["energy"] for r in d["profile"]])
        )
    logs = [np.log10(np.maximum(np.array(v, dtype=float), 1e-12)) for _, _, v in series]
    lo = math.floor(min(min(x.min() for x in logs), -1))
    hi = 1
    n = len(rep.groups)
    y = lambda v: H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)  # noqa: E731
    x = lambda i: pad + i / max(n - 1, 1) * (W - 2 * pad)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        f'font-size="12">',
        SVG_MARK,
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="13">{escape(rep.verdict[:120])}</text>',
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
        f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">writer group: '
        f"{escape(rep.groups[0]['group'])} … {escape(rep.groups[-1]['group'])}</text>",
    ]
    for p in range(lo, hi + 1):
        parts.append(f'<text x="{pad - 6}" y="{y(p) + 4:.1f}" text-anchor="end">1e{p}</text>')
    for k, ((label, color, _), v) in enumerate(zip(series, logs)):
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
            + " ".join(f"{x(i):.1f},{y(e):.1f}" for i, e in enumerate(v))
            + '"/>'
        )
        parts.append(f'<text x="{pad + 8}" y="{pad + 4 + 16 * k}" fill="{color}">{escape(label)}</text>')
    parts.append("</svg>")
    from patcher.io.atomic import AtomicOutput

    with AtomicOutput(path) as tmp:  # an interrupted write leaves no half plot
        tmp.write_text("\n".join(parts), encoding="utf-8")
