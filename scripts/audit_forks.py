"""Forks of a checkpoint made the way other tools make them, with plain numpy (not patcher's ablate),
for `patcher audit`'s tests and its confusion table (scripts/bench_audit.py --confusion).

Written from the published descriptions:
  * classic abliteration (Arditi et al. 2024): every residual writer W ← W − s·r̂ r̂ᵀ W, one r̂;
  * heretic (p-e-w/heretic): a direction per layer (a per-layer difference of means, which varies
    smoothly across layers), a strength kernel over layers — max_weight at max_weight_position,
    falling linearly to min_weight at min_weight_distance, zero beyond — with separate parameters for
    attention and MLP writers;
  * MPOA (heretic ≥ 1.2, grimjim's norm-preserving biprojected abliteration): the direction projected
    off a second ("harmless") direction, W' = W − s·r̂ r̂ᵀ W then each row (residual coordinate) or
    column (written vector) rescaled to its original norm, the change applied as a low-rank
    approximation (a LoRA of rank `lora_rank`).
Clean-but-changed controls: multiplicative noise, a random low-rank merge, a benign LoRA-like merge on
every linear layer, and dtype round trips.

Weights are handled in residual orientation: [d_model, n] (each column a written vector).
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from patcher_kernels.codecs import decode, encode

from patcher.io.checkpoint import Checkpoint
from patcher.io.writer import OutTensor, write_safetensors
from patcher.model.architectures import for_model_type, resolve


def unit(v):
    return v / np.linalg.norm(v)


def smooth_directions(d: int, n_layers: int, rng, neighbour_cos: float = 0.72) -> np.ndarray:
    """[n_layers, d] unit directions, each a random step from the previous one with the given |cos|
    to it (a per-layer difference of means moves like this: heretic reports 0.6-0.9 between layers)."""
    step = np.sqrt(1 / neighbour_cos**2 - 1)
    out = [unit(rng.normal(size=d))]
    for _ in range(n_layers - 1):
        z = rng.normal(size=d)
        z -= out[-1] * (out[-1] @ z)
        out.append(unit(out[-1] + step * unit(z)))
    return np.stack(out)


def heretic_kernel(
    n_layers: int, max_weight: float, position: float, min_weight: float, distance: float
) -> np.ndarray:
    """heretic's per-layer weight: linear from max_weight at `position` to min_weight at `distance`
    layers away, zero beyond."""
    x = np.abs(np.arange(n_layers) - position)
    w = max_weight + (x / distance) * (min_weight - max_weight)
    return np.where(x <= distance, w, 0.0)


def ablate(
    w: np.ndarray, r: np.ndarray, s: float, norm_preserve: str | None = None, lora_rank: int | None = None
) -> np.ndarray:
    """W [d, n] in residual orientation → W − s r̂ r̂ᵀ W, optionally norm-preserving, optionally applied
    as the rank-`lora_rank` approximation of the change."""
    new = w - s * np.outer(r, r @ w)
    if norm_preserve == "rows":  # each residual coordinate keeps its norm
        new *= (np.linalg.norm(w, axis=1) / np.maximum(np.linalg.norm(new, axis=1), 1e-30))[:, None]
    elif norm_preserve == "cols":  # each written vector keeps its norm
        new *= np.linalg.norm(w, axis=0) / np.maximum(np.linalg.norm(new, axis=0), 1e-30)
    if lora_rank is not None:
        u, sv, vt = np.linalg.svd(new - w, full_matrices=False)
        new = w + (u[:, :lora_rank] * sv[:lora_rank]) @ vt[:lora_rank]
    return new


@dataclass(frozen=True)
class Fork:
    """One way of changing a checkpoint: `kind` names an entry of KINDS, `strength` its size."""

    kind: str
    strength: float = 1.0
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.strength:g}"


def _writer_plan(fork: Fork, n_layers: int, d: int, rng):
    """(directions [n_layers, d] or None, attn weights [n_layers], mlp weights [n_layers], norm, lora)."""
    k, s = fork.kind, fork.strength
    one = np.tile(unit(rng.normal(size=d)), (n_layers, 1))
    everywhere = np.full(n_layers, s)
    if k == "classic":
        return one, everywhere, everywhere, None, None
    if k == "heretic":  # per-layer directions, linear kernel peaking at 60 % depth, MLP a little weaker
        dirs = smooth_directions(d, n_layers, rng)
        pos, dist = 0.6 * (n_layers - 1), 0.55 * n_layers
        return (
            dirs,
            heretic_kernel(n_layers, s, pos, 0.2 * s, dist),
            heretic_kernel(n_layers, 0.9 * s, pos, 0.2 * s, dist),
            None,
            None,
        )
    if k in ("mpoa-rows", "mpoa-cols"):  # projected direction, norm-preserving, through a rank-3 LoRA
        harmless = unit(rng.normal(size=d))
        r = unit(one[0] + 0.5 * harmless)
        r = unit(r - harmless * (harmless @ r))
        return (np.tile(r, (n_layers, 1)), everywhere, everywhere, k.split("-")[1], 3)
    raise ValueError(k)


def _control(fork: Fork, w: np.ndarray, rng) -> np.ndarray:
    """Clean-but-changed controls, applied to every linear weight (not only writers)."""
    k, s = fork.kind, fork.strength
    if k == "noise":  # × (1 + s·N(0,1)) elementwise
        return w * (1 + s * rng.normal(size=w.shape))
    if k in ("merge", "lora"):  # random rank-4 merge / rank-16 LoRA, ‖Δ‖ = s‖W‖
        rank = 4 if k == "merge" else 16
        a, b = rng.normal(size=(w.shape[0], rank)), rng.normal(size=(rank, w.shape[1]))
        delta = a @ b
        return w + delta * (s * np.linalg.norm(w) / np.linalg.norm(delta))
    raise ValueError(k)


CONTROLS = {"noise", "merge", "lora", "fp16", "fp32"}
KINDS = {"classic", "heretic", "mpoa-rows", "mpoa-cols"} | CONTROLS


def make_fork(src: Path, dst: Path, fork: Fork) -> dict:
    """Write the fork of the safetensors folder `src` to `dst`; return what was done: the direction(s)
    used ([n_layers, d]) and the per-layer strengths by role."""
    if fork.kind not in KINDS:
        raise ValueError(f"unknown fork kind {fork.kind!r}")
    rng = np.random.default_rng(fork.seed)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "patcher-*"))
    truth = {"directions": None, "attn_out": None, "mlp_out": None}
    with Checkpoint(src) as ck:
        res = resolve(for_model_type(ck.model_type, src), ck.tensors, ck.config, src)
        d, n_layers = res.d_model, res.n_layers
        targets = {t.weight: t for t in res.targets if t.layer is not None}
        plan = None
        if fork.kind not in CONTROLS:
            plan = _writer_plan(fork, n_layers, d, rng)
            truth = {"directions": plan[0], "attn_out": plan[1], "mlp_out": plan[2]}
        dtype_out = {"fp16": "F16", "fp32": "F32"}.get(fork.kind)
        tensors = []
        for name, info in ck.tensors.items():
            raw = ck.array(name)
            dtype = dtype_out if dtype_out and info.dtype in ("BF16", "F32", "F16") else info.dtype
            linear = name.endswith(".weight") and len(info.shape) == 2 and "embed" not in name
            t = targets.get(name)
            if plan is not None and t is not None and t.role in ("attn_out", "mlp_out"):
                w = decode(raw).astype(np.float64)
                w = w if t.residual_axis == 0 else w.T
                weights = plan[1] if t.role == "attn_out" else plan[2]
                if weights[t.layer] > 0:
                    w = ablate(w, plan[0][t.layer], weights[t.layer], plan[3], plan[4])
                w = w if t.residual_axis == 0 else w.T
                raw = encode(w.astype(np.float32), dtype)
            elif plan is None and fork.kind in ("noise", "merge", "lora") and linear:
                if fork.kind != "merge" or t is not None:  # a merge touches the writers; noise/LoRA all
                    w = _control(fork, decode(raw).astype(np.float64), rng)
                    raw = encode(w.astype(np.float32), dtype)
            elif dtype != info.dtype:
                raw = encode(decode(raw).astype(np.float32), dtype)
            tensors.append((name, dtype, np.array(raw)))
    write_safetensors(
        dst / "model.safetensors",
        [OutTensor(n, dt, a.shape, produce=lambda a=a: [a]) for n, dt, a in tensors],
        {"format": "pt"},
    )
    return truth


def standard_forks(strengths=(0.25, 0.5, 0.75, 1.0)) -> list[Fork]:
    """The confusion table's rows: controls, then every fork kind at every strength."""
    controls = [
        Fork("noise", 1e-3),
        Fork("merge", 0.01),
        Fork("lora", 0.05),
        Fork("fp16"),
        Fork("fp32"),
        Fork("noise", 1e-2, seed=1),
        Fork("merge", 0.05, seed=1),
        Fork("lora", 0.2, seed=1),
    ]
    edits = [Fork(k, s) for k in ("classic", "heretic", "mpoa-rows", "mpoa-cols") for s in strengths]
    return controls + edits
