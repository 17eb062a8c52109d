"""patcher's own GGUF header reader against the gguf package's GGUFReader (every metadata key, value and
record byte, every tensor info, alignment, data offset), a 262k-token vocabulary against what was written,
and hostile headers: one CheckpointError naming the file, never a numpy error or a huge allocation."""

import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(ROOT / "scripts"))
import make_gguf_fixtures as mk  # noqa: E402

from patcher.errors import CheckpointError  # noqa: E402
from patcher.io.gguf import GGUFFile  # noqa: E402
from patcher.io.gguf_header import GGUFHeader  # noqa: E402

N_BIG = 262_144


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdr")
    out = [
        mk.convert(m, root / f"{m}-{q}.gguf", q)
        for m, q in (("llama", "Q8_0"), ("qwen2", "Q4_1"), ("gemma3_text", "F32"), ("qwen3_moe", "Q4_K"))
    ]
    out.append(mk.spm_vocab(root / "spm.gguf"))
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return mk.big_vocab(tmp_path_factory.mktemp("big") / "big.gguf", N_BIG)


def _same_as_reader(path, flattened=()):
    """`flattened`: keys whose value GGUFReader.contents() gets wrong (arrays of arrays come out flat)."""
    r = gguf.GGUFReader(path)
    h = GGUFHeader(path)
    raw = path.read_bytes() if isinstance(path, Path) else Path(path).read_bytes()
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert list(h.metadata) == keys
    for k in keys:
        f = r.fields[k]
        want = f.contents()
        got = h.metadata[k]
        if k in flattened:  # checked against what was written instead
            continue
        assert got == want and type(got) is type(want), k
        if isinstance(want, list) and want:
            assert type(got[0]) is type(want[0]), k
        n = sum(int(p.nbytes) for p in f.parts)
        assert h.field_bytes(k) == raw[f.offset : f.offset + n], k
    assert (h.alignment, h.data_offset) == (r.alignment, r.data_offset)
    assert len(h.tensors) == len(r.tensors)
    for ours, theirs in zip(h.tensors, r.tensors):
        assert ours.name == theirs.name
        assert ours.ne == tuple(int(x) for x in theirs.shape)
        assert ours.qtype == int(theirs.tensor_type)
        assert h.data_offset + ours.offset == int(theirs.data_offset)
    g = GGUFFile(path)
    for t in r.tensors:  # the bytes patcher hands the dequantizer are the reader's
        assert np.array_equal(g.raw(t.name).reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), (
            t.name
        )
    g.close()
    h.close()


def test_every_key_and_tensor_matches_gguf_reader(files):
    for path in files:
        _same_as_reader(path)


@pytest.mark.real
def test_real_file_matches_gguf_reader(real_model):
    """SmolLM2-135M-Instruct's Q4_1 GGUF as shipped, and the K-quant files llama.cpp's quantizer made."""
    for path in (real_model.gguf, *real_model.kquants.values()):
        _same_as_reader(path)


def test_big_vocabulary_is_read_in_bulk_and_decoded_when_asked(big):
    t = time.perf_counter()
    g = GGUFFile(big)
    opened = time.perf_counter() - t
    md = g.metadata
    assert g.vocab_size == N_BIG and md.count("tokenizer.ggml.merges") > 200_000
    assert "tokenizer.ggml.tokens" not in md._cache  # opening did not decode the vocabulary
    assert opened < 2.0, opened  # GGUFReader: tens of seconds to minutes for this file
    tokens = g.tokens()
    assert len(tokens) == N_BIG and len(set(tokens)) == N_BIG and tokens[-2:] == ["<bos>", "<eos>"]
    merges = md["tokenizer.ggml.merges"]
    assert all(" ".join(m.split(" ")) in merges[:5] for m in merges[:5])
    vocab = set(tokens)
    assert all(a + b in vocab for a, b in (m.split(" ") for m in merges[::997]))
    scores = md.numbers("tokenizer.ggml.scores")
    np.testing.assert_array_equal(scores, -np.arange(N_BIG, dtype=np.float32))
    assert md["tokenizer.ggml.token_type"][-3:] == [1, 3, 3]
    assert md["tokenizer.ggml.bos_token_id"] == N_BIG - 2
    g.close()


# --- hostile headers ------------------------------------------------------------------------------------


def _record_start(path, key):
    h = GGUFHeader(path)
    f = h.metadata.fields[key]
    h.close()
    return f


def _hostile(src: Path, tmp_path: Path):
    """(name, bytes) of corrupt variants of a valid file, each aimed at one check."""
    data = src.read_bytes()
    h = GGUFHeader(src)
    tok = h.metadata.fields["tokenizer.ggml.tokens"]
    arch = h.metadata.fields["general.architecture"]
    data_offset, n_fields = h.data_offset, len(h.metadata)
    last = max(h.metadata.fields.values(), key=lambda f: f.end)  # the first tensor info follows it
    h.close()

    def put(at, fmt, *v):
        b = bytearray(data)
        struct.pack_into(fmt, b, at, *v)
        return bytes(b)

    t0 = last.end
    name_len = struct.unpack_from("<Q", data, t0)[0]
    dims_at = t0 + 8 + name_len
    yield "string count", put(tok.at + 4, "<Q", 1 << 60)
    yield "string count just past EOF", put(tok.at + 4, "<Q", (len(data) - tok.at) // 8 + 1)
    yield "string length", put(tok.at + 12, "<Q", 1 << 62)
    yield "key length", put(arch.offset, "<Q", 1 << 63)
    yield "value type", put(arch.at - 4, "<I", 77)
    yield "array element type", put(tok.at, "<I", 99)
    yield "tensor dims", put(dims_at, "<I", 1000)
    yield "tensor ne0", put(dims_at + 4, "<Q", 1 << 62)
    yield "tensor offset", put(dims_at + 4 + 16 + 4, "<Q", 1 << 40)
    yield "tensor type", put(dims_at + 4 + 16, "<I", 1234)
    yield "key count", put(16, "<Q", n_fields + 1000)
    yield "tensor count", put(8, "<Q", 1 << 40)
    yield "version", put(4, "<I", 1 << 24)
    yield "magic", b"GGML" + data[4:]
    yield "no data", data[:data_offset]
    for cut in (3, 23, 24, 30, tok.at + 2, tok.at + 20, tok.end - 1, t0 + 5, dims_at + 3):
        yield f"truncated at {cut}", data[:cut]


def test_hostile_headers_fail_with_one_line_naming_the_file(files, tmp_path):
    src = files[0]
    for name, blob in _hostile(src, tmp_path):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError) as e:
            GGUFFile(bad)
        msg = str(e.value)
        assert "bad.gguf" in msg and "\n" not in msg, (name, msg)


def test_random_header_damage_is_refused_cleanly(files, tmp_path):
    """Any byte of the header overwritten: the file opens (the damage was harmless) or one CheckpointError."""
    src = files[1]
    data = src.read_bytes()
    h = GGUFHeader(src)
    end = h.data_offset
    h.close()
    rng = np.random.default_rng(7)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(300):
        b = bytearray(data)
        at = int(rng.integers(0, end))
        width = int(rng.choice([1, 4, 8]))
        b[at : at + width] = rng.integers(0, 256, width, dtype=np.uint8).tobytes()
        bad.write_bytes(bytes(b))
        try:
            g = GGUFFile(bad)
        except CheckpointError as e:
            assert "\n" not in str(e) and "fuzz.gguf" in str(e)
            continue
        for k in g.metadata:  # what opened decodes
            g.metadata[k]
        g.close()


def test_array_of_arrays_and_alignment(tmp_path):
    """Nested arrays decode like GGUFReader's; a non-power-of-two alignment is refused by name."""
    path = tmp_path / "nested.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("x.nested", [[1, 2, 3], [4], ["s"]])
    w.add_array("x.strings", ["a", "ü", ""])
    w.add_bool("x.flag", True)
    w.add_uint32("general.alignment", 64)
    w.add_tensor("t", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same_as_reader(path, flattened={"x.nested"})
    h = GGUFHeader(path)
    assert h.metadata["x.nested"] == [[1, 2, 3], [4], ["s"]] and h.metadata["x.strings"] == ["a", "ü", ""]
    assert h.metadata["x.flag"] is True and h.alignment == 64
    h.close()
    f = _record_start(path, "general.alignment")
    b = bytearray(path.read_bytes())
    struct.pack_into("<I", b, f.at, 48)
    path.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="general.alignment must be a power of two"):
        GGUFHeader(path)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        GGUFHeader(fifo)
