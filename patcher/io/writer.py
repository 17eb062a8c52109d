"""Streaming safetensors writer and the atomic output folder.

The header is written first (every output shape is known up front), then tensor data in order:
untouched tensors are copied file-to-file by the kernel (copy_file_range, never through RAM),
edited ones arrive as encoded row blocks. A writer thread does the I/O so it overlaps with the
numpy work of the next block.
"""
import errno
import json
import math
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patcher_kernels.codecs import numpy_dtype
from patcher.errors import PatcherError
from patcher.io.safetensors import TensorInfo

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


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int) -> None:
    """Kernel-side copy (no bytes through user space); read/write where the kernel cannot."""
    while count > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                raise
            n = 0
        if n == 0:
            chunk = os.pread(src_fd, min(count, _COPY_CHUNK), src_off)
            if not chunk:
                raise OSError(errno.EIO, f"source ended early at byte {src_off}")
            _pwrite_all(dst_fd, chunk, dst_off)
            n = len(chunk)
        src_off, dst_off, count = src_off + n, dst_off + n, count - n


def _start_writeback(fd: int, offset: int, count: int) -> None:
    """Start flushing a finished range now (Linux: FADV_DONTNEED writes dirty pages back
    asynchronously), so the disk works while we compute and the final fsync has little left."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advisory only


def _copy_runs(tensors: list[OutTensor], data_start: int) -> list[tuple[Path, int, int, int]]:
    """(source file, source offset, destination offset, bytes) for verbatim tensors; adjacent ones
    from one source merge into a single copy."""
    runs, pos = [], data_start
    for t in tensors:
        s = t.source
        if s is not None:
            last = runs[-1] if runs else None
            if last and last[0] == s.file and last[1] + last[3] == s.begin and last[2] + last[3] == pos:
                runs[-1] = (last[0], last[1], last[2], last[3] + s.nbytes)
            else:
                runs.append((s.file, s.begin, pos, s.nbytes))
        pos += t.nbytes
    return runs


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict[str, str],
                      on_bytes: Callable[[int], None] | None = None) -> None:
    """Write one safetensors file. Every tensor's place is fixed by the header, so verbatim copies
    run on a background thread (kernel copy_file_range) while edited tensors are computed and
    written at their own offsets here: I/O and numpy work overlap instead of taking turns."""
    header = header_bytes(tensors, metadata)
    total = len(header) + sum(t.nbytes for t in tensors)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    copier, error = None, []
    try:
        _pwrite_all(fd, header, 0)
        os.ftruncate(fd, total)
        runs = _copy_runs(tensors, len(header))

        def copy_all():
            sources: dict[Path, int] = {}
            try:
                for src, src_off, dst_off, count in runs:
                    if src not in sources:
                        sources[src] = os.open(src, os.O_RDONLY)
                    _copy_range(sources[src], fd, src_off, dst_off, count)
                    _start_writeback(fd, dst_off, count)
                    if on_bytes:
                        on_bytes(count)
            except BaseException as e:  # noqa: BLE001 - re-raised by the writer
                error.append(e)
            finally:
                for sfd in sources.values():
                    os.close(sfd)
        copier = threading.Thread(target=copy_all, daemon=True)
        copier.start()
        pos = len(header)
        for t in tensors:
            if t.source is None:
                _write_produced(fd, t, pos, on_bytes, error)
                _start_writeback(fd, pos, t.nbytes)
            pos += t.nbytes
        copier.join()
        copier = None
        if error:
            raise error[0]
    finally:
        if copier is not None and copier.ident is not None:  # an interrupt may land before start()
            copier.join()
        os.close(fd)


def _write_produced(fd: int, t: OutTensor, pos: int, on_bytes, error: list) -> None:
    written = 0
    want = numpy_dtype(t.dtype)
    for block in t.produce():
        if error:  # the copier failed (disk full, ...): stop computing
            raise error[0]
        block = np.ascontiguousarray(block)
        if block.dtype != want:
            raise RuntimeError(f"{t.name}: produced {block.dtype}, header says {t.dtype}")
        _pwrite_all(fd, block.reshape(-1).view(np.uint8), pos + written)  # ml_dtypes have no buffer format
        written += block.nbytes
        if on_bytes:
            on_bytes(block.nbytes)
    if written != t.nbytes:
        raise RuntimeError(f"{t.name}: produced {written} bytes, header says {t.nbytes}")


def refuse_inputs(target, inputs: Iterable[Path]) -> None:
    """An output may not be, lie inside, or contain any input (a model folder, file, or hub cache entry)."""
    t = Path(target).absolute().resolve()
    for src in inputs:
        s = Path(src).resolve()
        if t == s:
            raise PatcherError(target, "output is the input; choose a new folder (the input is never modified)")
        if s in t.parents:
            raise PatcherError(target, f"output lies inside the input folder {src}; choose a folder outside it")
        if t in s.parents:
            raise PatcherError(target, f"output folder contains the input {src}; choose another folder")


class OutputFolder:
    """Build an output folder under a hidden temporary name beside the target; rename it into
    place only when everything is written. A failed or interrupted run leaves no folder that
    looks complete (only `.NAME.partial-PID`, removed on failure and by the next run)."""

    def __init__(self, target, inputs: Iterable[Path], force: bool = False):
        self.target = Path(target).absolute()
        self.force = force
        refuse_inputs(target, inputs)
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
            _fsync(p)
        _fsync(self.tmp)
        if self.target.exists():
            trash = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, trash)
            os.rename(self.tmp, self.target)
            _remove(trash)
        else:
            os.rename(self.tmp, self.target)
        _fsync(self.target.parent)
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


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
