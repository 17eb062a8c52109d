"""Executing a Plan, whatever the storage format: the report, the shared executor, and which module
writes each format.

A format's writer is a module (WRITERS, by `Storage.format`) with the same four names:
`KIND` ("folder" or "file": what `-o` names), `prepare(plan, requant)` (fix output types before a dry
run), `progress_total(plan)` (bytes a progress bar counts) and `execute(plan, out, ...)`. Its executor
subclasses `Executor`: the small tensors' values (biases) are computed here once; a format encodes them
and projects matrices its own way (safetensors: row blocks of the stored dtype, FP8 tiles; GGUF: GGML
blocks with rounding that keeps the ablation).
"""

import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from patcher_kernels.project import bias_inject, bias_project

from patcher.edit.plan import Plan, TensorEdit

# Storage.format -> the module that writes edits to it (imported when first used)
WRITERS = {"safetensors": "patcher.edit.apply", "gguf": "patcher.edit.gguf_apply"}

# the values of a small tensor (a bias) after each operation, in float64
BIAS_VALUES: dict[str, Callable] = {
    "project_bias": lambda ck, e: bias_project(ck.array(e.name), e.q, e.scale),
    "inject_bias": lambda ck, e: bias_inject(ck.array(e.name), e.vector, 1.0),
    "new_bias": lambda ck, e: bias_inject(None, e.vector, 1.0),
    "zero_bias": lambda ck, e: np.zeros(e.shape),
}


@dataclass
class Report:
    out: Path | None = None
    seconds: float = 0.0
    bytes_written: int = 0
    leakage: dict[str, float] = field(default_factory=dict)  # per projected tensor
    component: dict[str, float] = field(default_factory=dict)  # |QᵀW| before, per tensor
    skipped_files: list[str] = field(default_factory=list)
    rounding: dict = field(default_factory=dict)  # GGUF: per tensor, plain vs written rounding (gguf_apply)
    warnings: list[str] = field(default_factory=list)  # shown in the summary and the manifest
    time_parts: dict[str, float] = field(default_factory=dict)  # where `seconds` went (time_parts())
    threads_busy: float = 0.0  # threads busy on average while the shards were written
    digests_from_hub: list[str] = field(default_factory=list)  # inputs digested by their blob name

    def overall_leakage(self, names=None) -> float:
        names = self.leakage.keys() if names is None else names
        num = sum((self.leakage[n] * self.component[n]) ** 2 for n in names)
        den = sum(self.component[n] ** 2 for n in names)
        return math.sqrt(num / den) if den else 0.0


class Executor:
    """Produces each edited tensor's encoded bytes, block by block, and records what storage did to
    them in `report`. A format implements `produce_projection` and `encode_small`, and may take over
    operations of its own (`produce_other`)."""

    def __init__(self, plan: Plan, report: Report):
        self.plan, self.ck, self.report = plan, plan.ck, report

    def producer(self, edit: TensorEdit) -> Callable[[], Iterator[np.ndarray]]:
        if edit.op == "project":
            return lambda: self.produce_projection(edit)
        return lambda: self.produce_small(edit)

    def produce_small(self, edit: TensorEdit) -> Iterator[np.ndarray]:
        value = BIAS_VALUES.get(edit.op)
        if value is None:
            yield from self.produce_other(edit)
            return
        yield self.encode_small(edit, np.asarray(value(self.ck, edit)).reshape(edit.shape))

    def produce_projection(self, edit: TensorEdit) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def encode_small(self, edit: TensorEdit, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def produce_other(self, edit: TensorEdit) -> Iterator[np.ndarray]:
        raise AssertionError(edit.op)  # the planner made an operation no writer knows


def writer_for(plan: Plan) -> ModuleType:
    """The module that writes edits to the plan's storage format (see the module notes)."""
    return importlib.import_module(WRITERS[plan.ck.format])
