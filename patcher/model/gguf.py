"""A GGUF as the model layer sees it: `GGUFStorage` (the reader of patcher/io/gguf.py plus what the
architecture tables know: model_type, an HF config.json, the tokenizer) and `HFView`, the same model
under HF names for the forward pass. Both implement patcher.io.storage.Storage."""

import math
from collections import Counter
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

import numpy as np

from patcher.errors import CheckpointError
from patcher.io.gguf import CONFIG_KEYS, GGUFFile, provenance
from patcher.io.safetensors import TensorInfo
from patcher.io.storage import TensorTable
from patcher.model.architectures import Architecture, GGUFLayout, for_gguf_arch


class GGUFStorage(GGUFFile):
    """One GGUF file as Storage (see patcher.io.gguf.GGUFFile for the reading)."""

    @cached_property
    def architecture(self) -> Architecture:
        return for_gguf_arch(self.gguf_arch, self.path)

    @property
    def layout(self) -> GGUFLayout:
        """The table's [gguf] section (for_gguf_arch finds tables by it, so it is always there)."""
        layout = self.architecture.gguf_layout
        if layout is None:
            raise CheckpointError(self.path, f"{self.architecture.source} has no [gguf] section")
        return layout

    @property
    def model_type(self) -> str:
        return self.architecture.model_type

    @cached_property
    def config(self) -> dict:
        return config_from_metadata(self)

    def tokenizer(self):
        """The GGUF's own vocabulary and chat template as a PromptTokenizer."""
        from patcher.model.gguf_tokenizer import load_tokenizer

        return load_tokenizer(self)

    def side_files(self) -> dict[str, bytes]:
        """config.json and tokenizer files made from the metadata, as `patcher convert` writes them."""
        from patcher.model.gguf_hf import side_files

        return {name: text.encode("utf-8") for name, text in side_files(self).items()}

    def describe(self, roles: Mapping[str, list[str]] | None = None) -> dict:
        """What `inspect` shows of a GGUF: its metadata, the GGML types of each role's weights
        (`roles`: role -> weight names), and the edit that made it (patcher's provenance key)."""
        md = self.metadata
        info = {
            "format": "gguf",
            "gguf_architecture": self.gguf_arch,
            "name": md.get("general.name"),
            "tokenizer": md.get("tokenizer.ggml.model"),
            "vocab": self.vocab_size,
            "chat_template": isinstance(md.get("tokenizer.chat_template"), str),
        }
        if roles is not None:
            info["quant_types_per_role"] = {
                r: dict(Counter(self.info(n).dtype for n in ns)) for r, ns in roles.items()
            }
        prov = provenance(self)
        return {**info, "provenance": prov} if prov else info


def config_from_metadata(g: "GGUFStorage") -> dict:
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
    for key, source in g.layout.config.items():  # what the table says GGUF leaves out
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


class HFView(TensorTable[TensorInfo]):
    """A GGUF seen as the HF checkpoint it was converted from: HF tensor names, HF shapes, float32 values,
    the converter's transforms undone (q/k rope permutation, norm gains stored as 1 + w, GPT-2 Conv1D
    transposes). Names come from the gguf package's own TensorNameMap, the map convert_hf_to_gguf uses."""

    format = "gguf-hf"
    names = "hf"

    def __init__(self, g: GGUFStorage):
        from patcher.model import forward as fw

        self.g = g
        self.path, self.folder, self.config = g.path, g.folder, g.config
        self.config_path, self.index_path = g.path, None
        spec = g.architecture.forward
        if spec is None:
            raise CheckpointError(g.path, f"model_type {g.model_type!r} has no forward description")
        self.spec = spec
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

    def array(self, name: str, row_start: int = 0, row_stop: int | None = None):
        gname, expert = self.map[name]
        layout = self.g.layout
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

    def quant_floor(self, name: str, values: np.ndarray) -> float | None:
        return self.g.quant_floor(self.map[name][0], values)

    def read_rows(self, name: str, row_start: int, row_stop: int, row_len: int | None = None) -> np.ndarray:
        return self.array(name).reshape(-1, row_len or self.info(name).shape[-1])[row_start:row_stop]

    def shard_tensors(self, fname: str):
        return list(self.tensors.values())

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self.g.rows(self.map[name][0], ids)

    # the rest is the GGUF's own
    model_type = property(lambda self: self.g.model_type)
    input_paths = property(lambda self: self.g.input_paths)

    def input_files(self) -> list[Path]:
        return self.g.input_files()

    def side_files(self) -> dict[str, bytes]:
        return self.g.side_files()

    def describe(self, roles: Mapping[str, list[str]] | None = None) -> dict:
        return self.g.describe()

    def tokenizer(self):
        return self.g.tokenizer()

    def close(self):
        self.g.close()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute(): rows per head go from (half, 2) interleaved back to (2, half)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_map(g: GGUFStorage, spec, hp) -> dict:
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
    top = ("embed", "final_norm", "lm_head")  # a tuple: `convert` writes tensors in this order on every run
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
