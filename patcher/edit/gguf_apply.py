"""Executing a Plan on a GGUF (the writer patcher.edit.executor.WRITERS names for "gguf"): a new GGUF with
the metadata and every untouched tensor copied byte for byte, edited tensors re-quantized with rounding
that keeps the ablation.

Each edited matrix (one expert at a time for fused `_exps` tensors; row chunks for embeddings, whose
written vectors are rows) is dequantized to float64, projected exactly, and put back on the grid of its
own type (scales fixed from the exact values, kernels/ggml_quant.py). Plain round-to-nearest would put
back a large share of the removed component on 4-bit grids; orthogonal_rounding chooses per element
between the two neighbouring grid values so Qᵀ(stored) stays at its exact value. Both roundings are
measured and reported per tensor; the bytes written are checked against the gguf package's dequantizer.
K-quants keep their type (scales as llama.cpp's quantizer picks them, kernels/kquant.py); IQ types, which
nothing here can write, become the nearest K type with at least their bits per weight; `requant` replaces
both with a type the user chose.
"""

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from patcher_kernels.ggml_quant import BLOCK_TYPES, FLOAT_TYPES, K_TYPES, block_size, grid, row_bytes
from patcher_kernels.ortho_greedy import orthogonal_rounding_rank1
from patcher_kernels.ortho_round import orthogonal_rounding
from patcher_kernels.project import project_full

from patcher.edit.executor import Executor, Report
from patcher.edit.plan import Plan, TensorEdit
from patcher.errors import PatcherError
from patcher.io.atomic import AtomicOutput
from patcher.io.gguf import PROVENANCE_KEY, GGUFFile, OutTensorGGUF, string_field, write_gguf

KIND = "file"  # what -o names
ROUNDINGS = ("orthogonal", "nearest")
ROW_CHUNK = 4096  # rows of a residual-axis-1 tensor (embeddings) handled at once
COL_CHUNK = 2048  # columns of a residual-axis-0 matrix handled at once (a multiple of every block size)
REQUANT_TYPES = (
    "Q8_0",
    "Q6_K",
    "Q5_K",
    "Q5_1",
    "Q5_0",
    "Q4_K",
    "Q4_1",
    "Q4_0",
    "Q3_K",
    "Q2_K",
    "F16",
    "BF16",
    "F32",
)
# IQ (and ternary) types are read through the gguf package's dequantizers; edited ones are written as the
# K type with the fewest bits per weight that is not below theirs (llama.cpp's table of sizes)
IQ_AS_K = {
    "IQ1_S": "Q2_K",
    "IQ1_M": "Q2_K",
    "IQ2_XXS": "Q2_K",
    "IQ2_XS": "Q2_K",
    "IQ2_S": "Q2_K",
    "TQ1_0": "Q2_K",
    "TQ2_0": "Q2_K",
    "IQ3_XXS": "Q3_K",
    "IQ3_S": "Q3_K",
    "IQ4_XS": "Q4_K",
    "IQ4_NL": "Q4_K",
}
FALLBACK = "Q8_0"  # other types no writer here knows (or an IQ4_NL row too short for a K super-block)
_SMALL_TYPES = ("F32", "F16", "BF16")  # biases keep these; anything else is written F32


@dataclass
class Rounding:
    """What storage did to one edited tensor: plain nearest rounding vs the rounding that was written."""

    source_type: str
    stored_type: str
    leakage_plain: float  # |Qᵀ(nearest) − keep·QᵀW| / |QᵀW|
    leakage: float  # the same for the bytes written
    error_plain: float  # |nearest − exact| / |exact|
    error: float


@dataclass
class _Acc:
    comp: float = 0.0
    dev_plain: float = 0.0
    dev: float = 0.0
    err_plain: float = 0.0
    err: float = 0.0
    norm: float = 0.0


def stored_type(source: str, requant: str | None, row: int) -> str:
    """The type an edited tensor is written in: F*/Q*_0/Q*_1 their own; K-quants their own unless the
    user chose `requant`; IQ the nearest K type (or `requant`); anything else `requant` or Q8_0."""
    if source in FLOAT_TYPES or source in BLOCK_TYPES:
        return source
    if requant is not None:
        return requant
    want = source if source in K_TYPES else IQ_AS_K.get(source, FALLBACK)
    return want if row % block_size(want) == 0 else FALLBACK


def prepare(plan: Plan, requant: str | None = None, rounding: str = "orthogonal") -> Plan:
    """Fix every edit's output type (what the dry-run shows) and say what llama.cpp will see.
    requant None keeps each K-quant's type (IQ: the nearest K type); `rounding` (orthogonal or nearest)
    is recorded for execute."""
    if rounding not in ROUNDINGS:
        raise PatcherError("--rounding", f"must be orthogonal or nearest, got {rounding!r}")
    requant = requant.upper() if requant else None
    if requant is not None and requant not in REQUANT_TYPES:
        raise PatcherError("--requant", f"must be one of {', '.join(REQUANT_TYPES)}, got {requant!r}")
    g = _gguf(plan)
    changed = []
    for e in plan.all():
        src = (
            g.tensors[e.source_name if e.op == "copy_of" else e.name].dtype
            if e.name in g.tensors or e.source
            else "F32"
        )
        if e.op == "project":
            e.dtype = stored_type(src, requant, e.shape[-1])
            if e.dtype != src:
                changed.append(f"{e.name} {src}→{e.dtype}")
            if e.shape[-1] % block_size(e.dtype):
                raise PatcherError(g.path, f"{e.name}: rows of {e.shape[-1]} cannot hold {e.dtype} blocks")
        elif e.op == "copy_of":
            e.dtype = src
        else:
            e.dtype = src if src in _SMALL_TYPES and e.name in g.tensors else "F32"
    if changed:
        why = (
            f"re-quantized as --requant {requant.lower()} asks"
            if requant is not None
            else "written in another type (IQ: the nearest K type; no writer for their own)"
        )
        plan.notes.append(
            f"{why}: "
            + ", ".join(changed[:6])
            + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        )
        plan.record["gguf_retyped"] = dict(c.split(" ", 1) for c in changed)
    plan.notes = [n for n in plan.notes if "config.json" not in n and "HF transformers" not in n]
    if plan.config_updates.pop("tie_word_embeddings", None) is not None:  # GGUF has no config.json
        plan.notes.append(
            "untied: output.weight keeps the original embedding (llama.cpp uses it when present)"
        )
    plan.config_updates.clear()
    for e in plan.all():
        if e.op in ("inject_bias", "new_bias"):
            plan.notes.append(
                f"{e.name}: llama.cpp's {g.gguf_arch} loader adds this bias to the block output"
            )
    plan.record["gguf_requant"] = requant or "keep"
    plan.record["rounding"] = rounding
    return plan


def progress_total(plan: Plan) -> int:
    return sum(t.nbytes for t in plan.ck.tensors.values())


def nbytes(e: TensorEdit) -> int:
    return math.prod(e.shape[:-1]) * row_bytes(e.dtype, e.shape[-1])


def _gguf(plan: Plan) -> GGUFFile:
    g = plan.ck.storage
    if not isinstance(g, GGUFFile):
        raise PatcherError(plan.ck.path, f"a GGUF edit needs a GGUF file, not a {g.format} checkpoint")
    return g


def _qtype(name: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[name])


def _check_bytes(data: np.ndarray, qtype: str, expected: np.ndarray, name: str) -> np.ndarray:
    """The gguf package's dequantizer must read back exactly the values rounding chose."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    back = np.asarray(dequantize(data, GGMLQuantizationType[qtype]), dtype=np.float32).reshape(expected.shape)
    if not np.array_equal(back, expected.astype(np.float32)):
        raise RuntimeError(f"{name}: encoded {qtype} bytes do not dequantize to the chosen values")
    return back


class _GGUFExecutor(Executor):
    def __init__(self, plan: Plan, report: Report, ortho: bool):
        super().__init__(plan, report)
        self.g = _gguf(plan)
        self.ortho = ortho

    def _matrices(self, e: TensorEdit) -> Iterator[tuple[np.ndarray, int]]:
        """(float32 matrix, residual axis within it) in file order: one expert at a time, row chunks where
        the written vectors are rows. `--norm-preserve rows` needs whole matrices (norms across vectors)."""
        whole = e.preserve == "rows"
        if len(e.shape) == 3:
            for x in range(e.shape[0]):
                yield self.g.array(e.name, x, x + 1)[0], e.axis - 1
            return
        if e.axis == 1 and not whole:
            for s in range(0, e.shape[0], ROW_CHUNK):
                yield self.g.array(e.name, s, min(s + ROW_CHUNK, e.shape[0])), 1
            return
        yield self.g.array(e.name), e.axis

    def produce_projection(self, e: TensorEdit) -> Iterator[np.ndarray]:
        acc = _Acc()
        for w, axis in self._matrices(e):
            if axis == 0 and e.preserve != "rows":  # columns are independent: float64 work per column chunk
                cols = w.shape[1]
                yield np.concatenate(
                    [
                        self._round(e, w[:, c : c + COL_CHUNK].astype(np.float64), 0, acc)
                        for c in range(0, cols, COL_CHUNK)
                    ],
                    axis=1,
                )
            else:
                yield self._round(e, w.astype(np.float64), axis, acc)
        comp = math.sqrt(acc.comp)
        rel = lambda v: math.sqrt(v) / comp if comp > 0 else 0.0  # noqa: E731
        self.report.component[e.name] = comp
        self.report.leakage[e.name] = rel(acc.dev)
        norm = math.sqrt(acc.norm) or 1.0
        self.report.rounding[e.name] = Rounding(
            self.g.info(e.name).dtype,
            e.dtype,
            rel(acc.dev_plain),
            rel(acc.dev),
            math.sqrt(acc.err_plain) / norm,
            math.sqrt(acc.err) / norm,
        )
        self.g.release(e.name)

    def _round(self, e: TensorEdit, w: np.ndarray, axis: int, acc: _Acc) -> np.ndarray:
        """Project exactly, put back on the grid (orthogonal or nearest), check the bytes, keep the stats."""
        keep, q = 1.0 - e.scale, e.basis
        x = project_full(w, q, axis, e.scale)
        if e.preserve:
            x = _preserve(w, x, e.preserve, axis)
        gr = grid(x, e.dtype)
        plain = gr.nearest(x)
        chosen = _orthogonal(x, gr.lo, gr.hi, q, axis) if self.ortho else plain
        data = gr.pack(chosen)
        stored = _check_bytes(data, e.dtype, gr.values(chosen), e.name).astype(np.float64)
        nearest = gr.values(plain).astype(np.float64)
        comp = _component(w, q, axis)
        acc.comp += float(np.sum(comp**2))
        acc.dev += float(np.sum((_component(stored, q, axis) - keep * comp) ** 2))
        acc.dev_plain += float(np.sum((_component(nearest, q, axis) - keep * comp) ** 2))
        acc.err += float(np.sum((stored - x) ** 2))
        acc.err_plain += float(np.sum((nearest - x) ** 2))
        acc.norm += float(np.sum(x**2))
        return data

    def encode_small(self, e: TensorEdit, values: np.ndarray) -> np.ndarray:
        row = np.asarray(values, dtype=np.float64).reshape(1, -1)
        gr = grid(row, e.dtype)
        return gr.pack(gr.nearest(row))

    def produce_other(self, e: TensorEdit) -> Iterator[np.ndarray]:
        if e.op != "copy_of":
            raise PatcherError(self.g.path, f"{e.name}: operation {e.op!r} is not available for GGUF output")
        yield np.array(self.g.raw(e.source_name))

    def out_tensor(self, e: TensorEdit) -> OutTensorGGUF:
        produce = self.producer(e)
        size = self.g.info(e.source_name).nbytes if e.op == "copy_of" else nbytes(e)  # a copy keeps any type
        return OutTensorGGUF(e.name, _qtype(e.dtype), tuple(reversed(e.shape)), size, produce=produce)


def _orthogonal(x, lo, hi, q, axis):
    """Rank 1 (the usual ablation): the one-pass greedy, which has no flip budget to run out of on
    large, pre-quantized matrices; rank k: coordinate descent (kernels/ortho_round.py)."""
    if q.shape[1] == 1:
        return orthogonal_rounding_rank1(x, lo, hi, q[:, 0], axis)
    return orthogonal_rounding(x, lo, hi, q, axis)


def _component(w: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
    return q.T @ w if axis == 0 else w @ q


def _preserve(w: np.ndarray, x: np.ndarray, mode: str, axis: int) -> np.ndarray:
    """Norm preservation named in nn.Linear orientation (see kernels/project.py): cols = written vectors."""
    vec_axis = 0 if axis == 0 else 1  # the axis a written vector runs along
    along = vec_axis if mode == "cols" else 1 - vec_axis
    old = np.linalg.norm(w, axis=along, keepdims=True)
    new = np.linalg.norm(x, axis=along, keepdims=True)
    return x * np.where(new > 0, old / np.where(new > 0, new, 1.0), 1.0)


def execute(
    plan: Plan,
    out: Path,
    *,
    force: bool = False,
    command: str = "",
    progress: Callable[[int], None] | None = None,
    on_shard: Callable[[str], None] | None = None,
    hash_files: bool = True,
    shards_in_flight: int | None = None,
    rehash_inputs: bool = False,
) -> Report:
    """Write the edited GGUF at `out` (atomically), with the rounding `prepare` recorded. The writer
    interface's other options are a folder's: one file carries its provenance in its metadata, with no
    manifest to hash into (`hash_files`, `rehash_inputs`) and no shards to run at once."""
    report = Report(out=Path(out))
    t0 = time.perf_counter()
    g = _gguf(plan)
    ortho = plan.record.setdefault("rounding", "orthogonal") == "orthogonal"
    ex = _GGUFExecutor(plan, report, ortho)
    if on_shard:
        on_shard(g.path.name)
    tensors = []
    for info in g.shard_tensors(g.path.name):
        e = plan.edits.get(info.name)
        tensors.append(
            ex.out_tensor(e) if e else OutTensorGGUF(info.name, info.qtype, info.ne, info.nbytes, source=info)
        )
    tensors += [ex.out_tensor(e) for e in plan.new]
    record = dict(plan.record)
    fields = [raw for key, raw in g.field_bytes() if key != PROVENANCE_KEY]
    fields.append(string_field(PROVENANCE_KEY, json.dumps(record, sort_keys=True)))
    with AtomicOutput(out, "file", inputs=[g.path], force=force) as tmp:
        write_gguf(tmp, fields, tensors, g.alignment, on_bytes=progress)
        report.bytes_written = tmp.stat().st_size
    report.seconds = time.perf_counter() - t0
    return report


def write_control_vector(
    path: Path, vector: np.ndarray, layer: int, n_layers: int, model_hint: str, force: bool = False
) -> None:
    """llama.cpp's control vector: tensor `direction.{layer}` is added to the output of block `layer`
    (llama.cpp's common loader stores direction.N for N >= 1 and applies tensors[il] after block il, for
    il in 1..n_layer-1), i.e. patcher's "inject at layer l", first visible in resid_pre[l + 1]."""
    if not 1 <= layer <= n_layers - 1:
        raise PatcherError(
            "--layer",
            f"llama.cpp applies control vectors after blocks 1..{n_layers - 1} only "
            f"(it never reads direction.0); got layer {layer}",
        )
    v = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(-1))
    fields = [
        string_field("general.architecture", "controlvector"),
        string_field("controlvector.model_hint", model_hint),
        _u32_field("controlvector.layer_count", 1),
    ]
    t = OutTensorGGUF(f"direction.{layer}", 0, (v.size,), v.nbytes, produce=lambda: iter([v]))
    with AtomicOutput(path, "file", inputs=[], force=force) as tmp:
        write_gguf(tmp, fields, [t])


def _u32_field(key: str, value: int) -> bytes:
    import struct

    b = key.encode()
    return struct.pack("<Q", len(b)) + b + struct.pack("<II", 4, value)  # 4 = GGUFValueType.UINT32


def summary_rows(report: Report) -> list[tuple[str, str, str, float, float, float, float, int]]:
    """Per (source type, stored type): tensors, leakage plain vs written, weight error plain vs written
    (component-weighted RMS over tensors)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, r in report.rounding.items():
        groups.setdefault((r.source_type, r.stored_type), []).append(name)
    rows = []
    for (src, dst), names in sorted(groups.items()):
        comp = [report.component[n] for n in names]
        w = np.square(comp)
        tot = float(w.sum()) or 1.0
        lp = math.sqrt(sum(wi * report.rounding[n].leakage_plain ** 2 for wi, n in zip(w, names)) / tot)
        lo = math.sqrt(sum(wi * report.rounding[n].leakage ** 2 for wi, n in zip(w, names)) / tot)
        ep = float(np.sqrt(np.mean([report.rounding[n].error_plain ** 2 for n in names])))
        eo = float(np.sqrt(np.mean([report.rounding[n].error ** 2 for n in names])))
        rows.append((src, dst, f"{len(names)}", lp, lo, ep, eo, len(names)))
    return rows
