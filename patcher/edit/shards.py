"""Writing the output shards of a plan, several at once.

Shards are independent once the plan is made: each is one ShardWriter pipeline (patcher.io.writer) fed
by its own thread, so one shard's copy and digests run beside another's edit math (numpy, hashlib and the
file calls release the GIL). Each shard's bytes depend only on its own tensors: the output is the same
for any number in flight (tests/test_stream_io.py).

How many run at once follows the cores (`in_flight`, or `--jobs`): one shard in flight keeps about
three threads busy when its digests are spread (edit math; copy + input sha256; output sha256), four
with a copy thread of its own, and sha256 is one sequential stream per file (~1.0-1.6 GB/s per core
with SHA-NI), so the digests hide behind the copy only when there are cores for them; a single large
file is then bound by its two digests. Memory grows by ~30 MiB per shard in flight (8 MiB of
queued blocks, 4 x 1 MiB buffers, the row blocks, a malloc arena per thread: 80 / 114 / 168 MiB peak
RSS with 1 / 2 / 4, BENCHMARKS.md), so at most MAX_IN_FLIGHT unless the user asks for more. The
disk is not measured: one shard's copy already keeps a disk busy, and a faster disk only moves the
bound onto the digests.
"""

import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from patcher.io import manifest
from patcher.io.jsonsafe import dumps
from patcher.io.writer import InputDigest, OutTensor, ShardWriter, merge_busy

MAX_IN_FLIGHT = 4  # peak RSS well under 256 MiB: ~50 MiB + ~30 MiB per shard in flight (measured)
THREADS_PER_SHARD = 3  # edit; copy + input digest; output digest (when spread)


def cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def in_flight(files: int, jobs: int | None = None, ncores: int | None = None) -> int:
    """Shards written at once: `jobs` when given, else from the cores: two on a small machine (one
    shard's copy and digests beside another's edit math), one per THREADS_PER_SHARD cores above that,
    at most MAX_IN_FLIGHT; never more than there are files."""
    if jobs is None:
        jobs = min(MAX_IN_FLIGHT, max(2, (ncores or cores()) // THREADS_PER_SHARD))
    return max(1, min(jobs, files))


def spread_digests(in_flight: int, ncores: int | None = None) -> bool:
    """Give each file's output digest its own thread (the writer) when there are cores for it: always
    for a file alone; otherwise both digests share the reader (fewer CPU-s: the output digest reads the
    chunk the input digest just brought into that core's cache)."""
    return in_flight == 1 or (ncores or cores()) >= THREADS_PER_SHARD * in_flight


def copy_thread(in_flight: int, ncores: int | None = None) -> bool:
    """Give each file a fourth thread for the kernel copy when there are cores for it, so the reader
    only reads and hashes: a single large file is then bound by its two digests, not digests + copy."""
    return (ncores or cores()) >= (THREADS_PER_SHARD + 1) * in_flight


class ShardRun:
    """Writes a plan's output shards into `tmp`, up to `in_flight` at once; records their digests
    (or sizes, when hashing is off) in `hasher`, in shard order."""

    def __init__(self, plan, tmp: Path, hasher, progress, on_shard, rehash: bool = False):
        self.ck, self.tmp, self.hasher = plan.ck, tmp, hasher
        self.progress, self.on_shard = progress, on_shard
        self.rehash = rehash  # hash every input, even one whose digest is known (cache, hub blob name)
        self.record = dumps(plan.record, sort_keys=True)  # no command line or time: deterministic bytes
        self.writers: dict[str, ShardWriter] = {}
        self.lock = threading.Lock()
        self.stopped = False
        self.busy: list[dict[str, float]] = []  # per finished file: seconds read, edit, hash, write
        self.seconds = 0.0  # wall time of run()
        self.from_hub: dict[str, str] = {}  # input file -> sha256 taken from its hub blob name

    def busy_seconds(self) -> dict[str, float]:
        """Thread-seconds spent reading, editing, hashing and writing, over all files."""
        return merge_busy(self.busy)

    def run(self, layout: dict[str, list[OutTensor]], in_flight: int) -> None:
        t0 = time.perf_counter()
        try:
            self._run(layout, in_flight)
        finally:
            self.seconds = time.perf_counter() - t0

    def _run(self, layout: dict[str, list[OutTensor]], in_flight: int) -> None:
        in_flight = max(1, min(in_flight, len(layout)))
        threads = (spread_digests(in_flight), copy_thread(in_flight))
        with ThreadPoolExecutor(in_flight, thread_name_prefix="shard") as pool:
            jobs = [pool.submit(self._one, fname, tensors, *threads) for fname, tensors in layout.items()]
            try:
                pending = set(jobs)
                while pending:  # the first shard to fail stops the others at once
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for job in done:
                        if (error := job.exception()) is not None:
                            raise error
            except BaseException:  # a shard failed, or Ctrl-C / SIGTERM on this thread: stop the others
                self.stop(jobs)
                raise
        for job in jobs:  # in shard order
            self._record(*job.result())

    def stop(self, jobs) -> None:
        with self.lock:
            self.stopped = True
            for w in self.writers.values():
                w.abort()
        for job in jobs:
            job.cancel()
        wait(jobs)

    def _known(self, fname: str, sf) -> str | None:
        """An input's sha256 without reading it: the digest cache's (an unchanged file hashed before),
        or its Hugging Face blob name (LFS files are stored as blobs/<sha256 of the file>), trusted when
        the blob is the one named: a 64-hex name and the size its header was validated at when opened.
        `--rehash-inputs` reads them anyway and checks the names against the bytes."""
        if self.hasher.cache is None or self.rehash:
            return None
        known = self.hasher.known(sf.path)
        if known is not None:
            return known
        name = manifest.hub_blob_sha256(sf.path)
        if name is None:
            return None
        try:
            if os.stat(sf.path).st_size != sf.size:  # changed since it was opened and checked
                return None
        except OSError:
            return None
        with self.lock:
            self.from_hub[fname] = name
        return name

    def _one(self, fname: str, tensors: list[OutTensor], spread: bool, copier: bool):
        sf = self.ck.files[fname]
        if self.on_shard:
            self.on_shard(fname)
        meta = dict(sf.metadata)
        meta.setdefault("format", "pt")
        meta["patcher"] = self.record
        hashing = self.hasher.cache is not None
        known = self._known(fname, sf)
        digest = InputDigest(sf.path) if hashing and not known else None
        identity = manifest.identity(sf.path) if digest is not None else None
        try:
            w = ShardWriter(
                self.tmp / fname,
                tensors,
                meta,
                on_bytes=self.progress,
                hash_out=hashing,
                input_digest=digest,
                spread_digests=spread,
                copy_thread=copier,
            )
        except BaseException:
            if digest is not None:
                digest.close()
            raise
        try:
            with self.lock:
                if self.stopped:
                    raise InterruptedError("stopped")
                self.writers[fname] = w
            sf.observer = w.seen if digest is not None else None
            try:
                w.produce()
            finally:
                sf.observer = None
            out_sha = w.finish()
            with self.lock:
                self.busy.append(w.busy_seconds())
        finally:
            w.close()
            with self.lock:
                self.writers.pop(fname, None)
        return fname, w.path, known or w.input_sha, out_sha, identity

    def _record(self, fname, out_path, in_sha, out_sha, identity) -> None:
        hasher, path = self.hasher, self.ck.files[fname].path
        if hasher.cache is None:  # --no-hash: sizes
            hasher.add(fname, path)
            hasher.add("out/" + fname, out_path)
            return
        hasher.set(fname, in_sha)
        if identity is not None:
            hasher.cache.remember(path, in_sha, identity)
        hasher.set("out/" + fname, out_sha)
        hasher.cache.remember(out_path, out_sha)  # the next recipe step reads this file: no re-hash there
