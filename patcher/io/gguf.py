"""GGUF files (llama.cpp): read memory-mapped with the `gguf` package after our own bounds checks, and write
streaming (metadata and untouched tensors copied byte for byte, edited tensors produced block by block).

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

from patcher.errors import CheckpointError, PatcherError
from patcher.io.gguf_header import MAGIC, GGUFHeader, TensorEntry
from patcher.io.gguf_pretokenizers import lookup, pre_tokenizer
from patcher.io.safetensors import TensorInfo

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


class GGUFFile:
    """One GGUF file, lazily: header parsed by patcher.io.gguf_header, tensors memory-mapped, metadata
    arrays (the vocabulary) decoded when first read, nothing dequantized until asked. Offers the
    Checkpoint interface the planner and inspect use (tensors, info, array, shard_of, files)."""

    is_gguf = True

    def __init__(self, path):
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
        self.gguf_arch = self.metadata.get("general.architecture")
        if not isinstance(self.gguf_arch, str):
            raise CheckpointError(self.path, "no general.architecture in the GGUF metadata")
        self._arch = None
        self._config = None

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
    @property
    def architecture(self):
        if self._arch is None:
            from patcher.model.architectures import for_gguf_arch

            self._arch = for_gguf_arch(self.gguf_arch, self.path)
        return self._arch

    @property
    def model_type(self) -> str:
        return self.architecture.model_type

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = config_from_metadata(self)
        return self._config

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def metadata_meta(self) -> dict:
        return {}

    def info(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(self.path, f"no tensor named {name!r}") from None

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
        from gguf.quants import dequantize

        t = self.info(name)
        return np.asarray(dequantize(np.array(self.raw(name)[row_start:row_stop]), t.qtype), dtype=np.float32)

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

    def shard_tensors(self, fname: str) -> list[GGUFTensor]:
        return sorted(self.tensors.values(), key=lambda t: t.begin)

    def field_bytes(self) -> list[tuple[str, bytes]]:
        """Every metadata key/value exactly as stored, in file order."""
        return [(key, self.header.field_bytes(key)) for key in self.metadata]

    def tokenizer(self):
        return load_tokenizer(self)

    def tokens(self) -> list[str]:
        return list(self.metadata.get("tokenizer.ggml.tokens") or [])

    @property
    def vocab_size(self) -> int:
        """Entries in tokenizer.ggml.tokens, without decoding them."""
        return self.metadata.count("tokenizer.ggml.tokens")

    def close(self):
        self.data = None
        self.header.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def config_from_metadata(g: GGUFFile) -> dict:
    """An HF-style config.json dict from GGUF metadata, so one hyperparameter reader serves both."""
    arch, md = g.gguf_arch, g.metadata
    table = g.architecture
    cfg: dict = {"model_type": table.model_type}
    pattern = md.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):  # per-layer flags, as llama.cpp also accepts
        cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    if md.get(f"{arch}.rope.freq_base_swa") is not None:
        cfg["rope_local_base_freq"] = md[f"{arch}.rope.freq_base_swa"]
    for hf, key in CONFIG_KEYS.items():
        v = md.get(f"{arch}.{key}")
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None  # per-layer arrays (some models): the first layer's value
        if v is not None:
            cfg[hf] = v
    for need in ("hidden_size", "num_hidden_layers"):
        if need not in cfg:
            raise CheckpointError(g.path, f"GGUF metadata lacks {arch}.{CONFIG_KEYS[need]}")
    cfg[table.config_layers] = cfg["num_hidden_layers"]
    cfg[table.config_d_model] = cfg["hidden_size"]
    heads, derived = cfg.get("num_attention_heads"), {}
    if heads:
        cfg.setdefault("n_head", heads)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        rope_dim = md.get(f"{arch}.rope.dimension_count")
        if rope_dim and head_dim and int(rope_dim) != int(head_dim):
            cfg["partial_rotary_factor"] = int(rope_dim) / int(head_dim)
        derived["head_dim"] = head_dim
    kind, factor = md.get(f"{arch}.rope.scaling.type"), md.get(f"{arch}.rope.scaling.factor")
    if kind and kind != "none" and factor:
        cfg["rope_scaling"] = {"rope_type": kind, "factor": float(factor)}
    emb = g.tensors.get("token_embd.weight")
    if emb is not None:
        cfg["vocab_size"] = emb.shape[0]
    cfg["tie_word_embeddings"] = "output.weight" not in g.tensors
    known = {**cfg, **derived}
    for key, source in table.gguf_layout.config.items():  # what the table says GGUF leaves out
        if source in known:
            cfg.setdefault(key, known[source])
    if "num_experts" in cfg:  # layers without fused experts are dense (GGUF has no config flag for it)
        cfg["mlp_only_layers"] = [
            l
            for l in range(int(cfg["num_hidden_layers"]))
            if f"blk.{l}.ffn_down_exps.weight" not in g.tensors
        ]
        cfg["decoder_sparse_step"] = 1
    cfg["_gguf"] = {"arch": arch, "name": md.get("general.name")}
    return cfg


# --- the same model under HF names, for the forward pass ------------------------------------------


class HFView:
    """A GGUF seen as the HF checkpoint it was converted from: HF tensor names, HF shapes, float32 values,
    the converter's transforms undone (q/k rope permutation, norm gains stored as 1 + w, GPT-2 Conv1D
    transposes). Names come from the gguf package's own TensorNameMap, the map convert_hf_to_gguf uses."""

    def __init__(self, g: GGUFFile):
        from patcher.io.safetensors import TensorInfo
        from patcher.model import forward as fw

        self.g = g
        self.path, self.folder, self.config = g.path, g.folder, g.config
        self.config_path, self.index_path = g.path, None
        self.model_type = g.model_type
        self.spec = g.architecture.forward
        self.hp = fw.hyper(self.spec, self.config)
        self.map: dict[str, tuple[str, int | None]] = _hf_map(g, self.spec, self.hp)  # hf -> (gguf, expert)
        self.tensors = {}
        for hf, (name, expert) in self.map.items():
            shape = g.info(name).shape[1:] if expert is not None else g.info(name).shape
            if self._transposed(hf, shape):
                shape = tuple(reversed(shape))
            self.tensors[hf] = TensorInfo(hf, "F32", tuple(shape), g.path, 0, 4 * math.prod(shape))
        self.files = {g.path.name: g}
        self.shard_of = {n: g.path.name for n in self.tensors}

    def _transposed(self, hf: str, shape) -> bool:
        return self.spec.conv1d and len(shape) == 2 and hf.endswith(".weight") and ".h." in hf

    def info(self, name):
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(self.path, f"no tensor named {name!r}") from None

    def array(self, name: str, row_start: int = 0, row_stop: int | None = None):
        gname, expert = self.map[name]
        layout = self.g.architecture.gguf_layout
        if expert is not None:
            v = self.g.array(gname, expert, expert + 1)[0]
        elif row_start or row_stop is not None:
            v = self.g.array(gname, row_start, row_stop)
        else:
            v = self.g.array(gname)
        if layout.norm_shift and gname.endswith("norm.weight"):
            v = v - np.float32(layout.norm_shift)
        if layout.rope_permuted and gname.endswith(
            ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
        ):
            heads = self.hp.n_heads if "attn_q" in gname else self.hp.n_kv
            v = _unpermute(v, heads)
        if self._transposed(name, v.shape):
            v = np.ascontiguousarray(v.T)
        return v

    def release(self, name: str) -> None:
        self.g.release(self.map[name][0])

    def file_of(self, name: str):
        self.info(name)
        return self.g

    def source_type(self, name: str) -> str:
        return self.g.info(self.map[name][0]).dtype

    def quant_floor(self, name: str, values: np.ndarray) -> float:
        """A bound on the energy storage rounding adds to these values: per 32-element block, a grid step
        of (max − min)/(levels − 1) gives step²/12 per element for nearest rounding; doubled, since
        rounding that keeps an ablation may choose the farther neighbour (≤ 1.25× the error)."""
        bits = QUANT_BITS.get(self.source_type(name).split("_")[0])
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if bits is None or v.size % 32:
            return 0.0
        b = v.reshape(-1, 32)
        step = (b.max(axis=1) - b.min(axis=1)) / (2**bits - 1)
        return float(2.0 * 32 * np.sum(step**2) / 12.0)

    def read_rows(self, name: str, row_start: int, row_stop: int, row_len: int | None = None) -> np.ndarray:
        return self.array(name).reshape(-1, row_len or self.info(name).shape[-1])[row_start:row_stop]

    def shard_tensors(self, fname: str):
        return list(self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def tokenizer(self):
        return load_tokenizer(self.g)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Only the embedding rows a batch needs: a 128k-token table is never dequantized whole."""
        from gguf.quants import dequantize

        gname, _ = self.map[name]
        raw = self.g.raw(gname)
        return np.asarray(
            dequantize(np.array(raw[ids.reshape(-1)]), self.g.info(gname).qtype), dtype=np.float32
        ).reshape(*ids.shape, -1)

    def close(self):
        self.g.close()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute(): rows per head go from (half, 2) interleaved back to (2, half)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_map(g: GGUFFile, spec, hp) -> dict:
    from gguf import MODEL_ARCH_NAMES, TensorNameMap

    arch_id = {v: k for k, v in MODEL_ARCH_NAMES.items()}.get(g.gguf_arch)
    if arch_id is None:
        raise CheckpointError(g.path, f"the gguf package does not know architecture {g.gguf_arch!r}")
    tmap = TensorNameMap(arch_id, hp.n_layers)
    table = g.architecture
    top_prefix = table.prefixes[0]
    out: dict[str, tuple[str, int | None]] = {}
    owner: dict[str, str] = {}  # gguf name -> hf name; a later, more specific spec name wins (phi3 gate_up)

    def put(hf: str, target: tuple):
        if expert_names_of(target) is None and target[0] in owner:
            out.pop(owner[target[0]], None)
        owner[target[0]] = hf
        out[hf] = target

    def expert_names_of(target):
        return target[1]

    def add(hf_base: str, expert_names=None):
        gname = tmap.get_name(hf_base)
        if gname is None:
            return
        for suffix in (".weight", ".bias"):
            if gname + suffix in g.tensors:
                if expert_names is None:
                    put(hf_base + suffix, (gname + suffix, None))
                else:
                    for e, hf in enumerate(expert_names):
                        out[hf + suffix] = (gname + suffix, e)

    n = spec.names
    top = {"embed", "final_norm", "lm_head"}
    for key in top:
        add((top_prefix if key != "lm_head" else "") + n[key])
    if spec.positions:
        add(top_prefix + spec.positions)
    experts = hp.moe.get("experts", 0)
    for layer in range(hp.n_layers):
        lp = top_prefix + table.layers.replace("{layer}", str(layer))
        for key, value in n.items():
            if key in top or "{e}" in value or key.startswith("expert_"):
                continue
            add(lp + value)
        if "experts" in n and experts:
            for part in ("expert_gate", "expert_up", "expert_down"):
                fused = lp + n["experts"].replace(".{e}", "") + "." + n[part]
                add(fused, [lp + n["experts"].format(e=e) + "." + n[part] for e in range(experts)])
    return out


# --- tokenizer ----------------------------------------------------------------------------------------


def load_tokenizer(g: GGUFFile):
    """The GGUF's own vocabulary (tokenizer.ggml.*) as a `tokenizers` BPE, and its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    md = g.metadata
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise PatcherError(g.path, "the GGUF has no vocabulary (tokenizer.ggml.tokens)")
    if kind == "llama":
        return _spm_tokenizer(g, tokens)
    if kind != "gpt2":
        raise PatcherError(
            g.path,
            f"tokenizer.ggml.model {kind!r} is not supported: patcher reads 'gpt2' "
            f"(byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies",
        )
    pre_name = md.get("tokenizer.ggml.pre", "default")  # llama.cpp's choice when the key is absent
    pre = lookup(pre_name, g.path)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizer(pre_name, g.path)
    tok.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type") or []
    specials = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # CONTROL, USER_DEFINED
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    names = _special_names(md, tokens)
    add_bos = md.get("tokenizer.ggml.add_bos_token", True if pre.add_bos else None)
    return _prompt_tokenizer(g, tok, names, vocab, add_bos)


def _prompt_tokenizer(g: GGUFFile, tok, names: dict, vocab: dict, add_bos):
    """Both vocabulary kinds end alike: BOS prepended when the file asks for it, the special-token names,
    the chat template; add_bos None means the file does not say."""
    from tokenizers import processors

    from patcher.model.prompts import PromptTokenizer

    if add_bos and "bos_token" in names:
        bos = names["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    template = g.metadata.get("tokenizer.chat_template")
    return PromptTokenizer(
        tok,
        g.path,
        names,
        template if isinstance(template, str) else None,
        g.path,
        None if add_bos is None else bool(add_bos),
    )


def _special_names(md: dict, tokens: list) -> dict:
    names = {}
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("pad_token", "padding"),
        ("unk_token", "unknown"),
    ):
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            names[name] = tokens[i]
    return names


def _spm_tokenizer(g: GGUFFile, tokens: list):
    """A SentencePiece-BPE vocabulary (tokenizer.ggml.model 'llama': tokens, scores, token types) as a
    `tokenizers` BPE: merges ranked by the score of the merged piece (llama.cpp merges the best-scoring
    bigram first), '▁' for spaces with a leading one (add_space_prefix), <0xXX> byte fallback."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    md = g.metadata
    scores = list(md.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(md.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, t in enumerate(tokens):
        if types[i] != 1 or len(t) < 2:  # NORMAL pieces only: specials and <0xXX> bytes never merge
            continue
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in vocab and b in vocab:
                merges.append((-float(scores[i]), i, a, b))
    merges = [(a, b) for *_, a, b in sorted(merges)]
    names = _special_names(md, tokens)
    tok = Tokenizer(
        models.BPE(vocab, merges, byte_fallback=True, unk_token=names.get("unk_token"), fuse_unk=True)
    )
    steps = [normalizers.Replace(" ", "\u2581")]
    if md.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (2, 3, 4)]
    )
    add_bos = md.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for SentencePiece
    return _prompt_tokenizer(g, tok, names, vocab, add_bos)


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
