"""Pure numpy math for patcher: projections, bias edits, dtype codecs, fp8 block scales.

No file I/O, no tensor names, no CLI: every function takes arrays and returns arrays,
so it can be tested against a float64 reference in isolation.
"""
from patcher_kernels.codecs import decode, encode, numpy_dtype, ulp_distance
from patcher_kernels.fp8 import FP8_MAX, block_amax, dequantize_blocks, requantize_scale, quantize_blocks
from patcher_kernels.stream import ablate_blocks
from patcher_kernels.project import (
    bias_inject,
    bias_project,
    orthonormalize,
    project_block_cols,
    project_block_rows,
    project_full,
    rescale_norms,
    residual_coefficients,
)

__all__ = [
    "ablate_blocks",
    "FP8_MAX",
    "bias_inject",
    "bias_project",
    "block_amax",
    "decode",
    "dequantize_blocks",
    "encode",
    "numpy_dtype",
    "orthonormalize",
    "project_block_cols",
    "project_block_rows",
    "project_full",
    "quantize_blocks",
    "requantize_scale",
    "rescale_norms",
    "residual_coefficients",
    "ulp_distance",
]
