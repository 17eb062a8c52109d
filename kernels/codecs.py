"""Storage dtypes <-> float32, bit-exact round to nearest even (ml_dtypes does the rounding).

numpy has no bf16 or fp8; ml_dtypes supplies them as real numpy dtypes, so decoding is a cast
and encoding is a cast with IEEE round-to-nearest-even.
"""

import numpy as np

# safetensors dtype name -> numpy dtype. Integer and bool types are carried through untouched.
_NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
}
# integer and boolean storage: codes, not weights (never edited along a direction, never exported)
INTEGER_DTYPES = frozenset(k for k, v in _NUMPY.items() if v.kind in "biu")
# dtypes only ml_dtypes provides, by attribute name: imported on first use, because some ml_dtypes
# releases take ~1 s to import (0.7.0 on numpy 2.4, measured) and headers only need item sizes
_ML = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}
_ITEMSIZE = {
    **{k: v.itemsize for k, v in _NUMPY.items()},
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_FINITE_MAX: dict[str, float] = {}  # finite range of each float storage type (values beyond become inf/NaN)


def _load_ml_dtypes() -> None:
    import ml_dtypes

    for name, attr in _ML.items():
        _NUMPY[name] = np.dtype(getattr(ml_dtypes, attr))
    _FINITE_MAX.update({name: float(ml_dtypes.finfo(_NUMPY[name]).max) for name in FLOAT_DTYPES})


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name, without importing ml_dtypes (KeyError if unknown)."""
    return _ITEMSIZE[name]


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a safetensors dtype name (KeyError if unknown)."""
    if name not in _NUMPY and name in _ML:
        _load_ml_dtypes()
    return _NUMPY[name]


def decode(raw: np.ndarray, accumulate=np.float32) -> np.ndarray:
    """Storage array (any float dtype) -> float32/float64 copy."""
    return raw.astype(accumulate)


def encode(values: np.ndarray, dtype_name: str, saturate: bool = False) -> np.ndarray:
    """float32/64 -> storage dtype, round to nearest even. `saturate` clips to the finite range
    first (fp8 e4m3fn has no inf: anything past 448 would turn into NaN)."""
    if saturate:
        if not _FINITE_MAX:
            _load_ml_dtypes()
        m = _FINITE_MAX[dtype_name]
        values = np.clip(values, -m, m)
    return values.astype(numpy_dtype(dtype_name))


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype_name: str) -> np.ndarray:
    """How many representable steps of `dtype_name` separate a and b (both already in that dtype).

    Uses the ordered integer view of the IEEE bit pattern, so it is exact at every magnitude."""
    dt = numpy_dtype(dtype_name)
    itype = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[dt.itemsize]

    def ordered(x):
        i = np.ascontiguousarray(x, dtype=dt).view(itype).astype(np.int64)
        sign_bit = np.int64(1) << (8 * dt.itemsize - 1)
        return np.where(i < 0, -(i & (sign_bit - 1)), i)

    return np.abs(ordered(a) - ordered(b))
