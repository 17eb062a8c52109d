"""A GGUF header read straight from the memory-mapped file, in bulk: numeric arrays are numpy views
(np.frombuffer), string arrays are walked once to find their end and decoded only when asked (a 262k
vocabulary costs one pass over its length prefixes, not a Python object per element). Every count and
length is checked against the bytes left in the file before anything is allocated.

Layout (GGUF v2/v3, little-endian): magic, u32 version, u64 tensor count, u64 key count; key/value records
(string key, u32 type, value); tensor infos (string name, u32 n_dims, u64 ne[n_dims], u32 type,
u64 offset from the data section); padding to `general.alignment` (default 32); tensor data.
"""

import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from patcher.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: real files use none
STRING, ARRAY = 8, 9
# value type -> numpy dtype of one element (every type but STRING and ARRAY)
NUMERIC: dict[int, np.dtype] = {
    0: np.dtype("u1"),
    1: np.dtype("i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("u1"),  # BOOL: one byte, nonzero is true
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
BOOL = 7
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class Field:
    """One key/value record: bytes [offset, end) hold it whole; the value starts at `at`. Arrays also
    carry their element type and count (their data starts at `at` + 12)."""

    key: str
    type: int
    offset: int
    at: int
    end: int
    item_type: int | None = None  # arrays only
    count: int = 0  # arrays only


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # GGUF order: ne0 (the contiguous axis) first
    qtype: int
    offset: int  # from the start of the data section


class _Cursor:
    """Reads forward through the buffer; every read is checked against the file's length first."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.size, self.pos = buf, path, len(buf), 0

    def fail(self, what: str) -> NoReturn:
        raise CheckpointError(self.path, what)

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            self.fail(
                f"{what} at byte {self.pos} needs {n} bytes, past the end of the {self.size}-byte file "
                f"(truncated or corrupt)"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        start = self.need(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not UTF-8")

    def skip_array(self, item_type: int, count: int, what: str, depth: int = 0) -> None:
        if item_type in NUMERIC:
            self.need(count * NUMERIC[item_type].itemsize, what)
        elif item_type == STRING:
            self._skip_strings(count, what)
        elif item_type == ARRAY:
            if depth >= MAX_NESTING:
                self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
            self.need(count * 12, what)  # each inner array has at least its type and count
            self.pos -= count * 12
            for _ in range(count):
                self.skip_array(self.u32(what), self.u64(what), what, depth + 1)
        else:
            self.fail(f"{what} has unknown element type {item_type}")

    def _skip_strings(self, count: int, what: str) -> None:
        self.need(count * 8, what)  # every element has at least its length: refuses absurd counts at once
        pos, size, buf, unpack = self.pos - count * 8, self.size, self.buf, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            self.pos = min(pos, size)
            self.fail(f"{what}: its strings run past the end of the {size}-byte file (truncated or corrupt)")
        self.pos = pos


def _strings(buf, at: int, count: int) -> tuple[list[str], int]:
    out, unpack = [], _U64.unpack_from
    for _ in range(count):
        n = unpack(buf, at)[0]
        out.append(bytes(buf[at + 8 : at + 8 + n]).decode("utf-8", errors="replace"))
        at += 8 + n
    return out, at


def _scalar(buf, value_type: int, at: int):
    if value_type == STRING:
        return _strings(buf, at, 1)[0][0]
    v = np.frombuffer(buf, NUMERIC[value_type], 1, at)[0].item()
    return bool(v) if value_type == BOOL else v


def _array(buf, item_type: int, count: int, at: int) -> tuple[list, int]:
    """An array's elements as Python values (what the gguf package's contents() gives) and its end; the
    parse already checked every length against the file."""
    if item_type in NUMERIC:
        numbers = np.frombuffer(buf, NUMERIC[item_type], count, at)
        end = at + numbers.nbytes
        return (numbers.astype(bool) if item_type == BOOL else numbers).tolist(), end
    if item_type == STRING:
        return _strings(buf, at, count)
    out = []
    for _ in range(count):  # arrays of arrays: rare and small
        inner_type, n = _U32.unpack_from(buf, at)[0], _U64.unpack_from(buf, at + 4)[0]
        values, at = _array(buf, inner_type, n, at + 12)
        out.append(values)
    return out, at


class Metadata(Mapping):
    """The key/value records as Python values, each decoded the first time it is read."""

    def __init__(self, buf, fields: dict[str, Field]):
        self._buf, self.fields = buf, fields
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str):
        if key not in self._cache:
            f = self.fields[key]
            if f.item_type is not None:  # only arrays have one
                self._cache[key] = _array(self._buf, f.item_type, f.count, f.at + 12)[0]
            else:
                self._cache[key] = _scalar(self._buf, f.type, f.at)
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def count(self, key: str) -> int:
        """An array's length without decoding it (0 when absent or not an array)."""
        f = self.fields.get(key)
        return f.count if f is not None and f.type == ARRAY else 0

    def numbers(self, key: str) -> np.ndarray | None:
        """A numeric array as a read-only numpy view of the file (None when absent or not numeric)."""
        f = self.fields.get(key)
        if f is None or f.type != ARRAY or f.item_type not in NUMERIC:
            return None
        return np.frombuffer(self._buf, NUMERIC[f.item_type], f.count, f.at + 12)


class GGUFHeader:
    """Everything before the tensor data: version, metadata, tensor infos, alignment, data offset;
    `data` is the whole file as a read-only uint8 array over the mapping."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():  # never open a FIFO or device: that would wait, not fail
            raise CheckpointError(self.path, "not a regular file")
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise CheckpointError(self.path, f"file is {size} bytes, too short for a GGUF header")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._mmap, np.uint8)
        self._parse(_Cursor(self._mmap, self.path))

    def _parse(self, c: _Cursor) -> None:
        magic = bytes(c.buf[0:4])
        if magic != MAGIC:
            c.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in VERSIONS:
            c.fail(f"GGUF version {self.version} is not supported (only {', '.join(map(str, VERSIONS))})")
        n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata key count")
        # the smallest key/value record is 14 bytes, the smallest tensor info 32: counts past what the file
        # could hold are refused before any loop runs
        if n_tensors * 32 + n_kv * 14 > c.size - c.pos:
            c.fail(
                f"header claims {n_tensors} tensors and {n_kv} metadata keys, more than a "
                f"{c.size}-byte file can hold (truncated or corrupt)"
            )
        fields: dict[str, Field] = {}
        for i in range(n_kv):
            offset = c.pos
            key = c.string(f"metadata key #{i}")
            if key in fields:
                c.fail(f"metadata key {key!r} appears twice")
            what = f"metadata value {key!r}"
            value_type = c.u32(what)
            at = c.pos
            if value_type == ARRAY:
                item_type, count = c.u32(what), c.u64(what)
                c.skip_array(item_type, count, what)
                fields[key] = Field(key, value_type, offset, at, c.pos, item_type, count)
                continue
            if value_type == STRING:
                c.need(c.u64(what), what)
            elif value_type in NUMERIC:
                c.need(NUMERIC[value_type].itemsize, what)
            else:
                c.fail(f"{what} has unknown type {value_type}")
            fields[key] = Field(key, value_type, offset, at, c.pos)
        self.metadata = Metadata(c.buf, fields)
        self.alignment = self._alignment(c)
        self.tensors: list[TensorEntry] = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}")
            what = f"tensor info {name!r}"
            n_dims = c.u32(what)
            if not 1 <= n_dims <= MAX_DIMS:
                c.fail(f"{what} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
            start = c.need(8 * n_dims, what)
            ne = struct.unpack_from(f"<{n_dims}Q", c.buf, start)
            qtype, offset = c.u32(what), c.u64(what)
            self.tensors.append(TensorEntry(name, tuple(ne), qtype, offset))
        self.data_offset = c.pos + (-c.pos % self.alignment)
        self.size = c.size

    def _alignment(self, c: _Cursor) -> int:
        f = self.metadata.fields.get("general.alignment")
        if f is None:
            return DEFAULT_ALIGNMENT
        value = self.metadata["general.alignment"] if f.type == 4 else None  # UINT32, as the spec says
        if not isinstance(value, int) or value <= 0 or value & (value - 1):
            c.fail(
                f"general.alignment must be a power of two stored as UINT32 (found type {f.type}, {value!r})"
            )
        return value

    def field_bytes(self, key: str) -> bytes:
        """One key/value record exactly as stored."""
        f = self.metadata.fields[key]
        return bytes(self._mmap[f.offset : f.end])

    def madvise_dontneed(self, start: int, stop: int) -> None:
        start -= start % mmap.PAGESIZE
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        self.data = None
        self.metadata._buf = None
        try:
            self._mmap.close()
        except (BufferError, ValueError):
            pass  # views still alive; the OS reclaims the mapping when they go
