"""Streaming safetensors writer and the atomic output folder.

The header is written first (every output shape is known up front), then tensor data in order:
untouched tensors are copied file-to-file by the kernel (copy_file_range, never through RAM),
edited ones arrive as encoded row blocks. A writer thread does the I/O so it overlaps with the
numpy work of the next block.
"""
import json
import math
import os
import queue
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.codecs import numpy_dtype
from patcher.errors import PatcherError
from patcher.safetensors_file import TensorInfo

_COPY_CHUNK = 64 << 20


@dataclass
class OutTensor:
    """One tensor of an output file: copied verbatim from `source`, or made by `produce`."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    produce: Callable[[], Iterable[np.ndarray]] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


def header_bytes(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data region 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    while count > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)
        except OSError as e:
            if e.errno in (18, 38, 95, 22, 1):  # EXDEV, ENOSYS, EOPNOTSUPP, EINVAL, EPERM: no kernel copy here
                n = 0
            else:
                raise
        if n == 0:  # fall back to read/write for what is left
            while count > 0:
                chunk = os.pread(src_fd, min(count, _COPY_CHUNK), offset)
                if not chunk:
                    raise OSError(f"source ended early at byte {offset}")
                _write_all(dst_fd, chunk)
                offset += len(chunk)
                count -= len(chunk)
            return
        offset += n
        count -= n


class _IOThread:
    """Serialises writes and copies on a background thread; re-raises its error in the caller."""

    def __init__(self, fd: int):
        self.fd = fd
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.sources: dict[Path, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            try:
                if item[0] == "write":
                    _write_all(self.fd, item[1])
                else:
                    _, path, offset, count = item
                    if path not in self.sources:
                        self.sources[path] = os.open(path, os.O_RDONLY)
                    _copy_range(self.sources[path], self.fd, offset, count)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _put(self, item):
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def write(self, data):
        self._put(("write", data))

    def copy(self, path: Path, offset: int, count: int):
        self._put(("copy", path, offset, count))

    def close(self):
        self.q.put(None)
        self.thread.join()
        for fd in self.sources.values():
            os.close(fd)
        if self.error is not None:
            raise self.error


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict[str, str],
                      on_bytes: Callable[[int], None] | None = None) -> None:
    """Write one safetensors file. Consecutive verbatim copies from one source merge into one copy."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    io = None
    try:
        _write_all(fd, header_bytes(tensors, metadata))
        io = _IOThread(fd)
        pending = None  # (path, offset, count) run of adjacent verbatim bytes
        for t in tensors:
            if t.source is not None:
                s = t.source
                if pending and pending[0] == s.file and pending[1] + pending[2] == s.begin:
                    pending = (pending[0], pending[1], pending[2] + s.nbytes)
                else:
                    if pending:
                        io.copy(*pending)
                    pending = (s.file, s.begin, s.nbytes)
                if on_bytes:
                    on_bytes(s.nbytes)
                continue
            if pending:
                io.copy(*pending)
                pending = None
            written = 0
            for block in t.produce():
                block = np.ascontiguousarray(block)
                if block.dtype != numpy_dtype(t.dtype):
                    raise RuntimeError(f"{t.name}: produced {block.dtype}, header says {t.dtype}")
                io.write(block.reshape(-1).view(np.uint8))  # ml_dtypes arrays have no buffer format
                written += block.nbytes
                if on_bytes:
                    on_bytes(block.nbytes)
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: produced {written} bytes, header says {t.nbytes}")
        if pending:
            io.copy(*pending)
        io, closing = None, io
        closing.close()
    finally:
        if io is not None:
            try:
                io.close()
            except BaseException:  # noqa: BLE001 - the original error wins
                pass
        os.close(fd)


class OutputFolder:
    """Build an output folder under a hidden temporary name beside the target; rename it into
    place only when everything is written. A failed or interrupted run leaves no folder that
    looks complete (only `.NAME.partial-PID`, removed on failure and by the next run)."""

    def __init__(self, target, inputs: Iterable[Path], force: bool = False):
        self.target = Path(target).absolute()
        self.force = force
        t = self.target.resolve()
        for src in inputs:
            s = Path(src).resolve()
            if t == s:
                raise PatcherError(target, "output is the input; choose a new folder (the input is never modified)")
            if s in t.parents:
                raise PatcherError(target, f"output lies inside the input folder {src}; choose a folder outside it")
            if t in s.parents:
                raise PatcherError(target, f"output folder contains the input {src}; choose another folder")
        if self.target.exists() and not (self.target.is_dir() and not any(self.target.iterdir())) and not force:
            raise PatcherError(target, "already exists; pass --force to replace it")
        self.tmp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"

    def _clean_stale(self):
        """Leftovers of killed runs: partial outputs and replaced targets whose process is gone."""
        for kind in ("partial", "old"):
            for p in self.target.parent.glob(f".{self.target.name}.{kind}-*"):
                pid = p.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    _remove(p)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._clean_stale()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for p in self.tmp.iterdir():  # one flush at the end: writeback overlapped the compute
            _fsync_file(p)
        _fsync_dir(self.tmp)
        if self.target.exists():
            trash = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, trash)
            os.rename(self.tmp, self.target)
            _remove(trash)
        else:
            os.rename(self.tmp, self.target)
        _fsync_dir(self.target.parent)
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
