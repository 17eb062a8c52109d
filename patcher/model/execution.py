"""Layer-streamed execution: a batch goes through block 0, then block 1, ..., with only one block's
weights decoded (float32) at a time. Peak memory ~ one block's weights + one batch's activations."""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, overload

import numpy as np
from patcher_kernels.codecs import decode

from patcher.errors import PatcherError
from patcher.model import forward as fw
from patcher.model.architectures import Resolved
from patcher.model.numpy_ops import NumpyOps
from patcher.model.opened import Model, as_model

ACTIVATION_BUDGET = 512 << 20  # residual streams held at once; beyond it, batches run in chunks


class LazyWeights(dict):
    """Top-level weights decoded on first use: extraction never pays for the unembedding, and an
    embedding lookup decodes only the rows it needs (a 128k-token table stays on disk)."""

    def __init__(self, model: "StreamedModel", names: dict):
        super().__init__()
        self.model, self.names = model, names  # prefix-free name -> checkpoint name

    def __contains__(self, name):
        return name in self.names

    def __missing__(self, name):
        value = self.model._decode(self.names[name])
        self[name] = value
        return value

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        if dict.__contains__(self, name):
            return self[name][ids]
        rows = getattr(self.model.ck.storage, "rows", None)
        if rows is not None:  # a quantized store (GGUF) dequantizes just these rows
            return rows(self.names[name], ids)
        uniq, inverse = np.unique(ids, return_inverse=True)
        table = self.model.ck.array(self.names[name])
        return decode(table[uniq])[inverse.reshape(ids.shape)]


class StreamedModel:
    """A model run block by block with the numpy backend of patcher/model/forward.py. Takes a Model
    (or anything `as_model` opens: a path, a hub repo id, an open checkpoint)."""

    def __init__(self, model: object, arch_table: str | Path | None = None) -> None:
        self.model: Model = as_model(model, arch_table).forward_model()
        self.ck = self.model  # the storage interface, FP8 rule included
        self.model_type = self.model.model_type
        if self.model.resolved is None:  # as_model requires a table: this does not happen
            raise PatcherError(self.model.source, "no architecture table was resolved for this model")
        self.resolved: Resolved = self.model.resolved
        self.spec = self.model.spec
        self.hp = self.model.hp
        self._top: LazyWeights | None = None

    @property
    def n_layers(self) -> int:
        return self.hp.n_layers

    def _decode(self, name: str) -> np.ndarray:
        return self.model.decode(name)

    def is_scale(self, name: str) -> bool:
        return self.model.is_scale(name)

    def _load(self, names: Iterable[str], strip: str) -> dict:
        out = {}
        for name in names:
            if self.is_scale(name):
                continue
            out[name[len(strip) :] if name.startswith(strip) else name] = self._decode(name)
            self.ck.release(name)
        return out

    def top_weights(self) -> LazyWeights:
        """Embeddings, final norm and unembedding, keyed by their prefix-free names, decoded lazily."""
        if self._top is None:
            prefix = self.resolved.prefix
            n = self.spec.names
            wanted = [n["embed"] + ".weight", n["final_norm"] + ".weight", n["final_norm"] + ".bias"]
            if self.spec.positions:
                wanted.append(self.spec.positions + ".weight")
            names = {w: prefix + w for w in wanted if prefix + w in self.ck.tensors}
            if n["lm_head"] + ".weight" in self.ck.tensors:
                names[n["lm_head"] + ".weight"] = n["lm_head"] + ".weight"
            self._top = LazyWeights(self, names)
        return self._top

    def block_weights(self, layer: int) -> dict:
        prefix = self.resolved.layer_prefix(layer)
        return self._load([n for n in self.ck.tensors if n.startswith(prefix)], prefix)

    @overload
    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        on_resid: Callable[[int, np.ndarray], None] | None = None,
        *,
        logits: Literal[True],
        layers: Iterable[int] | None = None,
    ) -> np.ndarray: ...

    @overload
    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        on_resid: Callable[[int, np.ndarray], None] | None = None,
        logits: bool = False,
        layers: Iterable[int] | None = None,
    ) -> np.ndarray | None: ...

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        on_resid: Callable[[int, np.ndarray], None] | None = None,
        logits: bool = False,
        layers: Iterable[int] | None = None,
    ) -> np.ndarray | None:
        """Run one left-padded batch. on_resid(l, resid_pre[l]) is called for l = 0..L (float32
        [B, T, d]); returns the logits if asked. `layers` stops early after the last one needed."""
        cb = (lambda _b, l, x: on_resid(l, x)) if on_resid else None
        out = self.run_many([(input_ids, attention_mask)], cb, logits=logits, layers=layers)
        return out[0] if out is not None else None  # a list exactly when logits were asked

    def run_many(
        self,
        batches: list,
        on_resid: Callable[[int, int, np.ndarray], None] | None = None,
        logits: bool = False,
        layers: Iterable[int] | None = None,
        budget_bytes: int = ACTIVATION_BUDGET,
    ) -> list | None:
        """Run several batches, block by block: every batch held in memory goes through block l before
        block l+1 is decoded, so each block is decoded once per chunk of batches whose activations
        fit in `budget_bytes` (not once per batch). on_resid(batch index, l, resid_pre[l])."""
        results = []
        for chunk in _chunks(batches, self.hp.d_model, budget_bytes):
            results.extend(self._run_chunk(chunk, on_resid, logits, layers))
        return results if logits else None

    def _run_chunk(self, chunk, on_resid, logits, layers):
        states = []
        embed = self.top_weights().names[self.spec.names["embed"] + ".weight"]
        for index, (ids, mask) in chunk:
            ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)
            if ids.max(initial=0) >= self.ck.info(embed).shape[0]:
                raise PatcherError(
                    self.ck.folder, "token id beyond the embedding table: tokenizer and model disagree"
                )
            pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            x = fw.embed(NumpyOps(self.top_weights(), mask, pos), self.spec, self.hp, ids, pos)
            if on_resid:
                on_resid(index, 0, x)
            states.append([index, mask, pos, x])
        last = self.n_layers if logits or layers is None else min(max(layers), self.n_layers)
        for layer in range(last):
            weights = self.block_weights(layer)
            for st in states:
                index, mask, pos, x = st
                try:
                    st[3] = x = fw.block(NumpyOps(weights, mask, pos), self.spec, self.hp, x, layer)
                except ValueError as e:  # numpy's shape errors: the config's sizes do not fit the tensors
                    raise PatcherError(
                        self.ck.config_path,
                        f"block {layer}: the config's sizes do not fit "
                        f"the tensors ({e}); check head_dim, num_attention_heads, "
                        "num_key_value_heads, intermediate_size",
                    ) from None
                if on_resid:
                    on_resid(index, layer + 1, x)
            del weights  # free this block before decoding the next
        if not logits:
            return []
        return [
            fw.head(NumpyOps(self.top_weights(), mask, pos), self.spec, self.hp, x)
            for _, mask, pos, x in states
        ]


def _chunks(batches, d_model: int, budget: int):
    """Consecutive (index, batch) groups whose residual streams (float32, x4 for a block's temporaries)
    fit the budget; a single batch always runs."""
    chunk: list[tuple[int, tuple]] = []
    used = 0
    for index, (ids, mask) in enumerate(batches):
        size = int(np.size(ids)) * d_model * 4 * 4
        if chunk and used + size > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append((index, (ids, mask)))
        used += size
    if chunk:
        yield chunk
