"""Streaming safetensors writer and the atomic output folder.

The header is written first (every output shape is known up front), then tensor data in file order.
One output file is a pipeline of three or four threads, each handed its work in file order:

  caller         walks the tensors: queues untouched ranges as copy jobs (no bytes), computes edited
                 tensors into encoded blocks, and reports the raw input rows the edit read (`seen`);
  reader         copies untouched ranges chunk by chunk (copy_file_range), reads each chunk back from
                 the page cache and feeds the input file's sha256 with it and with the rows the edit
                 read, in input order (a range nobody read, e.g. a bias read through mmap, is read here
                 once more), and the output file's sha256 with every byte of the output in order
                 (header and computed blocks included) while the chunk is still in this core's cache;
  writer         writes the computed blocks (and, with `spread_digests`, feeds the output's sha256
                 instead of the reader: for a file that runs alone, two busy threads beat one).
  copy           (with `copy_thread`, where cores are spare) the kernel copies of untouched ranges, at
                 most _COPY_AHEAD ahead of the reader, which then only reads back and hashes.

So with hashing on, each input byte is read from disk once and each output byte written once, and the
digests run beside the edit math (hashlib, pread, pwrite and copy_file_range release the GIL); the
caller writes several files at once (patcher.edit.shards). Without hashing, untouched ranges are copied
by the kernel alone.
Copy + read back ("range") against pread + pwrite through one buffer ("read"), 2 GiB with both digests,
alternating runs on the shared 2-core box: range used 10-20 % less CPU and finished first in 4 of 4
pairs (BENCHMARKS.md), 1 MiB chunks slightly ahead of 4 MiB.
"""

import errno
import hashlib
import json
import math
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from patcher_kernels.codecs import itemsize, numpy_dtype

from patcher.io.safetensors import TensorInfo

_COPY_CHUNK = 64 << 20  # copy_file_range fallback
_CHUNK = 1 << 20  # untouched ranges pass the digests in chunks of this size (stays in the CPU cache)
_HASH_SLICE = 1 << 20  # hash larger blocks in slices too (measured: 16 MiB slices ~30 % slower)
_BUFFERS = 4  # reusable chunk buffers per output file
_IN_FLIGHT = 8 << 20  # bytes of computed blocks and seen rows queued per output file (16 or 32: no faster)
_COPY_PIECE = 16 << 20  # with a copy thread: ranges handed to it at a time, at most _COPY_AHEAD ahead
_COPY_AHEAD = 64 << 20  # of the digests (the source pages it reads stay cached until they are hashed)


@dataclass
class OutTensor:
    """One tensor of an output file: copied verbatim from `source`, or made by `produce`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    produce: Callable[[], Iterable[np.ndarray]] | None = None
    finite: bool = False  # an edit's result: NaN/Inf in it stops the write (a plain writer stores any value)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def header_bytes(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data region 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"source ended early at byte {offset + done}")
        done += n


def _hash(h, view: memoryview) -> None:
    for i in range(0, len(view), _HASH_SLICE):
        h.update(view[i : i + _HASH_SLICE])


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


class _Budget:
    """Bounds the bytes queued between threads; one item larger than the bound still passes alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cond = limit, 0, threading.Condition()

    def take(self, n: int, failed: Callable[[], bool]) -> None:
        with self.cond:
            while self.used and self.used + n > self.limit and not failed():
                self.cond.wait(0.1)
            self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class Busy:
    """Seconds one thread spent in each activity (read, hash, write, edit), for the summary's "where the
    time went". One per thread: no lock, merged once the threads are done."""

    PARTS = ("read", "edit", "hash", "write")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self._since = time.perf_counter()

    def lap(self, part: str) -> None:
        """Charge the time since the previous lap to `part`."""
        now = time.perf_counter()
        self.seconds[part] += now - self._since
        self._since = now

    def skip(self) -> None:
        """Drop the time since the previous lap (waiting on a queue is nobody's work)."""
        self._since = time.perf_counter()


def merge_busy(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Seconds per activity, summed over threads (or files)."""
    total = dict.fromkeys(Busy.PARTS, 0.0)
    for seconds in parts:
        for k, v in seconds.items():
            total[k] += v
    return total


class InputDigest:
    """sha256 of one input file fed in file order from bytes that pass anyway; bytes nobody passed
    (a gap, or the tail) are read here. Bytes fed again (a second pass over a tensor) are skipped."""

    def __init__(self, path: Path):
        self.path, self.pos, self.sha = Path(path), 0, hashlib.sha256()
        self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.reread = 0  # bytes this digest had to read itself

    def _fill(self, stop: int) -> None:
        buf = memoryview(bytearray(min(_CHUNK, max(stop - self.pos, 0)) or 1))
        while self.pos < stop:
            n = min(len(buf), stop - self.pos)
            _pread_into(self.fd, buf[:n], self.pos)
            _hash(self.sha, buf[:n])
            self.pos += n
            self.reread += n

    def feed(self, offset: int, view: memoryview) -> None:
        if offset > self.pos:
            self._fill(offset)
        skip = self.pos - offset
        if skip < len(view):
            _hash(self.sha, view[skip:])
            self.pos = offset + len(view)

    def finish(self) -> str:
        self._fill(self.size)
        return self.sha.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ShardWriter:
    """Write one safetensors file through the reader and writer threads (see the module notes).

    `hash_out`: compute the output's sha256 from the bytes written. `input_digest`: an InputDigest of
    the source file of the untouched tensors, fed as they are read and by `seen` (the rows an edit
    reads). Call `produce()` on the main thread, then `finish()` (possibly after starting the next
    file: the threads drain while the caller computes); `close()` always."""

    def __init__(
        self,
        path: Path,
        tensors: list[OutTensor],
        metadata: dict[str, str],
        on_bytes: Callable[[int], None] | None = None,
        hash_out: bool = False,
        input_digest: InputDigest | None = None,
        copy: str | None = None,
        spread_digests: bool = False,
        copy_thread: bool = False,
    ):
        self.path, self.tensors, self.on_bytes = Path(path), tensors, on_bytes
        self.header = header_bytes(tensors, metadata)
        self.total = len(self.header) + sum(t.nbytes for t in tensors)
        sha = hashlib.sha256() if hash_out else None
        # where the output digest runs: on the reader, right after the input digest read the same chunk
        # (fewest CPU-s: ~1.6 GB/s hashing cache-hot bytes against ~1.0 cold, measured), or on the writer
        # thread when this file is the only one in flight and the reader would be the one busy thread
        self.out_sha: hashlib._Hash | None = None if spread_digests else sha
        self.write_sha: hashlib._Hash | None = sha if spread_digests else None
        self.input = input_digest
        # "range" (kernel copy, then read back from the page cache for the digests) measured ahead
        # of "read" (pread + pwrite); see the module notes
        self.copy = copy or ("range" if hash_out or input_digest else "kernel")
        if self.copy == "kernel" and (hash_out or input_digest):
            raise ValueError("a kernel copy passes no bytes through the digests")
        self.errors: list[BaseException] = []
        self.budget = _Budget(_IN_FLIGHT)
        self.free: queue.Queue = queue.Queue()
        self.to_reader: queue.Queue = queue.Queue()
        self.to_writer: queue.Queue = queue.Queue()
        # a copy thread takes the kernel copies off the reader, which then only reads and hashes: with
        # cores to spare a single large file is bound by its digests alone (one sequential stream each)
        self.to_copier: queue.Queue | None = queue.Queue() if copy_thread and self.copy == "range" else None
        self.watermark = 0  # input offset up to which the reader has been told about bytes
        self.sources: dict[Path, int] = {}
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.threads = [
            threading.Thread(target=self._guarded, args=(f,), daemon=True, name=f"{n} {self.path.name}")
            for n, f in (("read", self._read_loop), ("write", self._write_loop))
            + ((("copy", self._copy_loop),) if self.to_copier is not None else ())
        ]
        self.input_sha: str | None = None  # the input's sha256, once finish() returned
        self.made = 0
        self.busy = {n: Busy() for n in ("caller", "read", "write", "copy")}  # per thread: busy_seconds
        self._closed = False
        for t in self.threads:
            t.start()

    # --- main thread ---------------------------------------------------------------------------
    def _check(self) -> None:
        if self.errors:  # a thread failed (disk full, ...): stop computing
            raise self.errors[0]

    def _wait_budget(self, nbytes: int) -> None:
        """Queue room for `nbytes`; the caller's time before it was edit work, the wait is not."""
        self.busy["caller"].lap("edit")
        self.budget.take(nbytes, lambda: bool(self.errors))
        self.busy["caller"].skip()

    def _put_data(self, offset: int, data, nbytes: int) -> None:
        self._wait_budget(nbytes)
        self._check()
        self.to_reader.put(("data", offset, data, nbytes))

    def seen(self, offset: int, raw: np.ndarray) -> None:
        """Raw input bytes at `offset` of the input file, just read by the edit: feed the input digest
        (only the first time a range passes: a second pass over a tensor is not hashed again)."""
        if self.input is None or offset < self.watermark:
            return
        self._wait_budget(raw.nbytes)
        self.to_reader.put(("seen", offset, raw, raw.nbytes))
        self.watermark = offset + raw.nbytes

    def produce(self) -> None:
        self.busy["caller"].skip()
        self._put_data(0, self.header, len(self.header))
        os.ftruncate(self.fd, self.total)
        pos = len(self.header)
        for t in self.tensors:
            self._check()
            if t.source is not None:
                self.to_reader.put(("copy", t.source.file, t.source.begin, pos, t.nbytes))
                if self.input is not None and t.source.file == self.input.path:
                    self.watermark = max(self.watermark, t.source.end)
            else:
                _write_produced(self, t, pos)
            pos += t.nbytes
        self.busy["caller"].lap("edit")
        self.to_reader.put(None)

    def finish(self) -> str | None:
        """Wait for the threads; the output's sha256 (None when not hashing). Raises a thread's error."""
        for t in self.threads:
            t.join()
        self._check()
        self.busy["caller"].skip()
        _start_writeback(self.fd, 0, self.total)
        self.busy["caller"].lap("write")
        sha = self.out_sha or self.write_sha
        return sha.hexdigest() if sha else None

    def busy_seconds(self) -> dict[str, float]:
        """Seconds this file's threads spent reading, editing, hashing and writing (after finish())."""
        return merge_busy(b.seconds for b in self.busy.values())

    def abort(self) -> None:
        """Make the threads and the producing caller stop soon (from any thread); close() still
        releases the files, on the thread that owns them."""
        self.errors.append(InterruptedError("writer stopped"))
        self.to_reader.put(None)
        self._wake()

    def _wake(self) -> None:
        """End the writer's and the copier's loops (they wait on their queues)."""
        self.to_writer.put(None)
        if self.to_copier is not None:
            self.to_copier.put(None)

    def close(self) -> None:
        """Stop the threads (after an error or interrupt too) and release the files."""
        if self._closed:
            return
        self._closed = True
        if any(t.is_alive() for t in self.threads):
            self.abort()
            for t in self.threads:
                t.join()
        os.close(self.fd)
        for fd in self.sources.values():
            os.close(fd)
        if self.input is not None:
            self.input.close()

    # --- threads -------------------------------------------------------------------------------
    def _guarded(self, loop) -> None:
        try:
            loop()
        except BaseException as e:
            self.errors.append(e)
            self._wake()

    def _source(self, path: Path) -> int:
        if path not in self.sources:
            self.sources[path] = os.open(path, os.O_RDONLY)
        return self.sources[path]

    def _buffer(self) -> memoryview:
        """A free chunk buffer: reused, at most _BUFFERS per file (bounded memory, no page faults)."""
        if self.free.empty() and self.made < _BUFFERS:
            self.made += 1
            return memoryview(bytearray(_CHUNK))
        while not self.errors:
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                pass
        raise self.errors[0]

    def _read_loop(self) -> None:
        busy = self.busy["read"]
        while (item := self.to_reader.get()) is not None:
            busy.skip()
            if self.errors:
                return
            kind = item[0]
            if kind == "data":
                if self.out_sha is not None:
                    _hash(self.out_sha, memoryview(item[2]).cast("B")[: item[3]])
                    busy.lap("hash")
                self.to_writer.put(item)
            elif kind == "seen":
                _, offset, raw, nbytes = item
                assert self.input is not None  # "seen" items are sent only with an input digest
                self.input.feed(offset, memoryview(raw.reshape(-1).view(np.uint8)))
                busy.lap("hash")
                self.budget.give(nbytes)
            else:
                self._copy(*item[1:])
        busy.skip()
        if self.input is not None and not self.errors:
            self.input_sha = self.input.finish()  # the tail nobody passed (none, normally)
            busy.lap("hash")
        self._wake()

    def _copy(self, src: Path, src_off: int, dst_off: int, count: int) -> None:
        sfd = self._source(src)
        busy = self.busy["read"]
        if self.copy == "kernel":
            _copy_range(sfd, self.fd, src_off, dst_off, count)
            _start_writeback(self.fd, dst_off, count)
            busy.lap("write")  # the kernel reads and writes in one call: one activity to the user
            if self.on_bytes:
                self.on_bytes(count)
            return
        feed = self.input if self.input is not None and src == self.input.path else None
        end, handed = src_off + count, src_off  # handed: source offset up to which the copier has ranges
        while src_off < end and not self.errors:
            n = min(_CHUNK, end - src_off)
            while self.to_copier is not None and handed < min(end, src_off + _COPY_AHEAD):
                piece = min(_COPY_PIECE, end - handed)
                self.to_copier.put((sfd, handed, dst_off + handed - src_off, piece))
                handed += piece
            buf = self._buffer()
            busy.skip()
            if self.copy == "range" and self.to_copier is None:  # kernel copy, then read back (cached)
                _copy_range(sfd, self.fd, src_off, dst_off, n)
                busy.lap("write")
            _pread_into(sfd, buf[:n], src_off)
            busy.lap("read")
            if feed is not None:
                feed.feed(src_off, buf[:n])
            if self.out_sha is not None:  # the chunk is still in this core's cache: both digests here
                _hash(self.out_sha, buf[:n])
            busy.lap("hash")
            self.to_writer.put(("chunk", dst_off, buf, n))
            src_off, dst_off = src_off + n, dst_off + n

    def _copy_loop(self) -> None:
        busy, jobs = self.busy["copy"], self.to_copier
        assert jobs is not None  # started only with a copy queue
        while (item := jobs.get()) is not None:
            busy.skip()
            if self.errors:
                return
            sfd, src_off, dst_off, n = item
            _copy_range(sfd, self.fd, src_off, dst_off, n)
            _start_writeback(self.fd, dst_off, n)
            busy.lap("write")

    def _write_loop(self) -> None:
        busy = self.busy["write"]
        while (item := self.to_writer.get()) is not None:
            busy.skip()
            if self.errors:
                return
            kind, offset, data, n = item
            view = memoryview(data).cast("B")[:n]
            if self.write_sha is not None:
                _hash(self.write_sha, view)
                busy.lap("hash")
            if kind != "chunk" or self.copy != "range":
                _pwrite_all(self.fd, view, offset)
            if kind == "chunk":
                self.free.put(data)
                _start_writeback(self.fd, offset, n)
            else:
                self.budget.give(n)
            busy.lap("write")
            if self.on_bytes:
                self.on_bytes(n)


def write_safetensors(
    path: Path,
    tensors: list[OutTensor],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
    hash_out: bool = False,
    input_digest: InputDigest | None = None,
) -> str | None:
    """Write one safetensors file (see ShardWriter); the output's sha256 when `hash_out`."""
    w = ShardWriter(path, tensors, metadata, on_bytes=on_bytes, hash_out=hash_out, input_digest=input_digest)
    try:
        w.produce()
        return w.finish()
    finally:
        w.close()


def _finite(block: np.ndarray) -> bool:
    """All values finite (float dtypes, ml_dtypes included; integer codes always are)."""
    try:
        return bool(np.isfinite(block).all())
    except TypeError:
        return True


def _write_produced(w: ShardWriter, t: OutTensor, pos: int) -> None:
    """Compute one edited tensor on this (the main) thread and queue its encoded blocks in order."""
    if t.produce is None:
        raise ValueError(f"{t.name}: an output tensor needs a source or a produce function")
    written = 0
    want = numpy_dtype(t.dtype)
    for block in t.produce():
        w._check()
        block = np.ascontiguousarray(block)
        if block.dtype != want:
            raise RuntimeError(f"{t.name}: produced {block.dtype}, header says {t.dtype}")
        if t.finite and not _finite(block):
            from patcher.errors import PatcherError

            raise PatcherError(
                t.name,
                f"the edited tensor holds NaN or Inf (the input tensor is not finite, "
                f"or the edit overflowed {t.dtype}); nothing was written",
            )
        raw = block.reshape(-1).view(np.uint8)  # ml_dtypes have no buffer format
        w._put_data(pos + written, raw, raw.nbytes)
        written += block.nbytes
    if written != t.nbytes:
        raise RuntimeError(f"{t.name}: produced {written} bytes, header says {t.nbytes}")


def refuse_inputs(target, inputs: Iterable[Path]) -> None:
    """An output may not be, lie inside, or contain any input (one rule: patcher.io.paths)."""
    from patcher.io.paths import refuse_inputs as rule

    rule(target, list(inputs))
