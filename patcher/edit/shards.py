"""Writing the output shards of a plan, several at once.

Shards are independent once the plan is made: each is one ShardWriter pipeline (patcher.io.writer) fed
by its own thread, so one shard's copy and digests run beside another's edit math (numpy, hashlib and the
file calls release the GIL). Each shard's bytes depend only on its own tensors: the output is the same
for any number in flight (tests/test_stream_io.py).
"""

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from patcher.io import manifest
from patcher.io.jsonsafe import dumps
from patcher.io.writer import InputDigest, OutTensor, ShardWriter


class ShardRun:
    """Writes a plan's output shards into `tmp`, up to `in_flight` at once; records their digests
    (or sizes, when hashing is off) in `hasher`, in shard order."""

    def __init__(self, plan, tmp: Path, hasher, progress, on_shard):
        self.ck, self.tmp, self.hasher = plan.ck, tmp, hasher
        self.progress, self.on_shard = progress, on_shard
        self.record = dumps(plan.record, sort_keys=True)  # no command line or time: deterministic bytes
        self.writers: dict[str, ShardWriter] = {}
        self.lock = threading.Lock()
        self.stopped = False

    def run(self, layout: dict[str, list[OutTensor]], in_flight: int) -> None:
        alone = len(layout) == 1 or in_flight == 1  # one file at a time: spread its digests
        with ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="shard") as pool:
            jobs = [pool.submit(self._one, fname, tensors, alone) for fname, tensors in layout.items()]
            try:
                pending = set(jobs)
                while pending:  # the first shard to fail stops the others at once
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for job in done:
                        if job.exception() is not None:
                            raise job.exception()
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

    def _one(self, fname: str, tensors: list[OutTensor], alone: bool):
        sf = self.ck.files[fname]
        if self.on_shard:
            self.on_shard(fname)
        meta = dict(sf.metadata)
        meta.setdefault("format", "pt")
        meta["patcher"] = self.record
        hashing = self.hasher.cache is not None
        known = self.hasher.known(sf.path) if hashing else None
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
                spread_digests=alone,
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
