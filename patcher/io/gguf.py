"""GGUF files (llama.cpp): read memory-mapped with the `gguf` package after our own bounds checks, and write
streaming (metadata and untouched tensors copied byte for byte, edited tensors produced block by block).
What needs the architecture tables (the HF config, the HF-named view, the vocabulary as a tokenizer)
is the model layer's: patcher/model/gguf.py and patcher/model/gguf_tokenizer.py.

Shapes: GGUF lists ne0 first (the contiguous axis); numpy shapes here are ne reversed, so an HF
nn.Linear [out, in] is numpy [out, in] in GGUF as well (GGUF ne [in, out]).
"""

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patcher.errors import CheckpointError
from patcher.io.gguf_header import MAGIC, GGUFHeader, TensorEntry
from patcher.io.safetensors import TensorInfo
from patcher.io.storage import TensorTable

PROVENANCE_KEY = "patcher.edit"
_ALIGNMENT = 32

# HF config keys from GGUF metadata keys (`{arch}.` + suffix), as llama.cpp's converter writes them.
CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "layer_norm_eps": "attention.layer_norm_epsilon",
    "layer_norm_epsilon": "attention.layer_norm_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "num_experts": "expert_count",
    "num_local_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
    "sliding_window": "attention.sliding_window",
    "sliding_window_pattern": "attention.sliding_window_pattern",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "norm_topk_prob": "expert_weights_norm",
}
# bits per element of each GGML family (the name before "_"), for the quantization-noise bound in diff
QUANT_BITS = {
    "F16": 11,
    "BF16": 8,
    "Q8": 8,
    "Q6": 6,
    "Q5": 5,
    "Q4": 4,
    "Q3": 3,
    "Q2": 2,
    "IQ4": 4,
    "IQ3": 3,
    "IQ2": 2,
    "IQ1": 1,
    "TQ2": 2,
    "TQ1": 1,
    "MXFP4": 4,
}


@dataclass(frozen=True)
class GGUFTensor(TensorInfo):
    """A safetensors-like tensor entry: dtype is the GGML type name (F32, F16, BF16, Q8_0, Q4_K, ...),
    shape in numpy order (GGUF's ne reversed)."""

    qtype: int

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


def is_gguf(path) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == MAGIC
    except OSError:
        return False


class GGUFFile(TensorTable[GGUFTensor]):
    """One GGUF file, lazily: header parsed by patcher.io.gguf_header, tensors memory-mapped, metadata
    arrays (the vocabulary) decoded when first read, nothing dequantized until asked. The reader half
    of patcher.io.storage.Storage; patcher.model.gguf.GGUFStorage adds what the architecture tables
    know (model_type, the HF config, the tokenizer)."""

    format = "gguf"
    names = "gguf"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.folder = self.path.parent
        self.index_path = None
        if not self.path.is_file():
            raise CheckpointError(self.path, "no such file")
        self.header = h = GGUFHeader(self.path)
        self.data = h.data
        self.alignment = h.alignment
        self.data_offset = h.data_offset
        self.metadata = h.metadata
        self.tensors: dict[str, GGUFTensor] = {}
        for t in h.tensors:
            self._add_tensor(t, h.size)
        self._check_overlaps()
        self.files = {self.path.name: self}
        self.shard_of = {n: self.path.name for n in self.tensors}
        self.config_path = self.path
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(self.path, "no general.architecture in the GGUF metadata")
        self.gguf_arch: str = arch

    def _add_tensor(self, t: TensorEntry, size: int) -> None:
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES

        try:
            kind = GGMLQuantizationType(t.qtype)
        except ValueError:
            raise CheckpointError(self.path, f"tensor {t.name!r} has unknown GGML type {t.qtype}") from None
        block, type_size = GGML_QUANT_SIZES[kind]
        if any(n <= 0 for n in t.ne) or t.ne[0] % block:
            raise CheckpointError(
                self.path,
                f"tensor {t.name!r} has shape {list(t.ne)} (ne0 must be a multiple of {block} for "
                f"{kind.name})",
            )
        nbytes = math.prod(t.ne) // block * type_size
        begin = self.data_offset + t.offset
        if t.offset % self.alignment or begin + nbytes > size:
            raise CheckpointError(
                self.path,
                f"tensor {t.name!r} at bytes {begin}..{begin + nbytes} lies "
                f"outside the {size}-byte file or off its alignment",
            )
        if t.name in self.tensors:
            raise CheckpointError(self.path, f"tensor {t.name!r} appears twice")
        self.tensors[t.name] = GGUFTensor(
            t.name, kind.name, tuple(reversed(t.ne)), self.path, begin, begin + nbytes, t.qtype
        )

    def _check_overlaps(self):
        spans = sorted((t.begin, t.end, t.name) for t in self.tensors.values())
        for (_b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(self.path, f"tensors {n0!r} and {n1!r} overlap")

    # --- what the rest of patcher asks a checkpoint -------------------------------------------
    def file_of(self, name: str) -> "GGUFFile":
        self.info(name)
        return self

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes, [rows, row bytes] (a memory-mapped view)."""
        t = self.info(name)
        rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
        return self.data[t.begin : t.end].reshape(rows, -1)

    def read_rows(self, name: str, row_start: int, row_stop: int, row_len: int | None = None) -> np.ndarray:
        """Dequantized float32 rows [stop-start, ne0] of the tensor seen as 2-D."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.info(name)
        rows = np.array(self.raw(name)[row_start:row_stop])
        return np.asarray(dequantize(rows, GGMLQuantizationType(t.qtype)), dtype=np.float32)

    def array(self, name: str, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Dequantized float32 copy in numpy shape (rows along the first axis)."""
        t = self.info(name)
        if row_start or row_stop is not None:
            stop = t.shape[0] if row_stop is None else row_stop
            per = math.prod(t.shape[1:-1]) if len(t.shape) > 2 else 1
            rows = self.read_rows(name, row_start * per, stop * per)
            return rows.reshape(stop - row_start, *t.shape[1:])
        return self.read_rows(name, 0, self.raw(name).shape[0]).reshape(t.shape)

    def release(self, name: str) -> None:
        t = self.info(name)  # drop the pages it touched: a big model streams through without filling RAM
        self.header.madvise_dontneed(t.begin, t.end)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Only the rows a batch needs (an embedding): a 128k-token table is never dequantized whole."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.info(name)
        rows = np.array(self.raw(name)[ids.reshape(-1)])
        return np.asarray(dequantize(rows, GGMLQuantizationType(t.qtype)), dtype=np.float32).reshape(
            *ids.shape, -1
        )

    def quant_floor(self, name: str, values: np.ndarray) -> float | None:
        """A bound on the energy storage rounding adds to these values: per 32-element block, a grid step
        of (max − min)/(levels − 1) gives step²/12 per element for nearest rounding; doubled, since
        rounding that keeps an ablation may choose the farther neighbour (≤ 1.25× the error)."""
        bits = QUANT_BITS.get(self.info(name).dtype.split("_")[0])
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if bits is None or v.size % 32:
            return 0.0
        b = v.reshape(-1, 32)
        step = (b.max(axis=1) - b.min(axis=1)) / (2**bits - 1)
        return float(2.0 * 32 * np.sum(step**2) / 12.0)

    @property
    def input_paths(self) -> list[Path]:
        return [self.path]

    def input_files(self) -> list[Path]:
        return [self.path]

    def shard_tensors(self, fname: str) -> list[GGUFTensor]:
        return sorted(self.tensors.values(), key=lambda t: t.begin)

    def field_bytes(self) -> list[tuple[str, bytes]]:
        """Every metadata key/value exactly as stored, in file order."""
        return [(key, self.header.field_bytes(key)) for key in self.metadata]

    def tokens(self) -> list[str]:
        return list(self.metadata.get("tokenizer.ggml.tokens") or [])

    @property
    def vocab_size(self) -> int:
        """Entries in tokenizer.ggml.tokens, without decoding them."""
        return self.metadata.count("tokenizer.ggml.tokens")

    def close(self):
        self.data = None
        self.header.close()


# --- writing ------------------------------------------------------------------------------------------


@dataclass
class OutTensorGGUF:
    """One tensor of the output: raw bytes copied from `source` (a GGUFTensor), or produced."""

    name: str
    qtype: int
    ne: tuple[int, ...]
    nbytes: int
    source: GGUFTensor | None = None
    produce: Callable[[], Iterable[np.ndarray]] | None = None


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def string_field(key: str, value: str) -> bytes:
    return _gguf_string(key) + struct.pack("<I", 8) + _gguf_string(value)  # 8 = GGUFValueType.STRING


def write_gguf(
    path: Path,
    fields: list[bytes],
    tensors: list[OutTensorGGUF],
    alignment: int = _ALIGNMENT,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """GGUF v3: header, the given key/value records (already encoded), tensor infos, then each tensor's
    data at an aligned offset. Copies use the kernel (copy_file_range) like the safetensors writer."""
    from patcher.io.writer import _copy_range, _pwrite_all, _start_writeback

    infos, offsets, pos = [], [], 0
    for t in tensors:
        offsets.append(pos)
        infos.append(
            _gguf_string(t.name)
            + struct.pack("<I", len(t.ne))
            + struct.pack(f"<{len(t.ne)}Q", *t.ne)
            + struct.pack("<IQ", t.qtype, pos)
        )
        pos += t.nbytes + (-t.nbytes % alignment)
    header = MAGIC + struct.pack("<IQQ", 3, len(tensors), len(fields)) + b"".join(fields) + b"".join(infos)
    header += b"\0" * (-len(header) % alignment)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sources: dict[Path, int] = {}
    try:
        _pwrite_all(fd, header, 0)
        os.ftruncate(fd, len(header) + pos)
        for t, off in zip(tensors, offsets):
            at = len(header) + off
            if t.source is not None:
                if t.source.file not in sources:
                    sources[t.source.file] = os.open(t.source.file, os.O_RDONLY)
                _copy_range(sources[t.source.file], fd, t.source.begin, at, t.nbytes)
                written = t.nbytes
                if on_bytes:
                    on_bytes(written)
            else:
                if t.produce is None:
                    raise ValueError(f"{t.name}: an output tensor needs a source or a produce function")
                written = 0
                for block in t.produce():
                    data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
                    _pwrite_all(fd, data, at + written)
                    written += data.nbytes
                    if on_bytes:
                        on_bytes(data.nbytes)
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: produced {written} bytes, header says {t.nbytes}")
            _start_writeback(fd, at, t.nbytes)
    finally:
        for sfd in sources.values():
            os.close(sfd)
        os.close(fd)


def provenance(g: GGUFFile) -> dict | None:
    text = g.metadata.get(PROVENANCE_KEY)
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return {"raw": text}
