"""Bad input must give one clear PatcherError / CheckpointError naming the file and the problem,
never another exception type (no RecursionError, KeyError, UnicodeError, traceback on the CLI).

Safetensors files are built by hand: u64 little-endian header length, header JSON bytes, data bytes.
"""

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_h
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from patcher.cli import app
from patcher.edit.directions import load_direction, save_directions
from patcher.errors import CheckpointError, PatcherError
from patcher.io.atomic import AtomicOutput
from patcher.io.checkpoint import INDEX_NAME, Checkpoint
from patcher.io.safetensors import MAX_HEADER, SafetensorsFile
from patcher.io.writer import OutTensor, write_safetensors

# --- helpers -------------------------------------------------------------------------------------


def st_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file image. `header` is a dict/list (dumped to JSON) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def write_st(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    path = Path(path)
    path.write_bytes(st_bytes(header, data, length))
    return path


def u8(n: int, begin: int = 0) -> dict:
    """Header entry for a U8 tensor of n bytes at data offset `begin`."""
    return {"dtype": "U8", "shape": [n], "data_offsets": [begin, begin + n]}


def valid_st(path: Path, tensors: dict[str, bytes] | None = None, metadata: dict | None = None) -> Path:
    """A well-formed file of U8 tensors laid out back to back."""
    tensors = {"a": b"\x01\x02\x03\x04"} if tensors is None else tensors
    header, pos = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, data in tensors.items():
        header[name] = u8(len(data), pos)
        pos += len(data)
    return write_st(path, header, b"".join(tensors.values()))


def expect_error(fn, where, fragment: str, cls=CheckpointError) -> PatcherError:
    """fn() must raise `cls` (any other exception type propagates and fails the test) and the
    message must name `where` (the file) and contain `fragment` (the problem)."""
    with pytest.raises(cls) as ei:
        fn()
    e = ei.value
    msg = str(e)
    assert str(where) in msg, f"message does not name {where}: {msg!r}"
    assert str(where) in e.where
    assert fragment in msg, f"expected {fragment!r} in {msg!r}"
    return e


def open_file_error(path: Path, fragment: str) -> PatcherError:
    """Both entry points (the single-file reader and Checkpoint) give the same clear error."""
    expect_error(lambda: SafetensorsFile(path), path, fragment)
    return expect_error(lambda: Checkpoint(path), path, fragment)


# --- framing: length prefix and header bytes -------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_8_bytes(tmp_path, size):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01" * size)
    open_file_error(p, f"file is {size} bytes, too short for a safetensors header")


@pytest.mark.parametrize("n", [MAX_HEADER + 1, 2**63, 2**64 - 1])
def test_header_length_over_limit(tmp_path, n):
    p = write_st(tmp_path / "huge.safetensors", b"{}", length=n)
    open_file_error(p, f"header length {n} exceeds the {MAX_HEADER}-byte limit")


@pytest.mark.parametrize("n", [3, 1000, MAX_HEADER])
def test_header_length_past_end_of_file(tmp_path, n):
    p = write_st(tmp_path / "past.safetensors", b"{}", length=n)
    open_file_error(p, f"header length {n} runs past the end of the 10-byte file")


@pytest.mark.parametrize(
    "raw",
    [b'{"a\xff": 1}', b"\xc3\x28{}", b'{"\xed\xa0\x80": 1}'],
    ids=["ff", "bad-continuation", "encoded-surrogate"],
)
def test_header_not_utf8(tmp_path, raw):
    p = write_st(tmp_path / "latin.safetensors", raw)
    open_file_error(p, "header is not valid UTF-8")


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"{}}", b'{"a": }', b"\xef\xbb\xbf{}", b"{}\x00"],
    ids=["garbage", "empty", "extra-brace", "missing-value", "bom", "nul"],
)
def test_header_not_json(tmp_path, raw):
    p = write_st(tmp_path / "nojson.safetensors", raw)
    open_file_error(p, "header is not valid JSON")


@pytest.mark.parametrize("raw", [b"[]", b'[{"a": 1}]', b"1", b'"text"', b"null", b"true"])
def test_header_json_not_an_object(tmp_path, raw):
    p = write_st(tmp_path / "list.safetensors", raw)
    open_file_error(p, "header JSON is not an object")


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000],
    ids=["open-lists", "open-objects", "balanced-lists"],
)
def test_header_nested_too_deeply(tmp_path, raw):
    p = write_st(tmp_path / "deep.safetensors", raw)
    open_file_error(p, "header JSON is nested too deeply")


def test_duplicate_tensor_keys(tmp_path):
    raw = (
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
        b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    )
    p = write_st(tmp_path / "dup.safetensors", raw, b"xy")
    open_file_error(p, "duplicate key 'a'")


def test_duplicate_keys_inside_an_entry(tmp_path):
    raw = b'{"a": {"dtype": "F32", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    p = write_st(tmp_path / "dup2.safetensors", raw, b"x")
    open_file_error(p, "duplicate key 'dtype'")


# --- __metadata__ ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [{"a": 1}, {"a": None}, {"a": ["b"]}, {"a": {"b": "c"}}, "text", ["a", "b"], 7, True],
    ids=["int-value", "null-value", "list-value", "dict-value", "str", "list", "int", "true"],
)
def test_metadata_not_str_to_str(tmp_path, meta):
    p = write_st(tmp_path / "meta.safetensors", {"__metadata__": meta, "a": u8(1)}, b"x")
    open_file_error(p, "__metadata__ must map strings to strings")


@pytest.mark.parametrize("meta", [[], "", 0, False], ids=["empty-list", "empty-str", "zero", "false"])
def test_metadata_falsy_non_object(tmp_path, meta):
    p = write_st(tmp_path / "meta.safetensors", {"__metadata__": meta, "a": u8(1)}, b"x")
    open_file_error(p, "__metadata__ must map strings to strings")


@pytest.mark.parametrize("meta", [None, {}, {"format": "pt", "k": ""}])
def test_metadata_valid_forms_accepted(tmp_path, meta):
    # null is accepted by the reference implementation too (Option<HashMap<String, String>>)
    p = write_st(tmp_path / "meta.safetensors", {"__metadata__": meta, "a": u8(1)}, b"x")
    assert SafetensorsFile(p).metadata == (meta or {})


def test_lone_surrogate_escape_in_name(tmp_path):
    p = write_st(
        tmp_path / "sur.safetensors",
        b'{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        b"x",
    )
    # the reference implementation refuses this header (its error class differs between versions)
    with pytest.raises(Exception):  # noqa: B017
        load_file(p)
    open_file_error(p, "header contains an escaped lone surrogate (\\ud800-style), which is not text")


# --- tensor entries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "U8", "shape": [1]},
        {"shape": [1], "data_offsets": [0, 1]},
        {"dtype": "U8", "data_offsets": [0, 1]},
        {},
        {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "extra": 1},
        {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "offsets": [0, 1]},
        [0, 1],
        "U8",
        None,
    ],
    ids=["no-offsets", "no-dtype", "no-shape", "empty", "extra-key", "extra-key-2", "list", "str", "null"],
)
def test_entry_missing_or_extra_keys(tmp_path, entry):
    p = write_st(tmp_path / "entry.safetensors", {"w": entry}, b"x")
    open_file_error(p, "tensor 'w': entry must have exactly dtype, shape, data_offsets")


@pytest.mark.parametrize("dtype", ["F7", "f32", "float32", "", "F8", 4, None, ["F32"], {"F32": 1}])
def test_unknown_dtype(tmp_path, dtype):
    p = write_st(
        tmp_path / "dtype.safetensors", {"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 1]}}, b"x"
    )
    open_file_error(p, f"tensor 'w': unsupported dtype {dtype!r}")


@pytest.mark.parametrize(
    "shape",
    [[-1], [1, -1], [1.0], [True], [False], [None], ["1"], [[1]], "1", 1, None, {"0": 1}],
    ids=[
        "neg",
        "neg2",
        "float",
        "true",
        "false",
        "null",
        "str-entry",
        "nested",
        "str",
        "int",
        "null-shape",
        "dict",
    ],
)
def test_bad_shape(tmp_path, shape):
    # offsets are consistent with the element count where there is one, so only the shape is at fault
    p = write_st(
        tmp_path / "shape.safetensors", {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}, b"x"
    )
    open_file_error(p, "tensor 'w': shape must be a list of non-negative integers")


@pytest.mark.parametrize(
    "offsets",
    [
        [0],
        [],
        [0, 1, 2],
        [2, 1],
        [-1, 0],
        [0.0, 1.0],
        [0, 1.0],
        [False, True],
        ["0", "1"],
        "0,1",
        None,
        1,
        [None, 1],
    ],
    ids=[
        "one",
        "none",
        "three",
        "begin>end",
        "negative",
        "floats",
        "float-end",
        "bools",
        "strs",
        "str",
        "null",
        "int",
        "null-begin",
    ],
)
def test_bad_data_offsets(tmp_path, offsets):
    p = write_st(
        tmp_path / "off.safetensors", {"w": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}, b"x"
    )
    open_file_error(p, "tensor 'w': data_offsets must be [begin, end] with 0 <= begin <= end")


@pytest.mark.parametrize(
    "dtype,shape,offsets,need",
    [
        ("F32", [2], [0, 4], 8),
        ("F32", [2, 3], [0, 25], 24),
        ("BF16", [3], [0, 3], 6),
        ("U8", [], [0, 0], 1),
        ("I64", [0], [0, 8], 0),
    ],
)
def test_byte_count_mismatch(tmp_path, dtype, shape, offsets, need):
    p = write_st(
        tmp_path / "count.safetensors",
        {"w": {"dtype": dtype, "shape": shape, "data_offsets": offsets}},
        b"\0" * offsets[1],
    )
    span = offsets[1] - offsets[0]
    open_file_error(p, f"tensor 'w': {dtype}{shape} needs {need} bytes, data_offsets span {span}")


# --- layout of the data region -----------------------------------------------------------------------


def test_overlapping_offsets(tmp_path):
    p = write_st(tmp_path / "overlap.safetensors", {"a": u8(8, 0), "b": u8(8, 4)}, b"\0" * 12)
    open_file_error(p, "tensor 'b' starts at data byte 4: overlaps the previous tensor")


def test_identical_offsets_overlap(tmp_path):
    p = write_st(tmp_path / "same.safetensors", {"a": u8(4, 0), "b": u8(4, 0)}, b"\0" * 4)
    e = open_file_error(p, "overlaps the previous tensor")
    assert "starts at data byte 0" in str(e)


def test_hole_between_tensors(tmp_path):
    p = write_st(tmp_path / "hole.safetensors", {"a": u8(4, 0), "b": u8(4, 8)}, b"\0" * 12)
    open_file_error(p, "tensor 'b' starts at data byte 8: leaves a hole at byte 4")


def test_offsets_not_starting_at_zero(tmp_path):
    p = write_st(tmp_path / "start.safetensors", {"a": u8(4, 4)}, b"\0" * 8)
    open_file_error(p, "tensor 'a' starts at data byte 4: leaves a hole at byte 0")


def test_file_truncated(tmp_path):
    header = {"a": u8(4, 0), "b": u8(4, 4)}
    p = write_st(tmp_path / "trunc.safetensors", header, b"\0" * 5)
    full = len(st_bytes(header)) + 8
    open_file_error(p, f"file is {full - 3} bytes but the header describes {full} (truncated)")


def test_trailing_bytes(tmp_path):
    header = {"a": u8(4, 0)}
    p = write_st(tmp_path / "trail.safetensors", header, b"\0" * 6)
    full = len(st_bytes(header)) + 4
    open_file_error(p, f"file is {full + 2} bytes but the header describes {full} (trailing bytes)")


def test_header_only_no_tensors_is_valid(tmp_path):
    p = write_st(tmp_path / "empty.safetensors", {})
    assert Checkpoint(p).tensors == {}


def test_zero_size_tensors_are_valid(tmp_path):
    header = {"a": u8(4, 0), "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}, "b": u8(2, 4)}
    p = write_st(tmp_path / "zero.safetensors", header, b"\1\2\3\4\5\6")
    with Checkpoint(p) as ck:
        assert ck.array("z").shape == (0, 3)
        assert ck.array("b").tobytes() == b"\5\6"


# --- fuzz: anything at all is either read or refused with a CheckpointError --------------------------

_JSON = st_h.recursive(
    st_h.none()
    | st_h.booleans()
    | st_h.integers(-(2**70), 2**70)
    | st_h.floats(allow_nan=True)
    | st_h.text(max_size=8)
    | st_h.sampled_from(["F32", "U8", "BF16", "F8_E4M3", "dtype", "shape", "data_offsets", "__metadata__"]),
    lambda inner: (
        st_h.lists(inner, max_size=4)
        | st_h.dictionaries(
            st_h.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "a", "b"])
            | st_h.text(max_size=4),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


def _read_or_refuse(path: Path) -> None:
    try:
        sf = SafetensorsFile(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return
    for info in sf.tensors.values():  # whatever was accepted must be readable within the file
        assert 0 <= info.begin <= info.end <= sf.size
        assert sf.array(info).nbytes == info.nbytes
    sf.close()


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    header=st_h.dictionaries(st_h.text(max_size=6), _JSON, max_size=4) | _JSON, data=st_h.binary(max_size=24)
)
def test_fuzz_header_json(tmp_path, header, data):
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(st_bytes(json.dumps(header).encode("utf-8", "surrogatepass"), data))
    _read_or_refuse(p)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st_h.lists(st_h.tuples(st_h.integers(0, 10_000), st_h.integers(0, 255)), max_size=4),
    cut=st_h.none() | st_h.integers(0, 10_000),
)
def test_fuzz_byte_edits(tmp_path, edits, cut):
    good = st_bytes(
        {
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
        },
        bytes(range(22)),
    )
    raw = bytearray(good)
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(raw))
    _read_or_refuse(p)


# --- sharded folders and the index ------------------------------------------------------------------


def make_index(folder: Path, weight_map, extra: dict | None = None) -> Path:
    p = folder / INDEX_NAME
    p.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map, **(extra or {})}))
    return p


@pytest.mark.parametrize(
    "name",
    [
        "../x.safetensors",
        "/etc/passwd",
        "..",
        "a/../../x.safetensors",
        "..\\x.safetensors",
        "C:\\x.safetensors",
        "c:x.safetensors",
        ".",
        "\\\\server\\share\\x.safetensors",
    ],
)
def test_index_shard_name_escapes_folder(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(tmp_path / "x.safetensors")  # exists outside the folder: must still be refused
    valid_st(model / "a.safetensors")
    idx = make_index(model, {"a": name})
    e = expect_error(lambda: Checkpoint(model), idx, "escapes the model folder")
    assert repr(name) in str(e)


def test_index_shard_symlink_out_of_folder_is_read(tmp_path):
    """A plain weight_map name may be a symlink (the hub cache links every file to ../../blobs/):
    the tensors are read through it, and its real folder counts as an input."""
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "blobs").mkdir()
    valid_st(tmp_path / "blobs" / "outside.safetensors")
    (model / "a.safetensors").symlink_to(tmp_path / "blobs" / "outside.safetensors")
    make_index(model, {"a": "a.safetensors"})
    with Checkpoint(model) as ck:
        assert list(ck.files) == ["a.safetensors"]
        assert ck.array("a").tolist() == [1, 2, 3, 4]
        assert ck.input_paths == [model, (tmp_path / "blobs").resolve()]


def test_index_shard_in_subfolder(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    valid_st(model / "sub" / "a.safetensors")
    idx = make_index(model, {"a": "sub/a.safetensors"})
    expect_error(
        lambda: Checkpoint(model), idx, "'sub/a.safetensors': shards must sit in the model folder itself"
    )


@pytest.mark.parametrize("name", [123, None, "", ["a.safetensors"]])
def test_index_shard_name_not_a_string(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    idx = make_index(model, {"a": name})
    expect_error(lambda: Checkpoint(model), idx, "is not a string")


def test_index_missing_shard_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "model-00001-of-00002.safetensors")
    idx = make_index(
        model, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    )
    expect_error(
        lambda: Checkpoint(model),
        idx,
        "tensor 'b' is mapped to 'model-00002-of-00002.safetensors', which does not exist",
    )


def test_index_tensor_missing_from_its_shard(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    shard1 = valid_st(model / "s1.safetensors", {"a": b"\1\2"})
    valid_st(model / "s2.safetensors", {"b": b"\3"})
    make_index(model, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"})
    expect_error(
        lambda: Checkpoint(model), shard1, "tensor 'c' is listed in the index but missing from this shard"
    )


def test_index_tensor_in_the_wrong_shard(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "s1.safetensors", {"a": b"\1\2"})
    shard2 = valid_st(model / "s2.safetensors", {"b": b"\3"})
    make_index(model, {"a": "s2.safetensors", "b": "s2.safetensors", "x": "s1.safetensors"})
    expect_error(
        lambda: Checkpoint(model), shard2, "tensor 'a' is listed in the index but missing from this shard"
    )


def test_tensor_in_two_shards(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "s1.safetensors", {"a": b"\1\2"})
    s2 = valid_st(model / "s2.safetensors", {"a": b"\1\2", "b": b"\3"})
    make_index(model, {"a": "s1.safetensors", "b": "s2.safetensors"})
    expect_error(lambda: Checkpoint(model), s2, "tensor 'a' also appears in s1.safetensors")


def test_corrupt_shard_named_in_error(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "s1.safetensors", {"a": b"\1\2"})
    bad = write_st(model / "s2.safetensors", b"[]")
    make_index(model, {"a": "s1.safetensors", "b": "s2.safetensors"})
    expect_error(lambda: Checkpoint(model), bad, "header JSON is not an object")


@pytest.mark.parametrize(
    "text",
    ["{not json", "", '{"weight_map": ' * 50_000, "\udcff"],
    ids=["garbage", "empty", "deep", "bad-utf8"],
)
def test_index_not_json(tmp_path, text):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "a.safetensors")
    idx = model / INDEX_NAME
    idx.write_bytes(text.encode("utf-8", "surrogateescape"))
    expect_error(lambda: Checkpoint(model), idx, "cannot parse JSON")


def test_index_json_not_an_object(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    idx = model / INDEX_NAME
    idx.write_text('["a.safetensors"]')
    expect_error(lambda: Checkpoint(model), idx, "expected a JSON object")


@pytest.mark.parametrize(
    "index",
    [
        {"weight_map": {}},
        {"metadata": {}},
        {"weight_map": []},
        {"weight_map": ["a.safetensors"]},
        {"weight_map": "a.safetensors"},
        {"weight_map": None},
    ],
    ids=["empty", "missing", "empty-list", "list", "str", "null"],
)
def test_index_weight_map_empty_or_wrong_type(tmp_path, index):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "a.safetensors")
    idx = model / INDEX_NAME
    idx.write_text(json.dumps(index))
    expect_error(lambda: Checkpoint(model), idx, "missing or empty 'weight_map'")


def test_config_json_corrupt(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "model.safetensors")
    cfg = model / "config.json"
    cfg.write_text('{"model_type": ')
    expect_error(lambda: Checkpoint(model), cfg, "cannot parse JSON")
    cfg.write_text("[1, 2]")
    expect_error(lambda: Checkpoint(model), cfg, "expected a JSON object")


# --- what is (not) a checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.00.pth", "last.ckpt"])
def test_folder_with_only_pickle_checkpoint(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    (model / name).write_bytes(b"\x80\x02}q\x00.")
    (model / "config.json").write_text("{}")
    e = expect_error(lambda: Checkpoint(model), model, "pickle")
    assert "arbitrary code" in str(e) and "safetensors" in str(e)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl"])
def test_pickle_file_passed_directly_is_refused(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\x80\x02}q\x00.")
    e = expect_error(lambda: Checkpoint(p), p, "PyTorch pickle checkpoints are refused")
    assert "arbitrary code" in str(e)


@pytest.mark.parametrize("name", ["model.gguf", "model.npz", "weights", "model.safetensors.index.json"])
def test_other_file_passed_directly_is_refused(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"{}")
    expect_error(lambda: Checkpoint(p), p, "not a .safetensors file or a model folder")


def test_two_safetensors_files_without_index(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "a.safetensors")
    valid_st(model / "b.safetensors")
    expect_error(lambda: Checkpoint(model), model, f"2 .safetensors files but no {INDEX_NAME}")


def test_model_safetensors_wins_over_other_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    valid_st(model / "model.safetensors")
    valid_st(model / "other.safetensors")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    assert list(Checkpoint(model).files) == ["model.safetensors"]


def test_empty_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    expect_error(
        lambda: Checkpoint(model), model, "no model.safetensors, index, or .safetensors file in this folder"
    )


@pytest.mark.parametrize("rel", ["missing", "missing.safetensors", "no/such/dir"])
def test_nonexistent_path(tmp_path, rel):
    p = tmp_path / rel
    expect_error(lambda: Checkpoint(p), p, "no such file or folder")


def test_no_such_tensor_info(tmp_path):
    p = valid_st(tmp_path / "m.safetensors")
    with Checkpoint(p) as ck:
        expect_error(lambda: ck.info("nope"), p, "no tensor named 'nope'")


@pytest.mark.parametrize("method", ["array", "release"])
def test_no_such_tensor_access(tmp_path, method):
    p = valid_st(tmp_path / "m.safetensors")
    with Checkpoint(p) as ck:
        expect_error(lambda: getattr(ck, method)("nope"), p, "no tensor named 'nope'")


# --- directions --------------------------------------------------------------------------------------


def npy(path: Path, arr) -> str:
    np.save(path, np.asarray(arr))
    return str(path)


def directions_file(
    path: Path, table: np.ndarray, metadata: dict | None = None, name: str = "direction"
) -> str:
    """A directions-format file with `table` as its (name) tensor and metadata under 'patcher'."""
    a = np.ascontiguousarray(table, dtype=np.float32)
    meta = {} if metadata is None else {"patcher": json.dumps(metadata)}
    write_safetensors(Path(path), [OutTensor(name, "F32", a.shape, produce=lambda: [a])], meta)
    return str(path)


@pytest.mark.parametrize("arr,d_model,dim", [(np.ones(5), 4, 5), (np.ones((2, 3)), 4, 3), (np.ones(4), 5, 4)])
def test_direction_npy_wrong_dimension(tmp_path, arr, d_model, dim):
    spec = npy(tmp_path / "dir.npy", arr)
    expect_error(
        lambda: load_direction(spec, d_model),
        spec,
        f"direction has dimension {dim}, the model's d_model is {d_model}",
        PatcherError,
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_direction_npy_not_finite(tmp_path, bad):
    arr = np.ones((2, 4))
    arr[1, 2] = bad
    spec = npy(tmp_path / "dir.npy", arr)
    expect_error(lambda: load_direction(spec, 4), spec, "direction contains NaN or Inf", PatcherError)


def test_direction_npy_float16_overflow_is_inf(tmp_path):
    spec = npy(tmp_path / "dir.npy", np.array([1, np.inf, 0, 0], dtype=np.float16))
    expect_error(lambda: load_direction(spec, 4), spec, "NaN or Inf", PatcherError)


@pytest.mark.parametrize(
    "arr",
    [np.zeros(4), np.zeros((1, 4)), np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]]), np.zeros(4, dtype=np.int32)],
    ids=["vector", "row", "second-row", "int"],
)
def test_direction_zero_vector(tmp_path, arr):
    spec = npy(tmp_path / "dir.npy", arr)
    expect_error(lambda: load_direction(spec, 4), spec, "direction has zero norm", PatcherError)


def test_direction_npy_no_rows(tmp_path):
    spec = npy(tmp_path / "dir.npy", np.zeros((0, 4)))
    expect_error(lambda: load_direction(spec, 4), spec, "direction", PatcherError)


@pytest.mark.parametrize("arr", [np.ones((2, 2, 4)), np.ones((1, 1, 1, 4))])
def test_direction_npy_too_many_axes(tmp_path, arr):
    spec = npy(tmp_path / "dir.npy", arr)
    expect_error(
        lambda: load_direction(spec, 4), spec, "direction must be (d_model,) or (k, d_model)", PatcherError
    )


@pytest.mark.parametrize(
    "arr",
    [np.array(["a", "b"]), np.array([True, False]), np.array([1 + 1j, 2j])],
    ids=["str", "bool", "complex"],
)
def test_direction_npy_not_numeric(tmp_path, arr):
    spec = npy(tmp_path / "dir.npy", arr)
    expect_error(lambda: load_direction(spec), spec, "expected a numeric array", PatcherError)


def test_direction_npy_pickled_object_array_refused(tmp_path):
    p = tmp_path / "dir.npy"
    np.save(p, np.array([1.0, "x", None], dtype=object), allow_pickle=True)
    expect_error(lambda: load_direction(str(p)), p, "not a readable .npy array", PatcherError)


def _npy_image(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        b"not an npy file",
        b"\x93NUMPY\x01\x00garbage",
        _npy_image(np.ones(100))[:200],
        _npy_image(np.ones(100))[:20],
    ],
    ids=["garbage", "bad-header", "truncated-data", "truncated-header"],
)
def test_direction_npy_corrupt(tmp_path, content):
    p = tmp_path / "dir.npy"
    p.write_bytes(content)
    expect_error(lambda: load_direction(str(p)), p, "not a readable .npy array", PatcherError)


def test_direction_npy_is_a_folder(tmp_path):
    p = tmp_path / "dir.npy"
    p.mkdir()
    expect_error(lambda: load_direction(str(p)), p, "is a folder, not a regular file", PatcherError)


@pytest.mark.parametrize("kind", ["empty", "npz"])
def test_direction_npy_empty_or_npz(tmp_path, kind):
    p = tmp_path / "dir.npy"
    if kind == "empty":
        p.write_bytes(b"")
    else:
        with open(p, "wb") as f:
            np.savez(f, direction=np.ones(4))
    expect_error(lambda: load_direction(str(p), 4), p, "dir.npy", PatcherError)


def test_direction_npy_missing(tmp_path):
    p = tmp_path / "missing.npy"
    expect_error(lambda: load_direction(str(p)), p, "no such file", PatcherError)


@pytest.mark.parametrize(
    "name",
    ["dir.txt", "dir.pt", "dir.npz", "dir.safetensors:abc", "dir.safetensors:1.5", "dir.safetensors:", "dir"],
)
def test_direction_spec_not_npy_or_safetensors(tmp_path, name):
    spec = str(tmp_path / name)
    expect_error(
        lambda: load_direction(spec),
        spec,
        "a direction is FILE.npy or FILE.safetensors[:LAYER]",
        PatcherError,
    )


def test_direction_safetensors_missing(tmp_path):
    p = tmp_path / "missing.safetensors"
    expect_error(lambda: load_direction(f"{p}:2"), p, "no such file", PatcherError)


def test_direction_safetensors_without_direction_tensor(tmp_path):
    spec = directions_file(
        tmp_path / "dirs.safetensors", np.ones((3, 4)), {"selected_layer": 1}, name="weight"
    )
    expect_error(
        lambda: load_direction(spec, 4), spec, "no 'direction' tensor: not a patcher directions file"
    )


def test_direction_safetensors_corrupt(tmp_path):
    p = write_st(tmp_path / "dirs.safetensors", {"direction": u8(4)}, b"\0")
    expect_error(lambda: load_direction(str(p), 4), p, "truncated")


def test_direction_safetensors_table_not_2d(tmp_path):
    spec = directions_file(tmp_path / "dirs.safetensors", np.ones(4), {"selected_layer": 0})
    expect_error(lambda: load_direction(spec, 4), spec, "'direction' must be [layers+1, d_model], got [4]")


@pytest.mark.parametrize("layer", [3, 4, 100, -4, -100])
def test_direction_layer_out_of_range(tmp_path, layer):
    path = directions_file(tmp_path / "dirs.safetensors", np.ones((3, 4)), {"selected_layer": 1})
    spec = f"{path}:{layer}"
    expect_error(
        lambda: load_direction(spec, 4),
        spec,
        f"layer {layer} is out of range: the file has resid_pre layers 0..2",
        PatcherError,
    )


def test_direction_selected_layer_out_of_range(tmp_path):
    spec = directions_file(tmp_path / "dirs.safetensors", np.ones((3, 4)), {"selected_layer": 7})
    expect_error(lambda: load_direction(spec, 4), spec, "layer 7 is out of range", PatcherError)


@pytest.mark.parametrize(
    "metadata",
    [None, {}, {"selected_layer": None}, {"selected_layer": "2"}, {"selected_layer": 1.0}],
    ids=["no-metadata", "empty", "null", "str", "float"],
)
def test_direction_missing_selected_layer(tmp_path, metadata):
    spec = directions_file(tmp_path / "dirs.safetensors", np.ones((3, 4)), metadata)
    expect_error(
        lambda: load_direction(spec, 4),
        spec,
        "metadata has no integer 'selected_layer'; give one as FILE.safetensors:LAYER",
    )


def test_direction_selected_layer_bool(tmp_path):
    spec = directions_file(tmp_path / "dirs.safetensors", np.ones((3, 4)), {"selected_layer": True})
    expect_error(lambda: load_direction(spec, 4), spec, "selected_layer")


def test_direction_metadata_not_json(tmp_path):
    a = np.ones((3, 4), np.float32)
    p = tmp_path / "dirs.safetensors"
    write_safetensors(p, [OutTensor("direction", "F32", a.shape, produce=lambda: [a])], {"patcher": "{oops"})
    expect_error(lambda: load_direction(str(p), 4), p, "__metadata__['patcher'] is not JSON")


def test_direction_metadata_nested_too_deeply(tmp_path):
    a = np.ones((3, 4), np.float32)
    p = tmp_path / "dirs.safetensors"
    write_safetensors(
        p, [OutTensor("direction", "F32", a.shape, produce=lambda: [a])], {"patcher": "[" * 100_000}
    )
    expect_error(lambda: load_direction(str(p), 4), p, "__metadata__['patcher']")


def test_direction_good_files_load(tmp_path):
    table = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    p = tmp_path / "dirs.safetensors"
    save_directions(p, table, table, table * 0, {"selected_layer": 1})
    d = load_direction(str(p), 4)
    assert d.layer == 1 and np.array_equal(d.vectors, table[1:2])
    d = load_direction(f"{p}:-1", 4)
    assert d.layer == 2 and np.array_equal(d.vectors, table[2:3])
    spec = npy(tmp_path / "v.npy", np.array([0, 3.0, 4.0, 0]))
    d = load_direction(spec, 4)
    assert np.allclose(np.linalg.norm(d.unit, axis=1), 1)


# --- valid round trip: our writer <-> our reader <-> the reference safetensors package -------------------

ROUND_TRIP = {
    "f32": ("F32", np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)),
    "f16": ("F16", np.array([[0.5, -1.25, 65504.0], [-0.0, 6e-8, np.inf]], dtype=np.float16)),
    "bf16": (
        "BF16",
        np.array([1.0, -2.5, 3.0e38, 1e-40, np.nan], dtype=np.float32).astype(ml_dtypes.bfloat16),
    ),
    "fp8": (
        "F8_E4M3",
        np.array([[0.0, 448.0], [-0.015625, 1.75]], dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
    ),
    "i64": ("I64", np.array([-(2**63), 2**63 - 1, 0, 7], dtype=np.int64)),
    "u8": ("U8", np.arange(7, dtype=np.uint8)),  # odd size: later offsets are not aligned
    "f64": ("F64", np.array(3.25, dtype=np.float64)),  # scalar, shape ()
    "bool": ("BOOL", np.array([True, False, True])),
    "empty": ("F32", np.zeros((0, 5), dtype=np.float32)),
}


@pytest.fixture
def round_trip_file(tmp_path):
    p = tmp_path / "rt.safetensors"
    tensors = [
        OutTensor(name, dt, arr.shape, produce=lambda arr=arr: [arr])
        for name, (dt, arr) in ROUND_TRIP.items()
    ]
    write_safetensors(p, tensors, {"format": "pt", "note": "ünïcode ✓"})
    return p


def test_round_trip_our_reader(round_trip_file):
    with Checkpoint(round_trip_file) as ck:
        assert set(ck.tensors) == set(ROUND_TRIP)
        assert ck.files[round_trip_file.name].metadata == {"format": "pt", "note": "ünïcode ✓"}
        for name, (dt, arr) in ROUND_TRIP.items():
            got = ck.array(name)
            assert ck.info(name).dtype == dt
            assert got.dtype == arr.dtype and got.shape == arr.shape, name
            assert got.tobytes() == arr.tobytes(), name
    # the header is padded so the data region starts 8-byte aligned, as the reference writer does
    (n,) = struct.unpack("<Q", round_trip_file.read_bytes()[:8])
    assert n % 8 == 0


def test_round_trip_reference_reader(round_trip_file):
    """The official safetensors package accepts our output and sees the same values."""
    with safe_open(str(round_trip_file), "np") as f:
        assert set(f.keys()) == set(ROUND_TRIP)
        assert f.metadata() == {"format": "pt", "note": "ünïcode ✓"}
        for name, (dt, arr) in ROUND_TRIP.items():
            sl = f.get_slice(name)
            assert sl.get_dtype() == dt and list(sl.get_shape()) == list(arr.shape), name
            if dt.startswith("F8"):
                continue  # the reference's numpy backend has no fp8 dtype; bytes are checked below
            got = f.get_tensor(name)
            assert got.shape == arr.shape and got.tobytes() == arr.tobytes(), name
    if hasattr(safetensors, "deserialize"):  # raw bytes for every dtype, fp8 included
        raw = {name: t for name, t in safetensors.deserialize(round_trip_file.read_bytes())}
        for name, (dt, arr) in ROUND_TRIP.items():
            assert raw[name]["dtype"] == dt
            assert bytes(raw[name]["data"]) == arr.tobytes(), name


def test_reference_writer_our_reader(tmp_path):
    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1.5, -2.0], dtype=np.float16),
        "c": np.array([[1, -2], [3, 4]], dtype=np.int64),
        "d": np.arange(5, dtype=np.uint8),
        "e": np.array([True, False]),
        "f": np.array(2.5, dtype=np.float64),
        "g": np.array([1, 2, 3], dtype=np.float32).astype(ml_dtypes.bfloat16),
    }
    p = tmp_path / "ref.safetensors"
    save_file(arrays, str(p), metadata={"format": "np"})
    with Checkpoint(p) as ck:
        assert set(ck.tensors) == set(arrays)
        assert ck.files[p.name].metadata == {"format": "np"}
        for name, arr in arrays.items():
            got = ck.array(name)
            assert got.dtype == arr.dtype and got.shape == arr.shape, name
            assert np.array_equal(got, arr) and got.tobytes() == arr.tobytes(), name
    assert {k: v.tobytes() for k, v in load_file(str(p)).items()} == {
        k: v.tobytes() for k, v in arrays.items()
    }


# --- command line ---------------------------------------------------------------------------------------


def _corrupt_inputs(tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (path to pass, the file the error must name, the exact problem it must state)."""
    out = {}
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"abc")
    out["short"] = (p, p, "file is 3 bytes, too short for a safetensors header")
    p = write_st(tmp_path / "garbled.safetensors", b"{nope")
    out["not-json"] = (
        p,
        p,
        "header is not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
    )
    p = write_st(tmp_path / "deep.safetensors", b"[" * 100_000)
    out["deep"] = (p, p, "header JSON is nested too deeply")
    p = write_st(tmp_path / "cut.safetensors", {"a": u8(8)}, b"\0")
    out["truncated"] = (p, p, "file is 69 bytes but the header describes 76 (truncated)")
    p = write_st(
        tmp_path / "dtype.safetensors", {"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"x"
    )
    out["dtype"] = (p, p, "tensor 'a': unsupported dtype 'F7'")
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(b"\x80\x02.")
    out["pickle"] = (
        p,
        p,
        "PyTorch pickle checkpoints are refused: unpickling can run arbitrary code. "
        "Convert to safetensors first (e.g. with the safetensors 'convert' tooling) "
        "and point patcher at that",
    )
    p = tmp_path / "nowhere.safetensors"
    out["missing"] = (p, p, "no such file or folder")
    model = tmp_path / "escaping"
    model.mkdir()
    make_index(model, {"a": "../x.safetensors"})
    out["index-escape"] = (
        model,
        model / INDEX_NAME,
        "weight_map file name '../x.safetensors' escapes the model folder",
    )
    return out


CLI_CASES = ["short", "not-json", "deep", "truncated", "dtype", "pickle", "missing", "index-escape"]


def _assert_one_error_line(text: str, where: Path, problem: str):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert "Traceback" not in text
    assert lines == [f"error: {where}: {problem}"], text


@pytest.mark.parametrize("case", CLI_CASES)
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_cli_inspect_corrupt(tmp_path, case, as_json):
    path, where, problem = _corrupt_inputs(tmp_path)[case]
    result = CliRunner().invoke(app, ["inspect", str(path), *(["--json"] if as_json else [])])
    assert result.exit_code == 1, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    _assert_one_error_line(result.output, where, problem)


@pytest.mark.parametrize("case", ["truncated", "pickle", "index-escape"])
def test_cli_subprocess_inspect_corrupt(tmp_path, case):
    path, where, problem = _corrupt_inputs(tmp_path)[case]
    proc = subprocess.run(
        [sys.executable, "-c", "from patcher.cli import main; main()", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == ""
    _assert_one_error_line(proc.stderr, where, problem)


def test_cli_ablate_corrupt_model_writes_nothing(tmp_path):
    path, where, problem = _corrupt_inputs(tmp_path)["truncated"]
    outdir = tmp_path / "out"
    spec = npy(tmp_path / "d.npy", np.ones(4))
    result = CliRunner().invoke(app, ["ablate", str(path), "-d", spec, "-o", str(outdir)])
    assert result.exit_code == 1, (result.output, result.exception)
    _assert_one_error_line(result.output, where, problem)
    assert not outdir.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_cli_inspect_deeply_nested_provenance(tmp_path):
    a = np.ones(4, np.float32)
    p = tmp_path / "prov.safetensors"
    write_safetensors(p, [OutTensor("w", "F32", a.shape, produce=lambda: [a])], {"patcher": "[" * 100_000})
    result = CliRunner().invoke(app, ["inspect", str(p)])
    assert result.exit_code == 0, result.output  # unparseable provenance is shown as the raw text it is
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "edited by patcher:" in result.output
    result = CliRunner().invoke(app, ["inspect", "--json", str(p)])
    assert result.exit_code == 0
    assert json.loads(result.output)["provenance"] == "[" * 100_000


def test_cli_inspect_valid_file_still_works(round_trip_file):
    result = CliRunner().invoke(app, ["inspect", "--json", str(round_trip_file)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["tensors"] == len(ROUND_TRIP)


# --- AtomicOutput -------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    m = tmp_path / "model"
    m.mkdir()
    valid_st(m / "model.safetensors")
    return m


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_output_is_input_refused(model_dir):
    expect_error(
        lambda: AtomicOutput(model_dir, "folder", inputs=[model_dir]),
        model_dir,
        "output is the input",
        PatcherError,
    )


def test_output_is_input_through_other_spelling(model_dir, tmp_path):
    other = tmp_path / "model" / ".." / "model"
    expect_error(
        lambda: AtomicOutput(other, "folder", inputs=[model_dir]), other, "output is the input", PatcherError
    )
    link = tmp_path / "link"
    link.symlink_to(model_dir)
    expect_error(
        lambda: AtomicOutput(link, "folder", inputs=[model_dir]), link, "output is the input", PatcherError
    )


@pytest.mark.parametrize("rel", ["out", "a/b/out"])
def test_output_inside_input_refused(model_dir, rel):
    target = model_dir / rel
    expect_error(
        lambda: AtomicOutput(target, "folder", inputs=[model_dir]),
        target,
        "output lies inside the input folder",
        PatcherError,
    )
    assert not target.exists()


def test_output_containing_input_refused(model_dir, tmp_path):
    expect_error(
        lambda: AtomicOutput(tmp_path, "folder", inputs=[model_dir]),
        tmp_path,
        "output folder contains the input",
        PatcherError,
    )


def test_existing_non_empty_output_refused_without_force(model_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    expect_error(
        lambda: AtomicOutput(target, "folder", inputs=[model_dir]),
        target,
        "already exists; pass --force to replace it",
        PatcherError,
    )
    f = tmp_path / "file-target"
    f.write_text("x")
    expect_error(lambda: AtomicOutput(f, "folder", inputs=[model_dir]), f, "already exists", PatcherError)
    assert (target / "keep.txt").read_text() == "precious"


def test_existing_empty_output_accepted(model_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with AtomicOutput(target, "folder", inputs=[model_dir]) as tmp:
        (tmp / "x").write_text("new")
    assert (target / "x").read_text() == "new"
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("boom"), PatcherError("somewhere", "bad"), KeyboardInterrupt()],
    ids=["runtime", "patcher", "ctrl-c"],
)
def test_body_raises_leaves_nothing(model_dir, tmp_path, exc):
    target = tmp_path / "out"
    with pytest.raises(type(exc)):
        with AtomicOutput(target, "folder", inputs=[model_dir]) as tmp:
            assert tmp.name.startswith(".out.partial-")
            (tmp / "model.safetensors").write_bytes(b"half")
            raise exc
    assert not target.exists()
    assert leftovers(tmp_path, "out") == []


def previous_output(target: Path) -> None:
    """A previous patcher output: a valid manifest listing everything in the folder."""
    from patcher.io import manifest

    (target / "old.txt").write_text("old")
    manifest.write(
        target,
        kind="ablate",
        command="patcher ablate",
        inputs={},
        outputs={"old.txt": manifest.sha256_file(target / "old.txt")},
    )


def test_force_keeps_existing_target_when_body_fails(model_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    previous_output(target)  # --force may replace it
    with pytest.raises(RuntimeError):
        with AtomicOutput(target, "folder", inputs=[model_dir], force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt", "patcher-manifest.json"]
    assert leftovers(tmp_path, "out") == []


def test_force_replaces_existing_target_on_success(model_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    previous_output(target)  # --force may replace it
    with AtomicOutput(target, "folder", inputs=[model_dir], force=True) as tmp:
        assert (target / "old.txt").exists()  # untouched while the body runs
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path, "out") == []


def test_force_never_replaces_a_users_file_with_a_folder(model_dir, tmp_path):
    target = tmp_path / "out"
    target.write_text("a file, not a folder")
    expect_error(
        lambda: AtomicOutput(target, "folder", inputs=[model_dir], force=True),
        target,
        "exists and is not a folder",
        PatcherError,
    )
    assert target.read_text() == "a file, not a folder"
    assert leftovers(tmp_path, "out") == []


def test_stale_clean_up_removes_only_what_a_dead_run_recorded(model_dir, tmp_path):
    """A sibling merely *named* like a leftover (dead PID) is the user's and stays; the partial a killed
    run recorded in the lock file it no longer holds is removed, and the previous output it had set
    aside is put back (issue 22, item 7)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(proc.stdout)
    for kind in ("partial", "old"):
        (tmp_path / f".out.{kind}-{dead}").mkdir()
        (tmp_path / f".out.{kind}-{dead}" / "mine.txt").write_text("user data")
    recorded = tmp_path / f".out.partial-{dead}-abc123"
    recorded.mkdir()
    (recorded / "model.safetensors").write_text("half written")
    aside = tmp_path / f".out.old-{dead}-abc123"
    aside.mkdir()
    (aside / "previous.txt").write_text("the previous output")
    (tmp_path / ".out.lock").write_text(
        json.dumps({"kind": "patcher output lock", "pid": dead, "partial": recorded.name, "old": aside.name})
    )
    with pytest.raises(PatcherError, match="set the previous output aside .* put back"):
        with AtomicOutput(tmp_path / "out", "folder", inputs=[model_dir], force=True):
            pass
    assert (tmp_path / "out" / "previous.txt").read_text() == "the previous output"
    for kind in ("partial", "old"):
        assert (tmp_path / f".out.{kind}-{dead}" / "mine.txt").read_text() == "user data"
    assert not recorded.exists() and not aside.exists() and not (tmp_path / ".out.lock").exists()


@pytest.mark.parametrize(
    "argv, named",
    [
        (["inspect", ""], "an argument"),
        (["search", "m", "--positive", "p", "--negative", "n", "--judge", ""], "--judge"),
        (["search", "m", "--judge=", "--positive", "p"], "--judge"),
        (["ablate", "m", "-d", "d.safetensors", "-o", ""], "-o"),
        (["diff", "", "b"], "an argument"),
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, argv, named):
    """click reads "" as the path "." (the folder the user stands in): one line naming the option,
    exit 1 (2 for diff, whose 1 is a finding), before anything is opened or written."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == (2 if argv[0] == "diff" else 1)
    assert (
        result.output.strip() == f"error: {named} is empty (an unset shell variable?); name a file or folder"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_empty_text_option_is_still_a_value(tmp_path):
    """Only paths are refused when empty: --system "" (no system prompt) reaches the command."""
    args = ["extract", str(tmp_path / "m"), "--positive", "p", "--negative", "n", "--system", "", "-o", "x"]
    result = CliRunner().invoke(app, args)
    assert "is empty" not in result.output and "no such file or folder" in result.output
    result = CliRunner().invoke(app, ["search", str(tmp_path / "m"), "--judge=j", "--positive", "p"])
    assert "is empty" not in result.output and result.exit_code == 1
