"""A model checkpoint: a folder (single or sharded safetensors) or one .safetensors file.

Everything is lazy: opening reads headers only; tensors are memory-mapped views on demand.
"""

import json
import os
from pathlib import Path, PurePosixPath

import numpy as np

from patcher.errors import CheckpointError, PatcherError
from patcher.io.safetensors import SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PICKLE_MSG = (
    "PyTorch pickle checkpoints are refused: unpickling can run arbitrary code. "
    "Convert to safetensors first (e.g. with the safetensors 'convert' tooling) and point "
    "patcher at that"
)


def _regular(path: Path) -> Path:
    """Only regular files are read: a FIFO or device in place of a shard or config would block forever."""
    from patcher.io.paths import regular_file

    try:
        return regular_file(path)
    except CheckpointError:
        raise
    except PatcherError as e:
        raise CheckpointError(e.where, e.problem) from None


def _load_json(path: Path) -> dict:
    from patcher.io.paths import MAX_SIDE_FILE, regular_file

    _regular(path)
    try:
        regular_file(path, "JSON file", MAX_SIDE_FILE)
    except PatcherError as e:
        raise CheckpointError(e.where, e.problem) from None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(path, f"cannot parse JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def _safe_shard_name(index_path: Path, folder: Path, name) -> Path:
    """A weight_map file name is untrusted: it must be a plain file name in the folder itself (no `..`,
    no absolute path, no subfolder). The file under that name may be a symlink: the Hugging Face cache
    makes every snapshot file a link to ../../blobs/<sha256>, and what is read is what the user chose."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(index_path, f"weight_map file name {name!r} is not a string")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (
        Path(name).is_absolute()
        or name.startswith(("/", "\\"))
        or ".." in parts
        or ":" in name
        or name in (".", "")
    ):
        raise CheckpointError(index_path, f"weight_map file name {name!r} escapes the model folder")
    if len(parts) != 1:
        raise CheckpointError(
            index_path, f"weight_map file name {name!r}: shards must sit in the model folder itself"
        )
    return folder / name


# --- FP8 block scales: the one naming rule (edits, execution, export and diff all use it) ----------
FP8_WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2")
# DeepSeek-V3 / Qwen3-FP8 store `<weight>_scale_inv`, compressed-tensors `<weight>_scale`; same meaning
FP8_SCALE_SUFFIXES = ("_scale_inv", "_scale")


def fp8_scale_of(tensors, name: str) -> str | None:
    """The block-scale tensor of FP8 weight `name`; None when `name` is not an FP8 weight or (per-tensor
    FP8, unsupported by the edits) has no scale. `tensors` maps names to TensorInfo."""
    info = tensors.get(name)
    if info is None or info.dtype not in FP8_WEIGHT_DTYPES:
        return None
    return next((name + s for s in FP8_SCALE_SUFFIXES if name + s in tensors), None)


def fp8_weight_of(tensors, name: str) -> str | None:
    """The FP8 weight whose block scale `name` is, or None: a tensor is a scale only beside its weight."""
    for suffix in FP8_SCALE_SUFFIXES:
        if name.endswith(suffix) and fp8_scale_of(tensors, name[: -len(suffix)]) == name:
            return name[: -len(suffix)]
    return None


class Checkpoint:
    """Lazy view of a checkpoint. `files` keeps shard order; `tensors` maps name -> TensorInfo."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.index_path: Path | None = None
        self.config_path = self.folder / "config.json"
        self.config: dict = {}
        if not self.path.exists():
            raise CheckpointError(self.path, "no such file or folder")
        shard_paths = self._locate()
        self.files: dict[str, SafetensorsFile] = {p.name: SafetensorsFile(p) for p in shard_paths}
        self.tensors: dict[str, TensorInfo] = {}
        self.shard_of: dict[str, str] = {}
        for fname, sf in self.files.items():
            for tname, info in sf.tensors.items():
                if tname in self.tensors:
                    raise CheckpointError(sf.path, f"tensor {tname!r} also appears in {self.shard_of[tname]}")
                self.tensors[tname] = info
                self.shard_of[tname] = fname
        if self.index_path is not None:
            self._check_index_matches()
        if self.path.is_dir() and os.path.lexists(self.folder / "config.json"):
            self.config = _load_json(self.folder / "config.json")

    @property
    def input_paths(self) -> list[Path]:
        """Everything this checkpoint reads, for the rule that no output lands on or in an input: the
        file or folder, and the real folders of files that are symlinks (a hub cache's blobs)."""
        paths = [self.path]
        side = [q for q in self.folder.iterdir()] if self.path.is_dir() else []
        for q in [*(f.path for f in self.files.values()), *side]:
            if q.is_symlink():
                parent = q.resolve().parent
                if parent not in paths:
                    paths.append(parent)
        return paths

    def _locate(self) -> list[Path]:
        p = self.path
        if not p.is_dir():
            _regular(p)
        if p.is_file():
            if p.suffix in PICKLE_SUFFIXES:
                raise CheckpointError(p, _PICKLE_MSG)
            if p.suffix != ".safetensors":
                raise CheckpointError(p, "not a .safetensors file or a model folder")
            return [p]
        if os.path.lexists(p / INDEX_NAME):
            self.index_path = p / INDEX_NAME
            index = _load_json(self.index_path)
            wm = index.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(self.index_path, "missing or empty 'weight_map'")
            self.weight_map = {}
            names = []
            for tname, fname in wm.items():
                path = _safe_shard_name(self.index_path, p, fname)
                if os.path.lexists(path) and not path.is_file():
                    _regular(path)
                if not path.is_file():
                    raise CheckpointError(
                        self.index_path, f"tensor {tname!r} is mapped to {fname!r}, which does not exist"
                    )
                self.weight_map[tname] = path.name
                if path not in names:
                    names.append(path)
            return sorted(names, key=lambda q: q.name)
        if (p / SINGLE_NAME).is_file():
            return [p / SINGLE_NAME]
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if len(found) > 1:
            raise CheckpointError(
                p, f"{len(found)} .safetensors files but no {INDEX_NAME} to say how they fit together"
            )
        if any(q.suffix in PICKLE_SUFFIXES for q in p.iterdir()):
            raise CheckpointError(p, _PICKLE_MSG)
        raise CheckpointError(p, "no model.safetensors, index, or .safetensors file in this folder")

    def _check_index_matches(self):
        for tname, fname in self.weight_map.items():
            if self.shard_of.get(tname) != fname:
                raise CheckpointError(
                    self.folder / fname,
                    f"tensor {tname!r} is listed in the index but missing from this shard",
                )

    # --- access ------------------------------------------------------------------------------
    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(self.path, f"no tensor named {name!r}") from None

    def file_of(self, name: str) -> SafetensorsFile:
        self.info(name)  # a clear error for unknown names
        return self.files[self.shard_of[name]]

    def array(self, name: str, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Zero-copy view (rows along the first axis)."""
        return self.file_of(name).array(self.info(name), row_start, row_stop)

    def read_rows(self, name: str, row_start: int, row_stop: int, row_len: int | None = None) -> np.ndarray:
        """Fresh 2-D copy of rows of the tensor seen as [numel/row_len, row_len] (pread, for streaming)."""
        return self.file_of(name).read_rows(self.info(name), row_start, row_stop, row_len)

    def release(self, name: str) -> None:
        self.file_of(name).release(self.info(name))

    def shard_tensors(self, fname: str) -> list[TensorInfo]:
        """Tensors of one shard in file order."""
        return sorted(self.files[fname].tensors.values(), key=lambda t: t.begin)

    def close(self):
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
