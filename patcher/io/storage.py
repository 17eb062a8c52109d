"""The storage interface: what every weight format offers the layers above it.

A format is a class with these members (safetensors: `patcher.io.checkpoint.Checkpoint`; GGUF:
`patcher.model.gguf.GGUFStorage`, and its HF-named float view `patcher.model.gguf.HFView`). `Model`
(patcher/model/opened.py) holds one and reads nothing else; a new format implements this protocol
and adds a `Backend` to `patcher.model.opened.BACKENDS`. tests/test_storage.py checks every
implementation against it, member by member.

Tensor shapes are numpy order; `array` and `read_rows` give values (GGUF: dequantized float32;
safetensors: the stored dtype, a memory-mapped view); nothing is read before it is asked for.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from patcher.errors import CheckpointError
from patcher.io.safetensors import TensorInfo


@runtime_checkable
class Storage(Protocol):
    """One opened checkpoint in some format (see the module notes)."""

    # read-only (properties here), so a format may narrow them: GGUF's tensors are GGUFTensors
    @property
    def format(self) -> str: ...  # "safetensors", "gguf", "gguf-hf" (a GGUF seen under HF names)

    @property
    def names(self) -> str: ...  # the naming of `tensors`: "hf" (transformers') or "gguf" (llama.cpp's)

    @property
    def path(self) -> Path: ...  # the file or folder opened

    @property
    def folder(self) -> Path: ...  # the folder it lies in (the folder itself for a model folder)

    @property
    def config_path(self) -> Path: ...  # where its hyperparameters come from (config.json, or the GGUF)

    @property
    def index_path(self) -> Path | None: ...  # a sharded checkpoint's index file

    @property
    def files(self) -> Mapping[str, Any]: ...  # file name -> open file, in shard order

    @property
    def tensors(self) -> Mapping[str, TensorInfo]: ...  # name -> dtype, shape, file, byte span

    @property
    def shard_of(self) -> Mapping[str, str]: ...  # tensor name -> file name

    # --- the model's description ------------------------------------------------------------
    @property
    def config(self) -> dict: ...  # HF config.json keys (a GGUF's derived from its metadata)

    @property
    def model_type(self) -> str | None: ...

    @property
    def total_bytes(self) -> int: ...

    @property
    def input_paths(self) -> list[Path]: ...  # what no output may be written on, inside or around

    def input_files(self) -> list[Path]: ...  # the files a run over it reads (weights and side files)

    def side_files(self) -> dict[str, bytes]: ...  # config and tokenizer files of an HF folder

    def describe(self, roles: Mapping[str, list[str]] | None = None) -> dict: ...  # facts for `inspect`

    # --- tensors -----------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo: ...

    def file_of(self, name: str) -> Any: ...

    def array(self, name: str, row_start: int = 0, row_stop: int | None = None) -> np.ndarray: ...

    def read_rows(
        self, name: str, row_start: int, row_stop: int, row_len: int | None = None
    ) -> np.ndarray: ...

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray: ...  # embedding rows by token id

    def quant_floor(self, name: str, values: np.ndarray) -> float | None: ...  # None: the dtype's grid

    def release(self, name: str) -> None: ...  # drop the pages a streamed tensor touched

    def shard_tensors(self, fname: str) -> Sequence[TensorInfo]: ...  # one file's tensors in file order

    def close(self) -> None: ...


T = TypeVar("T", bound=TensorInfo)


class TensorTable(Generic[T]):
    """What every format derives alike from `path` and `tensors` (entries of type T): a base class for
    implementations."""

    path: Path
    tensors: Mapping[str, T]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, name: str) -> T:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(self.path, f"no tensor named {name!r}") from None

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def missing_members(obj: object) -> list[str]:
    """The Storage members `obj` lacks (a test, and a clear failure for a half-written format)."""
    members = [*Storage.__dict__.get("__annotations__", {})] + [
        n
        for n, v in vars(Storage).items()
        if not n.startswith("_") and (callable(v) or isinstance(v, property))
    ]
    return [n for n in dict.fromkeys(members) if not hasattr(obj, n)]
