"""One opened model: every command and recipe step starts here.

`Model.open(source, arch_table)` does, once and in one place: find where the model is (a folder, one
.safetensors file, or a Hugging Face hub repo id resolved offline from the local cache), open its
storage, find the architecture table (bundled, or the user's `--arch-table`), resolve it against the
tensor names, and check the config against the tensors (layer count, d_model; and, for commands that
run the forward pass, the hyperparameters it needs). Problems are one PatcherError each.

Storage is a backend behind one declared interface, patcher.io.storage.Storage: safetensors
(patcher.io.checkpoint.Checkpoint) and GGUF (patcher.model.gguf.GGUFStorage). A new format implements
it and adds a `Backend` to BACKENDS; nothing above this module changes.
"""

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from patcher.errors import PatcherError
from patcher.io.checkpoint import Checkpoint, fp8_scale_of, fp8_weight_of
from patcher.io.safetensors import TensorInfo
from patcher.io.storage import Storage
from patcher.model.architectures import TABLE_DIR, Architecture, Resolved, for_model_type, load_table, resolve
from patcher.model.forward import ForwardSpec, Hyper

FP8_TILE = 128  # block-scale tile (DeepSeek-V3, Qwen3-FP8)


@dataclass(frozen=True)
class Backend:
    """A storage format: `matches(path)` says whether it reads that file or folder, `open(path)`
    opens it as Storage."""

    name: str
    matches: Callable[[Path], bool]
    open: Callable[[Path], Storage]


# first match wins; safetensors (a folder or a .safetensors file) is the fallback and reports its own errors
def _is_gguf(path: Path) -> bool:
    from patcher.io.gguf import is_gguf

    return path.is_file() and is_gguf(path)


def _open_gguf(path: Path) -> Storage:
    from patcher.model.gguf import GGUFStorage

    return GGUFStorage(path)


BACKENDS: list[Backend] = [
    Backend("gguf", _is_gguf, _open_gguf),
    Backend("safetensors", lambda p: True, Checkpoint),
]


def open_storage(path: Path) -> Storage:
    backend = next(b for b in BACKENDS if b.matches(path))
    return backend.open(path)


class Model:
    """A checkpoint with its architecture resolved and its config checked against its tensors.

    It reads as its storage (`m.tensors`, `m.info(name)`, `m.array(name)`, ... are the storage's), and
    adds `arch`, `resolved`, `n_layers`, `d_model`, the forward pass's `hp` and `spec`, the FP8 scale
    rule (`fp8_scale`, `is_scale`, `decode`) and `input_paths` (what no output may touch)."""

    def __init__(
        self,
        storage: Storage,
        *,
        arch_table=None,
        require_arch: bool = True,
        arch_optional: bool = False,
        source=None,
        extra_inputs=(),
    ):
        """`require_arch=False`: no table is fine when config.json has no model_type (inspect);
        `arch_optional=True`: no table is fine at all (diff), `arch_note` says why there is none."""
        self.storage = storage
        self.source = str(source if source is not None else storage.path)
        self._extra_inputs = list(extra_inputs)
        self._hp: Hyper | None = None
        self._spec: ForwardSpec | None = None
        self.arch: Architecture | None = None
        self.resolved: Resolved | None = None
        self.arch_note: str | None = None
        self._check_fp8_scales()
        if arch_table is None and (arch_optional or not require_arch) and not storage.model_type:
            self.arch_note = "no config.json model_type" if storage.config else "no config.json"
            return  # inspect and diff describe what they can without a table
        if arch_table is None and arch_optional and not (TABLE_DIR / f"{storage.model_type}.toml").is_file():
            self.arch_note = f"model_type {storage.model_type!r} has no architecture table"
            return
        if require_arch and not storage.config and storage.path.is_file():
            raise PatcherError(
                storage.path,
                "this needs a model folder with config.json (architecture and "
                "hyperparameters), not a lone .safetensors file",
            )
        arch = load_table(arch_table) if arch_table else for_model_type(storage.model_type, self.config_path)
        if storage.names == "gguf":  # the same table under GGUF names (llama.cpp's), from its [gguf] section
            if arch.gguf is None:
                raise PatcherError(arch.source, "this architecture table has no [gguf] section (GGUF names)")
            arch = arch.gguf
        self.arch = arch
        self.resolved = resolve(arch, storage.tensors, storage.config, self.config_path)
        self._check_against_tensors(self.resolved)

    @classmethod
    def open(
        cls, source, arch_table=None, *, require_arch: bool = True, arch_optional: bool = False
    ) -> "Model":
        """Open a folder, a .safetensors file or a hub repo id (`org/name[@revision]`, cache only)."""
        from patcher.io.hub import locate

        path, extra = locate(source)
        storage = open_storage(path)
        try:
            return cls(
                storage,
                arch_table=arch_table,
                require_arch=require_arch,
                arch_optional=arch_optional,
                source=source,
                extra_inputs=extra,
            )
        except BaseException:
            storage.close()
            raise

    def resolved_as(self, resolved: Resolved) -> "Model":
        """The same model under an already resolved table (callers that resolved it themselves)."""
        if resolved is self.resolved:
            return self
        other = copy.copy(self)
        other.resolved, other.arch = resolved, resolved.arch
        return other

    def with_table(self, arch_table) -> "Model":
        """The same open storage under another architecture table."""
        return Model(self.storage, arch_table=arch_table, source=self.source, extra_inputs=self._extra_inputs)

    def forward_model(self) -> "Model":
        """What the forward pass runs: the model itself, or for a GGUF its HF-named float view."""
        if self.storage.names == "hf":
            return self
        from patcher.model.gguf import GGUFStorage, HFView

        if not isinstance(self.storage, GGUFStorage):
            raise PatcherError(self.path, f"no HF-named view of a {self.storage.format} checkpoint")
        return Model(HFView(self.storage), arch_table=self.table.source, source=self.source)

    # --- the storage interface, delegated ------------------------------------------------------
    path = property(lambda self: self.storage.path)
    folder = property(lambda self: self.storage.folder)
    files = property(lambda self: self.storage.files)
    tensors = property(lambda self: self.storage.tensors)
    shard_of = property(lambda self: self.storage.shard_of)
    config = property(lambda self: self.storage.config)
    index_path = property(lambda self: self.storage.index_path)
    model_type = property(lambda self: self.storage.model_type)
    total_bytes = property(lambda self: self.storage.total_bytes)
    config_path = property(lambda self: self.storage.config_path)
    format = property(lambda self: self.storage.format)

    def tokenizer(self):
        """The model's PromptTokenizer: a GGUF carries its own vocabulary and chat template, a folder has
        tokenizer.json (and tokenizer_config.json / chat_template.jinja)."""
        if self.storage.format == "safetensors":
            from patcher.model.prompts import load_tokenizer

            return load_tokenizer(self.folder)
        return self.storage.tokenizer()

    def info(self, name: str) -> TensorInfo:
        return self.storage.info(name)

    def file_of(self, name):
        return self.storage.file_of(name)

    def array(self, name, row_start: int = 0, row_stop: int | None = None):
        return self.storage.array(name, row_start, row_stop)

    def read_rows(self, name, row_start: int, row_stop: int, row_len: int | None = None):
        return self.storage.read_rows(name, row_start, row_stop, row_len)

    def release(self, name) -> None:
        self.storage.release(name)

    def shard_tensors(self, fname):
        return self.storage.shard_tensors(fname)

    def close(self) -> None:
        self.storage.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def input_paths(self) -> list[Path]:
        """The model's file or folder, the folders its symlinks point into, and (for a hub repo) the
        whole cache entry: no output may be written on, inside or around any of them."""
        paths = list(self.storage.input_paths)
        return paths + [p for p in self._extra_inputs if p not in paths]

    # --- architecture facts ----------------------------------------------------------------------
    def no_injection_slot(self, target: str) -> str:
        """Why an injection at `target` cannot be written: a GGUF's reader (llama.cpp) adds biases only
        where its loader has them; a table without that slot has no bias to write."""
        layout = self.table.gguf_layout
        if self.storage.names == "gguf" and layout is not None:
            return (
                f"llama.cpp's {layout.arch} loader has no bias at the {target} writer; "
                "write the injection as a control vector (--control-vector FILE)"
            )
        return f"{self.table.model_type} has no injection slot for {target!r}"

    @property
    def n_layers(self) -> int:
        return self.resolved.n_layers if self.resolved else self.hp.n_layers

    @property
    def d_model(self) -> int:
        return self.resolved.d_model if self.resolved else self.hp.d_model

    @property
    def table(self) -> Architecture:
        """The architecture table; a model opened without one (inspect, diff) fails here, clearly."""
        if self.arch is None:
            raise PatcherError(self.config_path, f"this needs an architecture table ({self.arch_note})")
        return self.arch

    def _check_against_tensors(self, res: Resolved) -> None:
        """config.json must describe the tensors: a smaller layer count would leave the last layers
        unedited, a larger one crashes later; a wrong d_model would misread every matrix."""
        arch, where = res.arch, self.config_path
        if res.n_layers <= 0:
            raise PatcherError(where, f"{arch.config_layers} must be a positive integer, got {res.n_layers}")
        if res.d_model <= 0:
            raise PatcherError(where, f"{arch.config_d_model} must be a positive integer, got {res.d_model}")
        head, _, tail = (res.prefix + arch.layers).partition("{layer}")
        rx = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
        present = sorted({int(m[1]) for n in self.tensors if (m := rx.match(n))})
        extra = self.config.get("num_nextn_predict_layers")  # DeepSeek-V3's multi-token-prediction layers
        extra = extra if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0 else 0
        have = _ranges(present) if present else "none"
        missing = sorted(set(range(res.n_layers)) - set(present))
        if missing:
            raise PatcherError(
                where,
                f"{arch.config_layers} = {res.n_layers} but the tensors have no layer "
                f"{missing[0]} (layers in the tensors: {have})",
            )
        beyond = [layer for layer in present if layer >= res.n_layers + extra]
        if beyond:
            raise PatcherError(
                where,
                f"{arch.config_layers} = {res.n_layers} but the tensors also hold layer {beyond[0]} "
                f"(layers in the tensors: {have}); an edit would leave it unedited",
            )
        for t in res.targets:
            if t.role == "embed":
                shape = self.info(t.weight).shape
                if len(shape) != 2 or shape[t.residual_axis] != res.d_model:
                    raise PatcherError(
                        where, f"{arch.config_d_model} = {res.d_model} but {t.weight} has shape {list(shape)}"
                    )

    def _check_fp8_scales(self) -> None:
        """A block scale must have one entry per 128x128 tile of its weight, or every reader misplaces it."""
        for name, info in self.tensors.items():
            weight = fp8_weight_of(self.tensors, name)
            w = self.tensors[weight].shape if weight else None
            if weight and w is not None and len(w) == 2:
                want = (-(-w[0] // FP8_TILE), -(-w[1] // FP8_TILE))
                if info.shape != want:
                    raise PatcherError(
                        info.file,
                        f"{name} has shape {list(info.shape)}; the FP8 weight {weight} {list(w)} "
                        f"needs {list(want)} (one scale per {FP8_TILE}x{FP8_TILE} tile)",
                    )

    # --- the forward pass: spec and checked hyperparameters --------------------------------------
    @property
    def spec(self) -> ForwardSpec:
        """The forward pass's description: the [forward] section of the model's table."""
        if self._spec is None:
            if self.arch is None or self.arch.forward is None:
                where = self.arch.source if self.arch else self.config_path
                raise PatcherError(
                    where,
                    "has no [forward] section: the forward pass needs one (add it, or 'extends' "
                    "a table that has one, such as llama)",
                )
            self._spec = self.arch.forward
        return self._spec

    @property
    def hp(self) -> Hyper:
        """Hyperparameters of the forward pass, checked before any work (commands that only edit
        weights never read them)."""
        if self._hp is None:
            self._hp = _checked_hyper(self.config, self.config_path, self.spec)
        return self._hp

    # --- FP8 block scales ------------------------------------------------------------------------
    def fp8_scale(self, name: str) -> str | None:
        return fp8_scale_of(self.tensors, name)

    def is_scale(self, name: str) -> bool:
        """An FP8 weight's block-scale tensor: applied by decode(), never a weight of its own."""
        return fp8_weight_of(self.tensors, name) is not None

    def decode(self, name: str):
        """The whole tensor as float32 (FP8 weights dequantised with their block scales)."""
        import numpy as np
        from patcher_kernels.codecs import decode
        from patcher_kernels.fp8 import dequantize_blocks

        raw = self.array(name)
        scale = self.fp8_scale(name)
        if scale is not None:
            return dequantize_blocks(raw, self.array(scale).astype(np.float32), FP8_TILE)
        return decode(raw)


def as_model(x, arch_table=None, *, require_arch: bool = True) -> Model:
    """A Model from a Model (itself), an open Storage, or what Model.open takes (a path, a repo id)."""
    if isinstance(x, Model):
        return x
    if isinstance(x, (str, os.PathLike)):
        return Model.open(x, arch_table, require_arch=require_arch)
    return Model(x, arch_table=arch_table, require_arch=require_arch)


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(out)


def _positive_int(cfg: dict, keys: tuple[str, ...], where: Path) -> int:
    value = _optional_positive_int(cfg, keys, where)
    if value is None:
        raise PatcherError(
            where, f"has no {' (or '.join(keys)}{')' * (len(keys) - 1)}: the forward pass needs it"
        )
    return value


def _optional_positive_int(cfg: dict, keys: tuple[str, ...], where: Path) -> int | None:
    key = next((k for k in keys if cfg.get(k) is not None), None)
    if key is None:
        return None
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PatcherError(where, f"{key} must be a positive integer, got {value!r}")
    return value


def _checked_hyper(cfg: dict, where: Path, spec: ForwardSpec) -> Hyper:
    from patcher.model import forward as fw
    from patcher.model.numpy_ops import ACTS

    d = _positive_int(cfg, ("hidden_size", "n_embd"), where)
    _positive_int(cfg, ("num_hidden_layers", "n_layer"), where)
    heads = _positive_int(cfg, ("num_attention_heads", "n_head"), where)
    kv = _optional_positive_int(cfg, ("num_key_value_heads",), where) or heads
    head_dim = _optional_positive_int(cfg, ("head_dim",), where)
    if heads % kv:
        raise PatcherError(
            where, f"num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv}"
        )
    if head_dim is None and d % heads:
        raise PatcherError(
            where,
            f"hidden size {d} is not a multiple of num_attention_heads = {heads} (and there is no head_dim)",
        )
    act = next((cfg[k] for k in spec.act_keys if cfg.get(k)), spec.act_default)
    if not isinstance(act, str) or act not in ACTS:
        key = next((k for k in spec.act_keys if cfg.get(k)), spec.act_keys[0])
        raise PatcherError(where, f"{key} = {act!r} is not supported (supported: {', '.join(sorted(ACTS))})")
    try:
        return fw.hyper(spec, cfg)
    except PatcherError:
        raise
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise PatcherError(
            where, f"cannot read the hyperparameters the forward pass needs ({what})"
        ) from None
