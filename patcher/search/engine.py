"""The numpy engine: the whole model resident in float32, a KV cache, and an ablation applied in the
forward pass instead of in the weights.

For a writer whose weight the Plan edits with basis u (unit, post-norm corrected) and strength s,
weight orthogonalization gives W' = W - s u uᵀW (nn.Linear orientation [d_model, fan_in]; the
residual-axis-1 storage of embeddings and Conv1D is the transpose), so the output changes exactly as

    y' = W'x + b' = P(W x) + P(b)   with P(y) = y - s u (uᵀy),   b' = P(b) when the Plan projects b.

Norm preservation rescales W' by a diagonal factor, which moves to the input or the output:
  "cols" (each written vector keeps its norm) W' = P W diag(c):   y' = P(W (c ⊙ x)) + b'
         c_j = |a_j| / |P a_j|, |P a_j|² = |a_j|² - (2s - s²)(uᵀa_j)²
  "rows" (each residual coordinate keeps its norm) W' = diag(r) P W:   y' = r ⊙ P(W x) + b'
         r_i = |A_i| / |A_i - s u_i (uᵀA)|,  |..|² = |A_i|² - 2 s u_i (A Aᵀu)_i + s² u_i² |uᵀA|²
An embedding row e_v becomes c_v P(e_v) (cols) or r ⊙ P(e_v) (rows). A tied unembedding edited
with it gives logits h·e'_v: P(h)·e_v (none), c_v P(h)·e_v (cols), P(r ⊙ h)·e_v (rows).
Factors whose projected norm is ~0 stay 1, as kernels/project.rescale_norms does.

Weights are resident either decoded (float32: fastest) or as stored ("storage": bf16 / fp16 / fp32
tensors stay the file's memory-mapped arrays and are converted to float32 at each use, one tensor at
a time; other encodings are decoded once). The conversion is exact, so both give the same logits;
"auto" decodes when the float32 model takes at most half the memory available.
"""

import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from patcher_kernels.codecs import decode

from patcher.edit.plan import Plan
from patcher.errors import PatcherError
from patcher.model import forward as fw
from patcher.model.execution import StreamedModel
from patcher.model.numpy_ops import F32, NumpyOps


@dataclass
class WriterEdit:
    u: np.ndarray  # [d] float32 unit basis
    s: float
    bias: np.ndarray | None = None  # the projected bias P(b), when the Plan projects this writer's bias
    col: np.ndarray | None = None  # "cols": per input (fan_in / vocab) factor
    row: np.ndarray | None = None  # "rows": per residual coordinate factor


@dataclass
class Edits:
    """A Plan as the engine applies it: per block, relative weight name -> WriterEdit; top level too."""

    blocks: list  # [L] dicts
    top: dict  # embedding name -> WriterEdit
    head: WriterEdit | None  # the tied unembedding's change, if the embedding edit reaches it
    head_weight: str | None = None

    @property
    def empty(self) -> bool:
        return not self.top and not any(self.blocks)

    @property
    def first_layer(self) -> int:
        """The first layer whose residual stream differs from the original's (0 when the embedding is
        edited; the layer count when nothing before the head is)."""
        if self.top:  # only embeddings (token, position) write the residual outside the blocks
            return 0
        return next((i for i, b in enumerate(self.blocks) if b), len(self.blocks))


def _safe_ratio(old_sq, new_sq):
    ok = new_sq > 1e-30 * np.maximum(old_sq, 1e-300)
    return np.where(ok, np.sqrt(np.where(ok, old_sq, 1.0) / np.where(ok, new_sq, 1.0)), 1.0)


RESIDENT = ("auto", "float32", "storage")
# kept as stored and converted (exactly) at each use; other encodings are decoded once
STORED = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


class StoredWeights(dict):
    """Weights as the file stores them (memory-mapped), each converted to float32 when it is used."""

    def __getitem__(self, name):
        return decode(dict.__getitem__(self, name))

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        return decode(dict.__getitem__(self, name)[ids])


def available_memory() -> int:
    """MemAvailable (bytes): what can be allocated without swapping or evicting much."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def float32_bytes(sm: StreamedModel) -> int:
    return sum(4 * int(np.prod(sm.ck.info(n).shape)) for n in sm.ck.tensors if not sm.is_scale(n))


def choose_resident(sm: StreamedModel, resident: str = "auto") -> str:
    if resident not in RESIDENT:
        raise PatcherError("--resident", f"must be one of {', '.join(RESIDENT)}")
    if resident != "auto":
        return resident
    return "float32" if 2 * float32_bytes(sm) <= available_memory() else "storage"


def _stored(sm: StreamedModel, names: dict) -> StoredWeights:
    """short name -> the stored array (bf16/fp16/fp32, memory-mapped) or, for other encodings (FP8
    with scales, quantized), the decoded float32 array."""
    out = StoredWeights()
    for short, name in names.items():
        raw = sm.ck.array(name)
        keep = raw.dtype in STORED and sm.model.fp8_scale(name) is None
        dict.__setitem__(out, short, raw if keep else sm._decode(name))
    return out


class ResidentModel:
    """Every weight resident (decoded once to float32, or as stored: see the module notes), shared
    read-only by every trial and thread."""

    shares_prefix = True  # the Evaluator may run a prefix all rows share once (attention masks by position)
    resumes = True  # a forward pass may start at a layer, from the residual stream entering it

    def __init__(self, sm: StreamedModel, resident: str = "float32"):
        self.sm, self.spec, self.hp, self.resolved = sm, sm.spec, sm.hp, sm.resolved
        self.resident = choose_resident(sm, resident)
        top = sm.top_weights()
        self.top: dict[str, np.ndarray]
        self.blocks: list[dict[str, np.ndarray]]
        if self.resident == "storage":
            self.top = _stored(sm, top.names)
            self.blocks = [
                _stored(sm, {n[len(p) :]: n for n in sm.ck.tensors if n.startswith(p) and not sm.is_scale(n)})
                for p in map(self.resolved.layer_prefix, range(sm.n_layers))
            ]
        else:
            self.top = {name: top[name] for name in top.names}
            self.blocks = [sm.block_weights(l) for l in range(sm.n_layers)]
        self.embed_name = self.spec.names["embed"] + ".weight"
        self.head_name = (
            self.embed_name
            if self.hp.tied or (self.spec.names["lm_head"] + ".weight") not in self.top
            else self.spec.names["lm_head"] + ".weight"
        )
        self._norms: dict = {}

    @property
    def n_layers(self) -> int:
        return self.hp.n_layers

    @property
    def vocab(self) -> int:
        return self.sm.ck.info(self.sm.top_weights().names[self.embed_name]).shape[0]

    # --- a Plan -> Edits -----------------------------------------------------------------------
    def _linear_view(self, w: np.ndarray, axis: int) -> np.ndarray:
        """The weight as nn.Linear [d_model, fan_in] (a view, no copy)."""
        return w if axis == 0 else w.T

    def _sq_norms(self, key, a: np.ndarray):
        if key not in self._norms:
            a64 = a.astype(np.float64)
            self._norms[key] = (np.einsum("ij,ij->j", a64, a64), np.einsum("ij,ij->i", a64, a64))
        return self._norms[key]

    def _writer_edit(self, key, w: np.ndarray, axis: int, q, s: float, preserve, bias) -> WriterEdit:
        u = np.asarray(q, dtype=np.float64)[:, 0]
        e = WriterEdit(u.astype(np.float32), float(s))
        if bias is not None:
            b = bias.astype(np.float64)
            e.bias = (b - s * u * (u @ b)).astype(np.float32)
        if preserve:
            a = self._linear_view(w, axis)
            col_sq, row_sq = self._sq_norms(key, a)
            ua = u @ a.astype(np.float64)  # uᵀA [fan_in]
            if preserve == "cols":
                e.col = _safe_ratio(col_sq, np.maximum(col_sq - (2 * s - s * s) * ua * ua, 0.0)).astype(
                    np.float32
                )
            else:
                aau = a.astype(np.float64) @ ua
                new = row_sq - 2 * s * u * aau + s * s * u * u * float(ua @ ua)
                e.row = _safe_ratio(row_sq, np.maximum(new, 0.0)).astype(np.float32)
        return e

    def edits(self, plan: Plan) -> Edits:
        res = self.resolved
        blocks: list[dict[str, WriterEdit]] = [{} for _ in range(self.n_layers)]
        top: dict[str, WriterEdit] = {}
        head: WriterEdit | None = None
        projected_bias = {name for name, e in plan.edits.items() if e.op == "project_bias"}
        untied = any(e.op == "copy_of" for e in plan.all())
        bias_of = {t.weight: t.bias for t in res.targets}
        for name, e in plan.edits.items():
            if e.op != "project":
                continue
            bias = bias_of.get(name) if bias_of.get(name) in projected_bias else None
            if e.layer is None:
                short = name[len(res.prefix) :] if name.startswith(res.prefix) else name
                w = self.top[short]
                top[short] = self._writer_edit(
                    short,
                    w,
                    e.axis,
                    e.q,
                    e.scale,
                    e.preserve,
                    None if bias is None else self.top[bias[len(res.prefix) :]],
                )
                if short == self.embed_name and self.head_name == self.embed_name and not untied:
                    head = top[short]
            else:
                prefix = res.layer_prefix(e.layer)
                rel = name[len(prefix) :]
                w = self.blocks[e.layer][rel]
                b = None if bias is None else self.blocks[e.layer][bias[len(prefix) :]]
                blocks[e.layer][rel] = self._writer_edit(name, w, e.axis, e.q, e.scale, e.preserve, b)
        return Edits(blocks, top, head, self.head_name if head is not None else None)

    # --- running ------------------------------------------------------------------------------
    def _below(self, ids, mask, pos, cache, edits, start, known) -> np.ndarray:
        """The residual entering `start` for every row: the known rows' as given, the others' computed
        through the layers before it (their keys/values appended beside the known rows')."""
        rows, x_known, kv = known
        others = np.setdiff1d(np.arange(len(ids)), rows)
        x = np.empty((len(ids), ids.shape[1], x_known.shape[-1]), F32)
        x[rows] = x_known
        if not len(others):
            for layer in range(start):
                append_kv(cache, layer, *kv[layer])
            return x
        sub = dict(mask=mask[others], pos=pos[others], cache=cache, rows=(rows, others), known=kv)
        y = fw.embed(
            SubsetOps(self.top, edits=edits.top, **sub), self.spec, self.hp, ids[others], pos[others]
        )
        for layer in range(start):
            y = fw.block(
                SubsetOps(self.blocks[layer], edits=edits.blocks[layer], **sub), self.spec, self.hp, y, layer
            )
        x[others] = y
        return x

    def new_cache(self, batch: int) -> dict:
        return {}

    @staticmethod
    def concat(caches: list[dict]) -> dict:
        """One cache with the rows of several, each right-aligned to the longest: the columns a shorter
        one lacks are zeros on the left, which the caller's mask leaves out."""
        out = {}
        for layer in caches[0]:
            parts = [c[layer] for c in caches]
            n = max(p[2] for p in parts)
            pad = lambda a, m: np.pad(a[:, :, :m], ((0, 0), (0, 0), (n - m, 0), (0, 0)))  # noqa: E731
            out[layer] = tuple(np.concatenate([pad(p[i], p[2]) for p in parts]) for i in (0, 1)) + (n,)
        return out

    @staticmethod
    def columns(cache: dict, below: int, last: int | None = None) -> dict:
        """Copies of the keys and values of the layers below `below`: layer -> (k, v), their last `last`
        columns (all if None)."""
        return {
            layer: tuple(a[:, :, (n - last if last else 0) : n].copy() for a in (k, v))
            for layer, (k, v, n) in cache.items()
            if layer < below
        }

    @staticmethod
    def extend(cache: dict, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Append keys and values computed elsewhere (the original's, for a layer a pass skips)."""
        append_kv(cache, layer, k, v)

    @staticmethod
    def select(cache: dict, rows) -> None:
        """Keep only these batch rows in the KV cache (finished rows leave the batch)."""
        for layer, (k, v, n) in cache.items():
            cache[layer] = (k[rows], v[rows], n)

    def forward(
        self,
        ids,
        mask,
        pos,
        cache: dict | None,
        edits: Edits | None,
        last: int | None = 1,
        start: int = 0,
        x: np.ndarray | None = None,
        trace: dict | None = None,
        known: tuple | None = None,
    ):
        """Logits [B, last, V] of the last `last` positions (all if None). `cache` (layer -> (k, v))
        holds the past and is extended in place; mask covers past + new tokens. With `start` > 0 the
        pass begins at that layer from `x`, the residual stream entering it (layers before it are
        neither run nor cached here). `trace` (layer -> None) gets the residual entering each of its
        layers. `known` = (rows, x, kv): only those rows resume at `start` from x, the keys/values of the
        layers before it given (kv: layer -> (k, v)); the other rows run every layer, in one batch
        with them from `start` on."""
        edits = edits or Edits([{}] * self.n_layers, {}, None)  # cache None: a one-off forward, nothing kept
        ops = EditOps(self.top, mask, pos, cache, edits.top, edits.head, edits.head_weight)
        if known is not None:  # some rows resume at `start`; the others run the layers before it
            x = self._below(ids, mask, pos, cache, edits, start, known)
        elif not start:
            x = fw.embed(ops, self.spec, self.hp, ids, pos)
        assert x is not None, "a pass that starts at a layer needs the residual entering it"
        for layer in range(start, self.n_layers):
            if trace is not None and layer in trace:
                trace[layer] = x
            ops = EditOps(self.blocks[layer], mask, pos, cache, edits.blocks[layer])
            x = fw.block(ops, self.spec, self.hp, x, layer)
        if last is not None:
            x, pos = x[:, -last:], pos[:, -last:]
        ops = EditOps(self.top, mask, pos, cache, edits.top, edits.head, edits.head_weight)
        return fw.head(ops, self.spec, self.hp, x)


class EditOps(NumpyOps):
    """NumpyOps with a KV cache and writers' outputs projected as their edited weights would write."""

    def __init__(self, weights, mask, pos, cache, edits, head=None, head_weight=None):
        super().__init__(weights, mask, pos)
        self.cache, self.edits, self.head, self.head_weight = cache, edits, head, head_weight

    @staticmethod
    def _project(y, e: WriterEdit):
        coef = y @ e.u  # [..]
        return y - (F32(e.s) * coef)[..., None] * e.u

    def embedding(self, name, ids):
        x = super().embedding(name, ids)
        e = self.edits.get(name)
        if e is None:
            return x
        x = self._project(x, e)
        if e.col is not None:
            x = x * e.col[ids][..., None]
        if e.row is not None:
            x = x * e.row
        return x

    def linear(self, x, weight, bias, conv1d=False):
        if weight == self.head_weight and self.head is not None:
            return self._head(x, weight)
        e = self.edits.get(weight)
        if e is None:
            return super().linear(x, weight, bias, conv1d)
        if e.col is not None:
            x = x * e.col
        y = super().linear(x, weight, None, conv1d)
        y = self._project(y, e)
        if e.row is not None:
            y = y * e.row
        if bias:
            y = y + (e.bias if e.bias is not None else self.weights[bias])
        return y

    def _head(self, x, weight):
        e = self.head
        if e.row is not None:
            x = x * e.row
        logits = super().linear(self._project(x, e), weight, None, False)
        return logits * e.col if e.col is not None else logits

    def attend(self, q, k, v, layer, scale, softcap, window):
        k, v = self._cached(layer, k, v)  # queries are the last positions of the cached keys
        return super().attend(q, k, v, layer, scale, softcap, window)

    def _cached(self, layer, k, v):
        if self.cache is None:
            return k, v
        return append_kv(self.cache, layer, k, v)


def append_kv(cache: dict, layer: int, k, v):
    """Append to the layer's KV buffers (grown by doubling, not copied every step) and return views of
    the filled part. MLA's broadcast keys are materialised once here."""
    entry = cache.get(layer)
    T = k.shape[2]
    if entry is None or entry[2] + T > entry[0].shape[2]:
        n = 0 if entry is None else entry[2]
        cap = max(2 * (n + T), n + T + 64)
        kb = np.empty((k.shape[0], k.shape[1], cap, k.shape[3]), F32)
        vb = np.empty((v.shape[0], v.shape[1], cap, v.shape[3]), F32)
        if entry is not None:
            kb[:, :, :n], vb[:, :, :n] = entry[0][:, :, :n], entry[1][:, :, :n]
        entry = [kb, vb, n]
    kb, vb, n = entry
    kb[:, :, n : n + T], vb[:, :, n : n + T] = k, v
    cache[layer] = (kb, vb, n + T)
    return kb[:, :, : n + T], vb[:, :, : n + T]


class SubsetOps(EditOps):
    """EditOps for some rows of a batch whose other rows' keys and values come from elsewhere: each
    layer's new columns are written for every row, attention reads the subset's."""

    def __init__(self, weights, mask, pos, cache, edits, rows, known):
        super().__init__(weights, mask, pos, cache, edits)
        (self.known_rows, self.rows), self.known = rows, known

    def _cached(self, layer, k, v):
        kk, vk = self.known[layer]
        full = []
        for new, given in ((k, kk), (v, vk)):
            a = np.empty((len(self.rows) + len(self.known_rows), *new.shape[1:]), F32)
            a[self.rows], a[self.known_rows] = new, given
            full.append(a)
        kb, vb = append_kv(self.cache, layer, *full)
        return kb[self.rows], vb[self.rows]
