"""`patcher audit MODEL`: signs of an edit in a checkpoint alone, without its base.

Weight orthogonalization makes every edited residual writer unable to write r̂. The checkpoint is
streamed once, writer by writer (column blocks of [d_model, in] weights, row blocks of [in, d_model]
ones, FP8 dequantised per tile): each group — one layer's attention output, one layer's MLP output
with all its experts, the embeddings — accumulates its Gram Σ W Wᵀ / Σ‖W‖² in one d_model ×
d_model buffer and is summarised by the low end of its spectrum (kernels/annihilation.py), so memory is a few
d_model² buffers whatever the model size. The scan for a shared direction and its calibrated null run on
those summaries. A second signature covers baked bias injection: a writer bias alone among zero
siblings, an outlier norm, or biases of different layers sharing one direction.
"""

import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from patcher_kernels import annihilation as an
from patcher_kernels.codecs import decode
from patcher_kernels.fp8 import dequantize_blocks
from patcher_kernels.lowrank import MANTISSA_BITS
from patcher.errors import PatcherError
from patcher.model.opened import Model
from patcher.model.architectures import POST_NORM_GAINS, Resolved, Target

BLOCK_BYTES = 32 << 20  # float32 bytes of one streamed block
SAMPLE = 4  # written vectors read per group, × d_model (the rest adds cost, not information)
NULL_SAMPLES = 24  # random-orientation models in the null
MARGIN = 2.0  # observed evidence must exceed the null's best by this factor …
MIN_GROUPS = 3  # … and at least this many groups must annihilate the direction
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


@dataclass
class AuditReport:
    model: str
    model_type: str | None
    groups: list[dict] = field(default_factory=list)
    verdict: str = ""
    edited: bool = False
    directions: list[dict] = field(default_factory=list)  # per found direction: evidence, profile
    null: dict = field(default_factory=dict)
    global_spectrum: dict = field(default_factory=dict)
    biases: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    direction: np.ndarray | None = None  # [d] or [k, d]: what was recovered

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "direction"}
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


def _groups(ck: Model, res: Resolved, progress=None, exact: bool = False):
    """Writer groups with their spectra, the sum of their normalised Grams, and the bytes read."""
    d = res.d_model
    total = np.zeros((d, d))
    groups, read = [], 0
    key = lambda t: (-1 if t.layer is None else t.layer, t.role)  # noqa: E731
    for (_, role), members in groupby(sorted(res.targets, key=key), key=key):
        members = list(members)
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
        gram /= trace
        total += gram
        t0 = members[0]
        label = "embeddings" if t0.layer is None else f"layer {t0.layer} {role}"
        groups.append(
            Group(
                label,
                role,
                t0.layer,
                [t.weight for t in members],
                ck.info(t0.weight).dtype,
                an.summarize(gram, gain=_post_norm_gain(ck, res, t0), floor=_floor(ck.info(t0.weight).dtype)),
            )
        )
    return groups, total, read


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
            for (t, b), n in zip(items, norms):
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
        for (t, b), n in zip(items, norms):
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


def _floor(dtype: str) -> float:
    """Energy along r̂ that storage rounding leaves after an exact ablation, in mean-eigenvalue units:
    per-element relative rounding error ~ uniform over half an ulp (2^-bits of the value)."""
    bits = MANTISSA_BITS.get(dtype)
    return 0.0 if bits is None else 4.0 ** (-bits) / 12.0


def _profile(groups: list[Group], v: np.ndarray) -> list[dict]:
    e = an.energies([g.spectrum for g in groups], v[:, None])[:, 0]
    return [
        {
            "group": g.label,
            "layer": g.layer,
            "role": g.role,
            "energy": float(ei),
            "annihilates": bool(ei < an.TAU),
            "strength_estimate": float(an.strength(np.array([ei]))[0]),
            "storage_floor": _floor(g.dtype),
        }
        for g, ei in zip(groups, e)
    ]


def _span(rows: list[dict]) -> str:
    layers = sorted({r["layer"] for r in rows if r["annihilates"] and r["layer"] is not None})
    parts, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            parts.append(f"{start}" if start == l else f"{start}-{l}")
            start = None
    emb = any(r["annihilates"] and r["layer"] is None for r in rows)
    return ", ".join((["embeddings"] if emb else []) + ([f"layers {', '.join(parts)}"] if parts else []))


def audit(model, arch_table=None, resolved: Resolved | None = None, max_rank: int = 4, progress=None,
          exact: bool = False) -> AuditReport:
    """Scan MODEL (a folder or file) for directions its writers cannot write, and for baked biases."""
    t0 = time.perf_counter()
    with Model.open(model, arch_table, require_arch=False, arch_optional=True) as ck:
        if resolved is None:
            if not ck.config and arch_table is None:
                raise PatcherError(model, "auditing needs a model folder with config.json")
            # without a table, opening it as an edit would name the unsupported model_type
            resolved = ck.resolved or Model(ck.storage).resolved
        rep = AuditReport(str(ck.path), ck.model_type)
        groups, total, rep.bytes_read = _groups(ck, resolved, progress, exact)
        rep.biases = _bias_signs(ck, resolved)
    if len(groups) < 2:
        raise PatcherError(model, "fewer than two writer groups: nothing to compare")
    spectra = [g.spectrum for g in groups]
    rep.groups = [
        {
            "group": g.label,
            "tensors": len(g.tensors),
            "dtype": g.dtype,
            "low_spectrum": [float(x) for x in g.spectrum.low],
            "rest_mean": g.spectrum.rest,
        }
        for g in groups
    ]
    low, _ = an.low_eigs(total, an.K)
    mean = np.trace(total) / len(total)
    rep.global_spectrum = {"min_over_mean": float(low[0] / mean), "lowest": [float(x / mean) for x in low]}
    null = an.null_evidence(spectra, NULL_SAMPLES)
    threshold = MARGIN * float(null.max()) + 0.5
    rep.null = {
        "samples": NULL_SAMPLES,
        "best_evidence": float(null.max()),
        "median_evidence": float(np.median(null)),
        "threshold": threshold,
        "how": "each group's low eigenvectors replaced by an independent random orthonormal basis "
        "(same spectra, no shared direction), scanned the same way",
    }
    found = np.zeros((spectra[0].basis.shape[0], 0))
    for _ in range(max_rank):
        v, ev = an.best_direction(spectra, exclude=found if found.shape[1] else None)
        if ev <= threshold:
            break
        v = an.refine(spectra, v, exclude=found if found.shape[1] else None)
        rows = _profile(groups, v)
        n = sum(r["annihilates"] for r in rows)
        if n < MIN_GROUPS:
            break
        ev_refined = float(an.evidence(an.energies(spectra, v[:, None]))[0])
        rep.directions.append(
            {
                "evidence": ev_refined,
                "evidence_over_null": ev_refined / max(null.max(), 1e-9),
                "groups_annihilating": n,
                "where": _span(rows),
                "profile": rows,
            }
        )
        found = np.concatenate([found, v[:, None]], axis=1)
    rep.edited = bool(rep.directions) or bool(rep.biases)
    if rep.directions:
        rep.direction = found[:, 0] if found.shape[1] == 1 else found.T
    rep.verdict = _verdict(rep, len(groups))
    rep.seconds = time.perf_counter() - t0
    return rep


def _verdict(rep: AuditReport, n_groups: int) -> str:
    parts = []
    if rep.directions:
        first = rep.directions[0]
        strengths = [r["strength_estimate"] for r in first["profile"] if r["annihilates"]]
        kind = (
            "directional ablation"
            if len(rep.directions) == 1
            else f"rank-{len(rep.directions)} subspace ablation"
        )
        parts.append(
            f"signs of {kind}: {first['groups_annihilating']} of {n_groups} writer groups "
            f"({first['where']}) cannot write one shared direction; evidence "
            f"{first['evidence_over_null']:.0f}× the calibrated null's best; "
            f"strength ≈ {np.median(strengths):.2f}"
        )
    for b in rep.biases[:1]:
        layer = "" if b["layer"] is None else f" at layer {b['layer']}"
        parts.append(f"signs of bias injection{layer} ({b['kind']}: {b['why']})")
    if not parts:
        return (
            "no sign of an edit (no direction shared by the writers' low spectra beyond the null, "
            "no suspicious bias)"
        )
    return "; ".join(parts)


def print_report(rep: AuditReport, out, max_rows: int = 40) -> None:
    from rich.table import Table

    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_row("model", rep.model)
    head.add_row("model_type", str(rep.model_type))
    head.add_row(
        "writer groups", f"{len(rep.groups)} ({rep.bytes_read / 2**20:.1f} MiB read in {rep.seconds:.2f} s)"
    )
    head.add_row("global Gram", f"smallest / mean eigenvalue {rep.global_spectrum['min_over_mean']:.3g}")
    head.add_row(
        "null",
        f"best evidence {rep.null['best_evidence']:.2f} over {rep.null['samples']} "
        f"random-orientation twins; threshold {rep.null['threshold']:.2f}",
    )
    out.print(head)
    for i, d in enumerate(rep.directions):
        t = Table(
            title=f"direction {i + 1}: evidence {d['evidence']:.1f} "
            f"({d['evidence_over_null']:.0f}× null), {d['groups_annihilating']} groups",
            title_justify="left",
        )
        for c in ("group", "energy along it (typical 1)", "annihilates", "strength ≈"):
            t.add_column(c, justify="left" if c == "group" else "right")
        for r in d["profile"][:max_rows]:
            t.add_row(
                r["group"],
                f"{r['energy']:.2e}",
                "yes" if r["annihilates"] else "",
                f"{r['strength_estimate']:.2f}" if r["annihilates"] else "",
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
    for i, d in enumerate(rep.directions):
        series.append((f"energy along recovered direction {i + 1}", colors[i % 4],
                       [r["energy"] for r in d["profile"]]))
    logs = [np.log10(np.maximum(np.array(v, dtype=float), 1e-12)) for _, _, v in series]
    lo = math.floor(min(min(x.min() for x in logs), -1))
    hi = 1
    n = len(rep.groups)
    y = lambda v: H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)  # noqa: E731
    x = lambda i: pad + i / max(n - 1, 1) * (W - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12">', SVG_MARK, f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" '
             f'font-size="13">{escape(rep.verdict[:120])}</text>',
             f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">writer group: '
             f'{escape(rep.groups[0]["group"])} … {escape(rep.groups[-1]["group"])}</text>']
    for p in range(lo, hi + 1):
        parts.append(f'<text x="{pad - 6}" y="{y(p) + 4:.1f}" text-anchor="end">1e{p}</text>')
    for k, ((label, color, _), v) in enumerate(zip(series, logs)):
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                     + " ".join(f"{x(i):.1f},{y(e):.1f}" for i, e in enumerate(v)) + '"/>')
        parts.append(f'<text x="{pad + 8}" y="{pad + 4 + 16 * k}" fill="{color}">{escape(label)}</text>')
    parts.append("</svg>")
    from patcher.io.atomic import atomic_file
    with atomic_file(path) as tmp:  # an interrupted write leaves no half plot
        tmp.write_text("\n".join(parts), encoding="utf-8")
