"""Loading and saving directions.

DIRECTION on the command line is `FILE.npy` (a (d_model,) vector, or (k, d_model) for rank k) or
`FILE.safetensors[:LAYER]` in the directions format: tensors `direction`, `positive_mean`,
`negative_mean`, float32 [L+1, d_model] indexed by resid_pre layer, and `__metadata__["patcher"]`
holding JSON with at least `selected_layer` (used when no :LAYER is given).
"""

import hashlib
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from patcher.errors import CheckpointError, PatcherError
from patcher.io.checkpoint import Checkpoint
from patcher.io.jsonsafe import dumps
from patcher.io.paths import regular_file
from patcher.io.writer import OutTensor, write_safetensors

METADATA_KEY = "patcher"


@dataclass
class Direction:
    vectors: np.ndarray  # [k, d_model] float64, as given (not yet normalised)
    source: str  # what the user passed
    layer: int | None  # resid_pre layer it came from, if known
    sha256: str  # of the vectors as float64 bytes: identifies the direction whatever file held it

    @property
    def unit(self) -> np.ndarray:
        return self.vectors / np.linalg.norm(self.vectors, axis=1, keepdims=True)


def digest(v: np.ndarray) -> str:
    """Identifies a direction whatever file held it: sha256 of its float64 bytes."""
    return hashlib.sha256(np.ascontiguousarray(v, dtype="<f8").tobytes()).hexdigest()


def spec_file(spec) -> Path | None:
    """The file a DIRECTION argument names (FILE.npy, FILE.safetensors[:LAYER]), for output checks."""
    if spec is None:
        return None
    m = re.fullmatch(r"(.+\.safetensors)(?::(-?\d+))?", str(spec))
    return Path(m[1]) if m else Path(str(spec))


def load_direction(spec: str, d_model: int | None = None, n_layers: int | None = None) -> Direction:
    """n_layers: the model's; a directions table (one row per resid_pre layer) must match it."""
    m = re.fullmatch(r"(.+\.safetensors)(?::(-?\d+))?", spec)
    if m:
        vectors, layer = _from_safetensors(Path(m[1]), None if m[2] is None else int(m[2]), n_layers)
    elif spec.endswith(".npy"):
        vectors, layer = _from_npy(Path(spec)), None
    else:
        raise PatcherError(spec, "a direction is FILE.npy or FILE.safetensors[:LAYER]")
    vectors = np.atleast_2d(vectors).astype(np.float64)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise PatcherError(spec, f"direction must be (d_model,) or (k, d_model), got shape {vectors.shape}")
    if d_model is not None and vectors.shape[1] != d_model:
        raise PatcherError(
            spec, f"direction has dimension {vectors.shape[1]}, the model's d_model is {d_model}"
        )
    if not np.all(np.isfinite(vectors)):
        raise PatcherError(spec, "direction contains NaN or Inf")
    if np.any(np.linalg.norm(vectors, axis=1) == 0):
        raise PatcherError(spec, "direction has zero norm")
    check_independent(vectors, spec)
    return Direction(vectors, spec, layer, digest(vectors))


def check_independent(vectors: np.ndarray, where: str) -> None:
    """Rank-k directions must span k dimensions: QR (orthonormalize) cannot build a basis otherwise."""
    k, d = vectors.shape
    if k > 1 and k >= d - 1:  # removing them leaves at most one dimension: every writer is (nearly) zeroed
        raise PatcherError(
            where,
            f"{k} directions in a {d}-dimensional residual stream leave at most "
            f"{max(d - k, 0)} dimension(s): the edit would erase (almost) everything",
        )
    if k == 1:
        return
    if k > vectors.shape[1]:
        raise PatcherError(where, f"{k} directions in {vectors.shape[1]} dimensions are linearly dependent")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    s = np.linalg.svd(unit, compute_uv=False)
    rank = int(np.sum(s > 1e-6 * s[0]))
    if rank < k:
        raise PatcherError(
            where,
            f"the {k} directions are linearly dependent (they span only {rank} "
            "dimensions); drop the redundant ones",
        )


def _from_npy(path: Path) -> np.ndarray:
    regular_file(path, "direction file")  # np.load on a FIFO would wait forever
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PatcherError(path, "no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise PatcherError(path, f"not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise PatcherError(path, "not a single .npy array (an .npz archive?)")
    if arr.dtype.kind not in "fiu":
        raise PatcherError(path, f"expected a numeric array, got dtype {arr.dtype}")
    return arr


def _from_safetensors(path: Path, layer: int | None, n_layers: int | None = None) -> tuple[np.ndarray, int]:
    regular_file(path, "direction file")
    ck = Checkpoint(path)
    try:
        if "direction" not in ck.tensors:
            raise CheckpointError(path, "no 'direction' tensor: not a patcher directions file")
        table = ck.array("direction").astype(np.float64)
        meta = read_metadata(ck)
    finally:
        ck.close()
    if table.ndim != 2:
        raise CheckpointError(path, f"'direction' must be [layers+1, d_model], got {list(table.shape)}")
    n = table.shape[0]
    if layer is None:
        layer = meta.get("selected_layer")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise CheckpointError(
                path, "metadata has no integer 'selected_layer'; give one as FILE.safetensors:LAYER"
            )
        if not 0 <= layer < n:  # extract writes 0..L: anything else is damage, and never wraps
            raise CheckpointError(
                path,
                f"metadata selected_layer {layer} is out of range: the file has resid_pre layers 0..{n - 1}",
            )
    if n_layers is not None and n != n_layers + 1:
        raise CheckpointError(
            path,
            f"the directions table has {n} rows (a {n - 1}-layer model's); this "
            f"model has {n_layers} layers ({n_layers + 1} resid_pre rows)",
        )
    if not -n <= layer < n:  # FILE:-1 counts from the end, as --layers does; nothing wraps
        raise PatcherError(
            f"{path}:{layer}", f"layer {layer} is out of range: the file has resid_pre layers 0..{n - 1}"
        )
    return table[layer], layer % n


def read_metadata(ck: Checkpoint) -> dict:
    raw = next(iter(ck.files.values())).metadata.get(METADATA_KEY, "{}")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(ck.path, f"__metadata__[{METADATA_KEY!r}] is not JSON") from None
    return meta if isinstance(meta, dict) else {}


def save_directions(
    path,
    direction: np.ndarray,
    positive_mean: np.ndarray,
    negative_mean: np.ndarray,
    metadata: dict,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write the directions format (float32 tensors; JSON metadata under __metadata__['patcher'])."""
    if "selected_layer" not in metadata:
        raise ValueError("directions metadata needs 'selected_layer'")
    arrays = {
        "direction": direction,
        "positive_mean": positive_mean,
        "negative_mean": negative_mean,
        **(extra or {}),
    }
    tensors = []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr, dtype=np.float32)
        tensors.append(OutTensor(name, "F32", a.shape, produce=partial(list, [a])))
    from patcher.io.atomic import atomic_file

    with atomic_file(path) as tmp:  # an interrupt or a full disk leaves nothing behind
        write_safetensors(tmp, tensors, {"format": "pt", METADATA_KEY: dumps(metadata, sort_keys=True)})
