"""Difference-in-means directions (Arditi et al. 2024): run two prompt sets through the model block
by block, average resid_pre[l] at chosen token positions, subtract, and rank the layers.

Means are accumulated in float64. Per-prompt projections for the scores are kept as float16
[prompts, layers, d_model] only when asked for scores (always, for the CLI), which bounds memory by
the prompt count, not the model size.
"""

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patcher import __version__
from patcher import validate as V
from patcher.edit.directions import save_directions
from patcher.edit.plan import parse_layers
from patcher.errors import PatcherError
from patcher.io.manifest import sha256_file
from patcher.model.execution import StreamedModel
from patcher.model.opened import Model, as_model
from patcher.model.prompts import check_lengths, encode_prompts, left_pad, read_prompt_file

# The up-front time estimate, in units of this machine's float32 matmul rate (timed when it is made):
# the block-by-block forward reaches this share of it on the block weights (SmolLM2-135M, CPU time: 6.6 of
# 18.7 GFLOP/s, weight decoding included), plus a per-token, per-block cost of numpy's small operations
# worth this many matmul FLOPs (the 64-wide demo model: 1.6 s of CPU for 45k token-blocks at 13 GFLOP/s)
FORWARD_EFFICIENCY = 0.35
TOKEN_BLOCK_OVERHEAD_FLOPS = 4.7e5
IGNORE_LAST = 0.2  # selection ignores the last 20 % of layers: late layers separate prompts trivially
SELECTION_RULE = (
    "highest signal-to-noise among resid_pre layers 0..floor(0.8*L), "
    "ties broken by the larger mean-difference norm"
)


@dataclass
class ExtractResult:
    direction: np.ndarray  # [L+1, d] float32: positive_mean - negative_mean (averaged over positions)
    positive_mean: np.ndarray
    negative_mean: np.ndarray
    scores: list[dict]  # one row per layer
    selected_layer: int
    per_position: dict = field(default_factory=dict)  # position -> (direction, positive_mean, negative_mean)
    metadata: dict = field(default_factory=dict)

    def save(self, path) -> None:
        extra = {}
        for p, (d, pm, nm) in self.per_position.items():
            extra.update({f"direction.pos{p}": d, f"positive_mean.pos{p}": pm, f"negative_mean.pos{p}": nm})
        save_directions(path, self.direction, self.positive_mean, self.negative_mean, self.metadata, extra)


class _Accumulator:
    """Sums of resid_pre at the chosen positions, per layer, in float64; per-prompt rows kept in
    float16 for the spread-based scores."""

    def __init__(
        self,
        n_layers: int,
        d: int,
        positions: list[int],
        n_prompts: int,
        layers: set[int],
        winsorize: float | None = None,
    ):
        self.sum = np.zeros((len(positions), n_layers + 1, d))
        self.samples = np.zeros((n_prompts, n_layers + 1, d), dtype=np.float16)
        self.positions, self.layers, self.count = positions, layers, 0
        self.winsorize = winsorize

    def add(self, layer: int, x: np.ndarray, offset: int):
        if layer not in self.layers:
            return
        picked = x[:, self.positions, :].astype(
            np.float64
        )  # left padding: position -1 is the last real token
        if self.winsorize is not None:
            picked = winsorized(picked, self.winsorize)
        self.sum[:, layer] += picked.sum(axis=0)
        self.samples[offset : offset + x.shape[0], layer] = picked.mean(axis=1)

    @property
    def mean(self):
        return self.sum / max(self.count, 1)


def check_winsorize(q) -> None:
    if q is not None and not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q < 1):
        raise PatcherError("--winsorize", f"must be a quantile strictly between 0 and 1, got {q!r}")


def winsorized(x: np.ndarray, q: float) -> np.ndarray:
    """Each residual vector (last axis) with its components clamped to ± the q-quantile of its own
    absolute components: tames the few "massive activations" some models carry in fixed coordinates,
    which otherwise dominate a mean difference."""
    t = np.quantile(np.abs(x), q, axis=-1, keepdims=True)
    return np.clip(x, -t, t)


def _run_set(model: StreamedModel, batches, acc: _Accumulator, layers, progress):
    """Run one prompt set; progress advances as each batch leaves each block (a set of 100k prompts
    reported nothing until it was done), in prompts, summing to the set's count."""
    offsets = np.cumsum([0] + [ids.shape[0] for ids, _ in batches])
    steps = min(max(layers), model.n_layers) + 1  # resid_pre[0..last]: calls per batch
    told = [0.0]

    def on_resid(b, l, x):
        acc.add(l, x, offsets[b])
        if progress:
            told[0] += x.shape[0] / steps
            progress(x.shape[0] / steps)

    model.run_many(batches, on_resid=on_resid, layers=layers)
    acc.count += int(offsets[-1])
    if progress and int(offsets[-1]) != told[0]:
        progress(int(offsets[-1]) - told[0])


def estimate_seconds(model: StreamedModel, batches: list, blocks: int) -> tuple[int, float]:
    """(padded tokens, seconds) the forward of `batches` through `blocks` blocks should take on this
    machine now: 2 x the block weights a token meets (MoE: the routed share of the experts) plus
    attention, at FORWARD_EFFICIENCY of a float32 matmul timed here (median of 3), plus the per-token
    overhead. A loaded machine makes it rough: the progress lines then give the pace."""
    import time

    hp, ck = model.hp, model.ck
    prefix = model.resolved.layer_prefix(0)
    weights = 0.0
    for name, info in ck.tensors.items():
        if name.startswith(prefix) and not model.is_scale(name):
            share = hp.moe["top_k"] / hp.moe["experts"] if hp.moe and "experts" in name else 1.0
            weights += math.prod(info.shape) * share
    tokens = sum(int(ids.size) for ids, _ in batches)
    attention = sum(int(ids.size) * ids.shape[1] for ids, _ in batches) * 4 * hp.n_heads * hp.head_dim
    a, b = np.ones((256, 1024), np.float32), np.ones((1024, 1024), np.float32)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    rate = 2 * a.shape[0] * a.shape[1] * b.shape[1] / max(sorted(times)[1], 1e-9)
    work = (2 * weights * tokens + attention) / FORWARD_EFFICIENCY + TOKEN_BLOCK_OVERHEAD_FLOPS * tokens
    return tokens, work * blocks / rate


def _batches(token_lists, pad_id, batch_size, positions, where):
    need = max(-p for p in positions)
    short = [i for i, t in enumerate(token_lists) if len(t) < need]
    if short:
        raise PatcherError(
            where,
            f"prompt {short[0] + 1} has {len(token_lists[short[0]])} tokens; positions "
            f"{positions} need at least {need}",
        )
    order = np.argsort([len(t) for t in token_lists], kind="stable")  # similar lengths: less padding
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield idx, left_pad([token_lists[i] for i in idx], pad_id)


def score_layers(pos_mean, neg_mean, pos_samples, neg_samples, layers) -> list[dict]:
    """Per-layer scores a user can judge (definitions: docs/extract.md)."""
    diff = pos_mean - neg_mean
    norms = np.linalg.norm(diff, axis=1)
    rows = []
    for l in range(diff.shape[0]):
        if l not in layers or norms[l] == 0:
            rows.append(
                {"layer": l, "computed": l in layers, "diff_norm": float(norms[l]) if l in layers else None}
            )
            continue
        neighbours = [
            float(diff[m] @ diff[l] / (norms[m] * norms[l]))
            for m in (l - 1, l + 1)
            if 0 <= m < diff.shape[0] and m in layers and norms[m] > 0
        ]
        stream = np.linalg.norm(
            np.concatenate([pos_samples[:, l], neg_samples[:, l]]).astype(np.float64), axis=1
        ).mean()
        rows.append(
            {
                "layer": l,
                "computed": True,
                "diff_norm": float(norms[l]),
                "snr": _snr(
                    pos_samples[:, l].astype(np.float64),
                    neg_samples[:, l].astype(np.float64),
                    diff[l] / norms[l],
                ),
                "neighbour_cos": float(np.mean(neighbours)) if neighbours else None,
                "relative_norm": float(norms[l] / stream) if stream > 0 else 0.0,
            }
        )
    return rows


def _snr(a: np.ndarray, b: np.ndarray, r: np.ndarray | None = None) -> float:
    """Separation of two sample sets along r (default: their own unit mean difference), in pooled
    standard deviations."""
    if r is None:
        diff = a.mean(axis=0) - b.mean(axis=0)
        norm = np.linalg.norm(diff)
        if norm == 0:
            return 0.0
        r = diff / norm
    pa, pb = a @ r, b @ r
    pooled = math.sqrt((pa.var() + pb.var()) / 2)
    return float((pa.mean() - pb.mean()) / pooled) if pooled > 0 else float("inf")


def shuffled_snr(
    pos: np.ndarray, neg: np.ndarray, layers: list[int], rounds: int = 16, seed: int = 0
) -> float:
    """The best SNR the same prompts reach over `layers` with their labels shuffled (the largest of `rounds`
    shuffles): the direction is fitted to the samples it is scored on, and the best layer is picked, so
    even sets that do not differ score above zero (about sqrt(d·(1/n+ + 1/n-)) for isotropic noise).
    A selected SNR within this range is noise. pos, neg: [prompts, layers, d]."""
    both = np.concatenate([pos[:, layers], neg[:, layers]]).astype(np.float64)
    rng = np.random.default_rng(seed)
    best = 0.0
    for _ in range(rounds):
        idx = rng.permutation(len(both))
        a, b = both[idx[: len(pos)]], both[idx[len(pos) :]]
        best = max(best, *(_snr(a[:, i], b[:, i]) for i in range(len(layers))))
    return best


def selection_pool(scores: list[dict], n_layers: int) -> list[dict]:
    limit = math.floor((1 - IGNORE_LAST) * n_layers)
    return [s for s in scores if s.get("snr") is not None and s["layer"] <= limit] or [
        s for s in scores if s.get("snr") is not None
    ]


def select_layer(scores: list[dict], n_layers: int) -> int:
    pool = selection_pool(scores, n_layers)
    if not pool:
        raise PatcherError(
            "extract", "no layer separates the two prompt sets (all mean differences are zero)"
        )
    return max(pool, key=lambda s: (s["snr"], s["diff_norm"]))["layer"]


def extract(
    model,
    positive,
    negative,
    *,
    positions=(-1,),
    batch_size: int = 8,
    max_prompts: int | None = None,
    layers: str | None = None,
    chat_template: bool = True,
    system: str | None = None,
    project_out_negative_mean: bool = False,
    progress=None,
    arch_table=None,
    announce=None,
    winsorize: float | None = None,
) -> ExtractResult:
    """Python API mirroring `patcher extract`. `model` is a Model or anything Model.open takes (a folder,
    a file, a hub repo id); `positive`/`negative` are prompt files or lists of strings."""
    positions = V.positions(
        list(positions) if isinstance(positions, (tuple, list)) else positions, "--positions"
    )
    batch_size = V.number(batch_size, "batch_size", "--batch-size")
    if max_prompts is not None:
        max_prompts = V.number(max_prompts, "max_prompts", "--max-prompts")
    check_winsorize(winsorize)
    # a Model the caller opened stays open; anything else is opened (and closed) here
    opened = contextlib.nullcontext(model) if isinstance(model, Model) else as_model(model, arch_table)
    with opened as m:
        return _extract(
            m,
            positive,
            negative,
            positions,
            batch_size,
            max_prompts,
            layers,
            chat_template,
            system,
            project_out_negative_mean,
            progress,
            announce,
            winsorize,
        )


def _refuse_non_finite(ck: Model, pos_mean, neg_mean, layer_set) -> None:
    """NaN/Inf weights, or a config whose forward pass overflows (rms_norm_eps < 0, rope_theta 0), make
    the residual stream non-finite: no directions file and no "selected" layer from that."""
    bad = [
        l
        for l in sorted(layer_set)
        if not (np.isfinite(pos_mean[:, l]).all() and np.isfinite(neg_mean[:, l]).all())
    ]
    if bad:
        after = " and after" if len(bad) > 1 else ""
        raise PatcherError(
            ck.path,
            f"the residual stream is not finite (NaN or Inf) at resid_pre layer "
            f"{bad[0]}{after}: the weights hold NaN/Inf or the config makes the forward "
            "pass overflow; nothing was written",
        )


def _extract(
    ck: Model,
    positive,
    negative,
    positions,
    batch_size,
    max_prompts,
    layers,
    chat_template,
    system,
    project_out_negative_mean,
    progress,
    announce=None,
    winsorize=None,
) -> ExtractResult:
    sm = StreamedModel(ck)
    L, d = sm.n_layers, sm.hp.d_model
    layer_set = parse_layers(layers, L + 1)
    layer_set = set(range(L + 1)) if layer_set is None else layer_set
    tok = ck.tokenizer()
    sets, meta_sets = {}, {}
    for label, src in (("positive", positive), ("negative", negative)):
        if isinstance(src, (str, Path)):
            prompts = read_prompt_file(src, max_prompts)
            meta_sets[label] = {"file": str(src), "sha256": sha256_file(src), "count": len(prompts)}
        else:
            prompts = list(src)[:max_prompts] if max_prompts else list(src)
            meta_sets[label] = {"count": len(prompts)}
        if not prompts:
            raise PatcherError(label, "no prompts")
        sets[label] = encode_prompts(tok, prompts, chat_template=chat_template, system=system)
    for label, toks in sets.items():  # before any work: a 120k-token prompt is refused here
        check_lengths(
            toks, ck.config, meta_sets[label].get("file", label), heads=sm.hp.n_heads, batch_size=batch_size
        )
    # batches are sorted by length; the statistics do not depend on prompt order
    batches = {
        label: [b for _, b in _batches(toks, tok.pad_id, batch_size, positions, label)]
        for label, toks in sets.items()
    }
    if announce:
        blocks = min(max(layer_set), L)
        tokens, seconds = estimate_seconds(sm, [b for bs in batches.values() for b in bs], blocks)
        announce(
            f"{sum(len(t) for t in sets.values())} prompts ({tokens} tokens with padding) through "
            f"{blocks} of {L} blocks: about {_duration(seconds)} at this machine's current speed"
        )
    accs = {}
    for label, toks in sets.items():
        acc = _Accumulator(L, d, positions, len(toks), layer_set, winsorize)
        _run_set(sm, batches[label], acc, layer_set, progress)
        accs[label] = acc
    pos_mean, neg_mean = accs["positive"].mean, accs["negative"].mean  # [P, L+1, d]
    _refuse_non_finite(ck, pos_mean, neg_mean, layer_set)
    per_pos_dir = pos_mean - neg_mean
    direction = per_pos_dir.mean(axis=0)
    if project_out_negative_mean:
        nm = neg_mean.mean(axis=0)
        n_hat = nm / np.maximum(np.linalg.norm(nm, axis=1, keepdims=True), 1e-30)
        direction = direction - np.sum(direction * n_hat, axis=1, keepdims=True) * n_hat
    scores = score_layers(
        pos_mean.mean(axis=0),
        neg_mean.mean(axis=0),
        accs["positive"].samples,
        accs["negative"].samples,
        layer_set,
    )
    selected = select_layer(scores, L)
    null = shuffled_snr(
        accs["positive"].samples, accs["negative"].samples, [r["layer"] for r in selection_pool(scores, L)]
    )
    meta = {
        "model": str(ck.path),
        "model_type": ck.model_type,
        "layers": L,
        "d_model": d,
        "prompts": meta_sets,
        "positions": positions,
        "chat_template": bool(chat_template and tok.has_chat_template),
        "system": system,
        "project_out_negative_mean": project_out_negative_mean,
        "winsorize": winsorize,
        "selected_layer": selected,
        "shuffled_labels_snr": null,
        "selection_rule": SELECTION_RULE,
        "scores": scores,
        "computed_layers": sorted(layer_set),
        "patcher": __version__,
    }
    per_position = {}
    if len(positions) > 1:
        per_position = {p: (per_pos_dir[i], pos_mean[i], neg_mean[i]) for i, p in enumerate(positions)}
    return ExtractResult(
        direction.astype(np.float32),
        pos_mean.mean(axis=0).astype(np.float32),
        neg_mean.mean(axis=0).astype(np.float32),
        scores,
        selected,
        per_position,
        meta,
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
