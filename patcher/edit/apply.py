"""Executing a Plan on safetensors: stream every shard into a new folder, tensor by tensor, row block by
row block (the writer patcher.edit.executor.WRITERS names for "safetensors").

Memory stays bounded by one row block per edited matrix (plus the writer queue); untouched tensors
are copied file to file. Leakage |QᵀW'| / |QᵀW| is measured on what was actually stored.
"""

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from patcher_kernels.codecs import decode, encode
from patcher_kernels.fp8 import dequantize_blocks, requantize_scale
from patcher_kernels.fp8 import neighbours as fp8_neighbours
from patcher_kernels.ortho_round import orthogonal_rounding
from patcher_kernels.stream import ablate_blocks

from patcher.edit import shards
from patcher.edit.executor import Executor, Report
from patcher.edit.plan import Plan, TensorEdit
from patcher.edit.shards import ShardRun
from patcher.io import manifest
from patcher.io.allocator import keep_freed_blocks
from patcher.io.atomic import AtomicOutput
from patcher.io.checkpoint import INDEX_NAME, WEIGHT_SUFFIXES
from patcher.io.writer import OutTensor
from patcher.model.opened import Model

BLOCK_ROWS = 128  # also the FP8 tile size, so row blocks never split a scale tile
_SATURATE = {"F16", "F8_E4M3", "F8_E5M2"}
KIND = "folder"  # what -o names


def matrices(edit: TensorEdit) -> list[tuple[int, int, int]]:
    """(first row, rows, residual axis) of each matrix in the tensor seen as 2-D [rows, last dim]:
    a 2-D weight is one matrix; a fused 3-D expert tensor [E, a, b] is E matrices of a rows."""
    if len(edit.shape) == 2:
        return [(0, edit.shape[0], edit.axis)]
    if edit.expert_axis != 0:
        raise NotImplementedError(f"{edit.name}: fused experts must have the expert axis first")
    E, a = edit.shape[0], edit.shape[1]
    return [(e * a, a, edit.axis - 1) for e in range(E)]


def block_reader(ck: Model, edit: TensorEdit, first: int) -> Callable[[int, int], np.ndarray]:
    """read(start, stop) -> float32 rows of the matrix that starts at row `first` (FP8 dequantized)."""
    cols = edit.shape[-1]
    if edit.fp8_scale is None:
        return lambda s, e: decode(ck.read_rows(edit.name, first + s, first + e, cols))
    scale = ck.array(edit.fp8_scale)
    return lambda s, e: dequantize_blocks(
        ck.read_rows(edit.name, first + s, first + e, cols),
        scale[s // BLOCK_ROWS : -(-e // BLOCK_ROWS)],
        BLOCK_ROWS,
    )


class _Executor(Executor):
    def __init__(self, plan: Plan, report: Report):
        super().__init__(plan, report)
        self.new_scales: dict[str, np.ndarray] = {}

    # --- projected weights -----------------------------------------------------------------
    def _reader(self, edit: TensorEdit, first: int) -> Callable[[int, int], np.ndarray]:
        return block_reader(self.ck, edit, first)

    def _projected_blocks(self, edit: TensorEdit, stats: dict):
        """Yield (matrix index, residual axis, start, stop, edited float32 block)."""
        for i, (first, rows, axis) in enumerate(matrices(edit)):
            for s, e, out in ablate_blocks(
                self._reader(edit, first),
                rows,
                edit.basis,
                axis,
                edit.scale,
                edit.preserve,
                BLOCK_ROWS,
                stats,
            ):
                yield i, axis, s, e, out

    def fp8_prepass(self, edit: TensorEdit) -> None:
        """New tile scales must be known before the scale tensor is written (it may come first)."""
        old = self.ck.array(edit.scale_name).astype(np.float32)
        rows = [
            requantize_scale(old[s // BLOCK_ROWS : -(-e // BLOCK_ROWS)], out, BLOCK_ROWS)
            for _, _, s, e, out in self._projected_blocks(edit, {})
        ]
        new = np.concatenate(rows, axis=0).reshape(old.shape)
        # keep what the file will hold, and quantize against exactly that
        self.new_scales[edit.name] = decode(encode(new, self.ck.info(edit.scale_name).dtype, saturate=True))

    def produce_projection(self, edit: TensorEdit) -> Iterator[np.ndarray]:
        """Encoded blocks of a projected weight. Leakage is measured on what is stored: the
        deviation of QᵀW' from the intended (1 - s) QᵀW, relative to |QᵀW|."""
        stats: dict = {}
        q = edit.basis.astype(np.float32)
        qt = np.ascontiguousarray(q.T)  # [k, rows]: see residual_coefficients on transposed operands
        keep = 1.0 - edit.scale  # the share of the component the edit means to leave
        dev_sq = 0.0
        stored: dict[int, tuple[np.ndarray | float, np.ndarray]] = {}  # per matrix: (QᵀW' so far, QᵀW)
        carry: dict[int, np.ndarray] = {}  # per matrix: Qᵀ(stored − exact) of the blocks written so far
        for i, axis, s, e, out in self._projected_blocks(edit, stats):
            if edit.fp8_scale:
                tile = self.new_scales[edit.name][s // BLOCK_ROWS : -(-e // BLOCK_ROWS)]
                enc = self._fp8_round(edit, i, axis, s, e, out, tile, carry)
                back = dequantize_blocks(enc, tile, BLOCK_ROWS)
            else:
                enc = encode(out, edit.dtype, saturate=edit.dtype in _SATURATE)
                back = decode(enc)
            if axis == 0:  # QᵀW' sums over row blocks: one accumulator per matrix
                acc, orig = stored.get(i, (0.0, stats["coeff"]))
                stored[i] = (acc + (qt[:, s:e] @ back).astype(np.float64), orig)
            else:
                dev_sq += float(np.sum(np.square((back @ q).astype(np.float64) - keep * stats["coeff"])))
            yield enc
        dev_sq += sum(float(np.sum(np.square(acc - keep * orig))) for acc, orig in stored.values())
        before = math.sqrt(stats.get("component_sq", 0.0))
        self.report.component[edit.name] = before
        self.report.leakage[edit.name] = math.sqrt(dev_sq) / before if before > 0 else 0.0
        self.ck.release(edit.name)

    def _fp8_round(self, edit, i, axis, s, e, out, tile, carry) -> np.ndarray:
        """Rounding that keeps the ablation on the fp8 grid (the tile scales are fixed first). Residual-
        axis-0 tensors arrive in row blocks: each block's rounding also cancels what the blocks before it
        left along Q (carried per matrix), so QᵀW' of the whole matrix stays at its exact value."""
        lo_q, hi_q, lo, hi = fp8_neighbours(out, tile, BLOCK_ROWS)
        x = out.astype(np.float64)
        if axis == 0:
            qb = edit.q[s:e].astype(np.float64)
            prev = carry.get(i, 0.0)
            up = orthogonal_rounding(x, lo, hi, qb, 0, qb.T @ x - prev)
            chosen = np.where(up, hi, lo).astype(np.float64)
            carry[i] = prev + qb.T @ (chosen - x)
        else:
            up = orthogonal_rounding(x, lo, hi, edit.q, 1)
        return np.where(up, hi_q, lo_q)

    # --- small tensors ---------------------------------------------------------------------
    def encode_small(self, edit: TensorEdit, values: np.ndarray) -> np.ndarray:
        return encode(values, edit.dtype, saturate=edit.dtype in _SATURATE)

    def produce_other(self, edit: TensorEdit) -> Iterator[np.ndarray]:
        if edit.op == "requant_scale":
            yield encode(self.new_scales[edit.source_name], edit.dtype, saturate=True)
        elif edit.op == "copy_of":
            src = self.ck.info(edit.source_name)
            for s in range(0, src.shape[0], 4096):
                yield np.array(self.ck.array(src.name, s, min(s + 4096, src.shape[0])))
        else:
            yield from super().produce_other(edit)


def shard_layout(plan: Plan, ex: _Executor) -> dict[str, list[OutTensor]]:
    """Output tensors per shard: input order kept, new tensors appended to their shard."""
    out = {}
    for fname in plan.ck.files:
        tensors = []
        for info in plan.ck.shard_tensors(fname):
            edit = plan.edits.get(info.name)
            if edit is None:
                tensors.append(OutTensor(info.name, info.dtype, info.shape, source=info))
            else:
                tensors.append(
                    OutTensor(info.name, edit.dtype, edit.shape, produce=ex.producer(edit), finite=True)
                )
        for edit in plan.new:
            if edit.shard == fname:
                tensors.append(
                    OutTensor(edit.name, edit.dtype, edit.shape, produce=ex.producer(edit), finite=True)
                )
        out[fname] = tensors
    return out


def prepare(plan: Plan, requant: str | None = None, rounding: str = "orthogonal") -> Plan:
    """Output dtypes are the input's, as the planner chose them; `requant` and `rounding` are GGUF's
    (FP8 tiles always round orthogonally)."""
    return plan


def progress_total(plan: Plan) -> int:
    return plan.ck.total_bytes + sum(e.nbytes for e in plan.new)


def execute(
    plan: Plan,
    out: Path,
    *,
    force: bool = False,
    command: str = "",
    progress: Callable[[int], None] | None = None,
    on_shard: Callable[[str], None] | None = None,
    recipe: dict | None = None,
    hash_files: bool = True,
    shards_in_flight: int | None = None,
    rehash_inputs: bool = False,
) -> Report:
    """Write the edited checkpoint into `out` (atomically). With `hash_files`, the sha256 of every input
    and output shard is computed from the bytes as they stream (each input byte read once, each output
    byte written once), except inputs whose digest is known (digest cache, hub blob name) unless
    `rehash_inputs`; `shards_in_flight` (default: from the cores, patcher.edit.shards) = 1 finishes
    each shard before computing the next (same bytes for any number)."""
    t0 = time.perf_counter()
    keep_freed_blocks()
    in_flight = shards.in_flight(len(plan.ck.files), shards_in_flight)
    with _one_blas_thread():
        return _execute(
            plan, out, force, command, progress, on_shard, recipe, hash_files, in_flight, rehash_inputs, t0
        )


def _one_blas_thread():
    """The edit's products are rank-k updates of 128-row blocks, and the other core is busy reading,
    hashing and writing: OpenBLAS's second thread only spins (2.3x the CPU time for the same run,
    measured under load); one thread on every machine also means one summation order for the products."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an environment installed before the dependency: slower, same bytes
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _execute(
    plan, out, force, command, progress, on_shard, recipe, hash_files, shards_in_flight, rehash, t0
) -> Report:
    report = Report(out=Path(out))
    ck = plan.ck
    ex = _Executor(plan, report)
    hasher = manifest.Hasher(enabled=hash_files)
    try:
        with AtomicOutput(out, "folder", inputs=ck.input_paths, force=force) as tmp:
            shard_paths = {sf.path for sf in ck.files.values()}
            inputs = ck.storage.input_files()  # what this run reads, not unrelated weight files beside it
            for p in inputs:
                if p not in shard_paths:  # config, tokenizer: small, hashed on the side
                    hasher.add(p.name, p)
            t_pre = time.perf_counter()
            for edit in plan.edits.values():
                if edit.op == "project" and edit.fp8_scale:
                    ex.fp8_prepass(edit)
            t_pre = time.perf_counter() - t_pre
            layout = shard_layout(plan, ex)
            report.bytes_written = sum(t.nbytes for ts in layout.values() for t in ts)
            run = ShardRun(plan, tmp, hasher, progress, on_shard, rehash=rehash)
            run.run(layout, shards_in_flight)
            if ck.index_path is not None:
                _write_index(ck, layout, tmp)
            report.skipped_files = _copy_side_files(ck, tmp, plan.config_updates)
            hasher.add_folder(tmp, "out/", skip=set(ck.files))
            digests = hasher.results()
            hub = _hub_cache_names(inputs, digests, hash_files, report, run.from_hub)
            report.digests_from_hub = sorted(run.from_hub)
            report.seconds = time.perf_counter() - t0
            report.leakage = dict(sorted(report.leakage.items()))  # shards finish in any order
            report.component = dict(sorted(report.component.items()))
            manifest.write(
                tmp,
                kind=plan.record.get("op", "edit"),
                command=command,
                record=plan.record,
                inputs={k: v for k, v in digests.items() if not k.startswith("out/")},
                outputs={k[4:]: v for k, v in digests.items() if k.startswith("out/")},
                directions=[
                    {
                        "source": plan.record.get("direction"),
                        "sha256": plan.record.get("direction_sha256"),
                        "file_sha256": _file_digest(plan.record.get("direction")),
                    }
                ],
                timings={"seconds": round(report.seconds, 3)},
                recipe=recipe,
                extra=({"hub_cache": hub, "warnings": report.warnings} if hub or report.warnings else None),
            )
            t_flush = time.perf_counter()
    except BaseException:
        hasher.cancel()
        raise
    report.seconds = time.perf_counter() - t0  # the final flush (fsync) included
    report.time_parts = time_parts(
        report.seconds, run.seconds, run.busy_seconds(), t_pre, time.perf_counter() - t_flush
    )
    report.threads_busy = sum(run.busy_seconds().values()) / run.seconds if run.seconds > 0 else 0.0
    return report


def time_parts(
    wall: float, shard_wall: float, busy: dict[str, float], prepass: float, flush: float
) -> dict[str, float]:
    """Where the wall time went: read, edit, hash, write, other (opening, plan, side files, manifest).
    While shards are written the threads overlap, so the shard phase's wall time is shared out in
    proportion to the thread-seconds each activity took; the FP8 prepass is edit, the final flush write."""
    total = sum(busy.values())
    parts = {k: shard_wall * v / total if total > 0 else 0.0 for k, v in busy.items()}
    parts["edit"] += prepass
    parts["write"] += flush
    parts["other"] = max(0.0, wall - sum(parts.values()))
    return parts


def _hub_cache_names(
    inputs: list[Path], digests: dict, hashed: bool, report: Report, trusted: dict[str, str]
) -> dict:
    """Inputs from a Hugging Face cache snapshot: the sha256 in the blob's name. Weight files whose
    name was taken as their digest (`trusted`) were not read for it; the others are checked against
    the bytes that streamed. A mismatch means the cache file is damaged or was replaced."""
    hub = {}
    for p in inputs:
        name_sha = manifest.hub_blob_sha256(p)
        if name_sha is None:
            continue
        matches = digests.get(p.name) == name_sha if hashed and p.name not in trusted else None
        hub[p.name] = {
            "sha256": name_sha,
            "matches_streamed_sha256": matches,
            "source": "taken from the Hugging Face cache name (blobs/<sha256>)"
            + ("; used as the input digest without reading the file" if p.name in trusted else ""),
        }
        if matches is False:
            report.warnings.append(
                f"{p.name}: sha256 of its bytes {digests.get(p.name)} differs from the "
                f"Hugging Face cache name {name_sha}: the cached file is damaged or "
                "was replaced"
            )
    return hub


def _file_digest(spec: str | None) -> str | None:
    path = Path(str(spec).split(":")[0]) if spec else None
    return manifest.sha256_file(path) if path and path.is_file() else None


def _write_index(ck: Model, layout: dict[str, list[OutTensor]], tmp: Path) -> None:
    index = json.loads(ck.index_path.read_text(encoding="utf-8"))
    index["weight_map"] = {t.name: fname for fname, ts in layout.items() for t in ts}
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    meta["total_size"] = sum(t.nbytes for ts in layout.values() for t in ts)
    index["metadata"] = meta
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_side_files(ck: Model, tmp: Path, config_updates: dict) -> list[str]:
    """Copy config, tokenizer and other small files. Other weight files (pickles, GGUF, sub-folders
    such as original/) are not copied: they would carry the unedited weights."""
    skipped = []
    written = set(ck.files) | {INDEX_NAME, manifest.MANIFEST}  # an input's manifest describes the input
    for p in sorted(ck.folder.iterdir()) if ck.path.is_dir() else []:
        if p.name in written:
            continue
        if p.is_dir() or p.suffix in WEIGHT_SUFFIXES:
            skipped.append(p.name + ("/" if p.is_dir() else ""))
            continue
        if p.name == "config.json" and config_updates:
            cfg = {**ck.config, **config_updates}
            (tmp / p.name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(p, tmp / p.name)
    return skipped
