"""What a trial reuses of the original model's own run, so it pays only for the layers its edit reaches.

An edit whose first edited layer is f leaves the residual stream entering layers 0..f unchanged for
as long as the tokens are the original's. So the original's run is kept, per batch:
- a Stem (prompt passes): the residual entering every `stride`-th layer, for the shared prefix and
  the rows, and for generation batches the KV cache after the prompts;
- a Track (greedy decoding): per step, the residual entering each kept layer and the keys/values of
  the layers below the last kept one, for every row still generating, and the tokens it chose.
A trial's prompt pass starts at the last kept layer s <= f; while decoding, a row whose tokens are
still the original's ("on track") runs layers s.. only, the others run every layer.
Kept layers: every `stride`-th, the stride chosen so the kept arrays fit a share of the memory.
Prompts also run in length buckets (left padding within PAD_SLACK of the tokens run).
"""

from dataclasses import dataclass, field

import numpy as np

# what the kept arrays may take: a share of the available memory, capped
STEM_MEMORY_SHARE, STEM_MAX_BYTES = 0.1, 2 << 30
MIN_BUCKET, PAD_SLACK = 128, 0.1  # real tokens a bucket holds before another may start; padding allowed


def kept_layers(n_layers: int, bytes_per_layer: int, available: int) -> set[int]:
    """Every `stride`-th layer (never 0: a pass from the embedding needs nothing kept), as memory allows."""
    budget = max(int(min(STEM_MAX_BYTES, STEM_MEMORY_SHARE * available)), 1)
    stride = max(1, -(-bytes_per_layer * n_layers // budget))
    return set(range(stride, n_layers, stride))


def start_layer(kept, first_layer: int) -> int:
    """The last kept layer at or before the first edited one (0: run from the embedding)."""
    return max((layer for layer in kept if layer <= first_layer), default=0)


@dataclass
class Stem:
    """The original model on one prompt batch: the residual stream entering each kept layer, for the
    shared prefix (if any) and the rows, and its KV cache after the prompts when the batch generates."""

    prefix: dict = field(default_factory=dict)  # layer -> [1, c, d]
    rows: dict = field(default_factory=dict)  # layer -> [B, T, d]
    kv: dict | None = None  # layer -> (k, v) of the layers below the last kept one

    def start(self, first_layer: int, needs_kv: bool) -> int:
        if needs_kv and self.kv is None:
            return 0
        return start_layer(self.rows, first_layer)


def resume_args(start: int, kept: dict | None, record: dict | None, layers: set) -> dict:
    """The engine.forward arguments that start a pass at `start` from a kept residual stream, or
    record the residual entering each of `layers` into `record`."""
    if record is not None:
        record.update(dict.fromkeys(layers))
        return {"trace": record}
    return {"start": start, "x": kept[start]} if start and kept is not None else {}


def buckets(lengths: list[int]) -> list[slice]:
    """Runs of rows (lengths ascending) whose left padding stays within PAD_SLACK of the tokens run: a
    new run starts when the next row would pad more and the current one already holds MIN_BUCKET real
    tokens (smaller matrix products run slower per token)."""
    out, start, real = [], 0, 0
    for i, n in enumerate(lengths):
        if real >= MIN_BUCKET and (real + n) < (1 - PAD_SLACK) * n * (i - start + 1):
            out.append(slice(start, i))
            start, real = i, 0
        real += n
    return out + [slice(start, len(lengths))] if lengths else out


@dataclass
class Track:
    """The original's greedy decoding of one generation batch."""

    tokens: list = field(default_factory=list)  # per batch row: the tokens it generated
    steps: list = field(default_factory=list)  # per step: (rows [a] ascending, {layer: x}, {layer: (k, v)})


@dataclass
class Group:
    """Rows of a generation batch decoding together: batch-local ids, KV cache, mask, next positions."""

    ids: np.ndarray
    cache: dict
    mask: np.ndarray
    pos: np.ndarray

    def keep(self, engine, j: np.ndarray) -> None:
        if len(j) < len(self.ids):
            self.ids, self.mask, self.pos = self.ids[j], self.mask[j], self.pos[j]
            engine.select(self.cache, j)


class Decoding:
    """One generation batch decoding greedily, one token per step. With the original's Track and a
    start layer > 0, rows still on track (every token so far the original's) resume at the start
    layer from the original's residual, the skipped layers' keys/values being the original's; a row
    leaves the track the step its token differs (or the Track ends) and then runs every layer. All
    rows run the layers from the start one together. With `record` (the original itself), every
    step's residuals and keys/values are kept into it."""

    def __init__(self, engine, edits, logits, group: Group, track=None, start=0, record=None, kept=()):
        self.engine, self.edits, self.logits, self.g = engine, edits, logits, group
        self.track, self.start, self.record, self.kept = track, start, record, kept
        self.on = np.full(len(group.ids), track is not None and start > 0)

    @property
    def alive(self) -> np.ndarray:
        return self.g.ids

    def _on_track(self, step: int, ids, tok) -> np.ndarray:
        t = self.track
        if t is None or step >= len(t.steps):
            return np.zeros(len(ids), bool)
        return np.array([step < len(t.tokens[r]) and t.tokens[r][step] == k for r, k in zip(ids, tok)], bool)

    def advance(self, step: int, keep: np.ndarray, tok: np.ndarray) -> None:
        """Keep the rows at `keep` (indices into alive), run each one's token (tok: aligned with alive)
        and set `logits` for the rows then alive."""
        g = self.g
        g.keep(self.engine, keep)
        tok = tok[keep]
        self.on = self.on[keep] & self._on_track(step, g.ids, tok)
        g.mask = np.concatenate([g.mask, np.ones((len(g.ids), 1), np.int64)], 1)
        kw: dict = {}
        if self.on.any():
            rows, xs, kvs = self.track.steps[step]
            on = np.flatnonzero(self.on)
            idx = np.searchsorted(rows, g.ids[on])
            kv = {layer: (kvs[layer][0][idx], kvs[layer][1][idx]) for layer in range(self.start)}
            kw = {"start": self.start, "known": (on, xs[self.start][idx], kv)}
        if self.record is not None:
            kw["trace"] = dict.fromkeys(self.kept)
        self.logits = self.engine.forward(tok[:, None], g.mask, g.pos, g.cache, self.edits, **kw)[:, -1]
        if self.record is not None:  # this step's keys and values: the newest column of each layer
            kv = self.engine.columns(g.cache, max(self.kept, default=0), last=1)
            self.record.steps.append((g.ids.copy(), kw["trace"], kv))
        g.pos = g.pos + 1
