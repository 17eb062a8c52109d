"""GGUF metadata key/value records, encoded as the file stores them (little-endian, GGUF v3).

`encode(key, value)` picks the GGUF type from the Python value: str -> STRING, bool -> BOOL, int -> UINT32
(INT32 when negative, UINT64/INT64 past 32 bits), float -> FLOAT32, and lists of one of these -> ARRAY.
`typed(value, kind)` forces a type where llama.cpp expects a specific one (token types are INT32 arrays).
"""

import struct
from dataclasses import dataclass

# gguf.GGUFValueType, as numbers (this module has no dependency on the gguf package)
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64 = 4, 5, 6, 7, 8, 9, 10, 11
_PACK = {UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q"}


@dataclass(frozen=True)
class typed:
    """A value with its GGUF type fixed (for arrays: the element type)."""

    value: object
    kind: int


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kind(v) -> int:
    if isinstance(v, str):
        return STRING
    if isinstance(v, bool):
        return BOOL
    if isinstance(v, int):
        if v < 0:
            return INT32 if v >= -(1 << 31) else INT64
        return UINT32 if v < (1 << 32) else UINT64
    if isinstance(v, float):
        return FLOAT32
    raise TypeError(f"no GGUF type for {type(v).__name__}")


def _scalar(v, kind: int) -> bytes:
    return _string(v) if kind == STRING else struct.pack(_PACK[kind], v)


def _array(items: list, kind: int | None) -> bytes:
    kind = kind if kind is not None else (_kind(items[0]) if items else UINT32)
    if kind == STRING:
        body = b"".join(map(_string, items))
    else:
        body = struct.pack(f"<{len(items)}{_PACK[kind][1]}", *items)
    return struct.pack("<IQ", kind, len(items)) + body


def encode(key: str, value) -> bytes:
    """One key/value record: key, type, value."""
    kind = value.kind if isinstance(value, typed) else None
    v = value.value if isinstance(value, typed) else value
    if isinstance(v, (list, tuple)):
        return _string(key) + struct.pack("<I", ARRAY) + _array(list(v), kind)
    kind = kind if kind is not None else _kind(v)
    return _string(key) + struct.pack("<I", kind) + _scalar(v, kind)
