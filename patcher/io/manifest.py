"""Provenance: `patcher-manifest.json` in every output folder — tool version, the command or recipe
step, sha256 of every input and output file, the directions used, timings.

Hashing runs on a background thread while the edit streams (hashlib releases the GIL), inputs from
the start and each output shard as soon as it is written. Digests are remembered by file identity
(device, inode, size, mtime, ctime — ctime cannot be set from user space, so any rewrite of the file
misses the cache), so re-running on the same base, or the next step of a recipe, does not hash again.
"""

import hashlib
import json
import os
import platform
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from patcher import __version__
from patcher.io.jsonsafe import dumps

MANIFEST = "patcher-manifest.json"
_CHUNK = 8 << 20


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_CACHE_LOCK = threading.Lock()


def digest_cache_path() -> Path:
    """Where file digests are cached by identity (PATCHER_CACHE, default ~/.cache/patcher)."""
    return (
        Path(os.environ.get("PATCHER_CACHE", Path.home() / ".cache" / "patcher")) / "sha256-by-identity.json"
    )


def _identity(path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def folder_identity(path, *salt) -> str:
    """Cheap identity of a model folder (path, and each file's name, size and mtime): keys caches and
    recipe fingerprints without reading the data."""
    path = Path(path).resolve()
    h = hashlib.sha256("|".join([str(path), *map(str, salt)]).encode())
    for p in sorted(path.iterdir()) if path.is_dir() else [path]:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class DigestCache:
    """file identity -> sha256, persisted between runs (a cache: losing it only costs time)."""

    def __init__(self):
        self.path = digest_cache_path()
        try:
            self.known = json.loads(self.path.read_text())
            self.known = self.known if isinstance(self.known, dict) else {}
        except (OSError, ValueError):
            self.known = {}
        self.added = {}

    def sha256(self, path) -> str:
        key = _identity(path)
        if key in self.known:
            return self.known[key]
        digest = sha256_file(path)
        if key == _identity(path):  # unchanged while we read it
            with _CACHE_LOCK:
                self.added[key] = digest
        return digest

    def lookup(self, path) -> str | None:
        """The remembered sha256 of a file, if its identity is unchanged; never reads the file."""
        return self.known.get(_identity(path))

    def remember(self, path, digest: str, identity: str | None = None) -> None:
        """Store a digest computed elsewhere (while streaming). `identity`: the file's identity before
        it was read; nothing is stored if the file changed since."""
        key = _identity(path)
        if identity is None or identity == key:
            with _CACHE_LOCK:
                self.added[key] = digest

    def save(self) -> None:
        if not self.added:
            return
        with _CACHE_LOCK:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                merged = {**self.known, **self.added}
                if len(merged) > 100_000:  # keep the file small: newest entries win
                    merged = dict(list(merged.items())[-50_000:])
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
                tmp.write_text(json.dumps(merged))
                tmp.replace(self.path)
            except OSError:
                pass  # a read-only home only costs time


def identity(path) -> str:
    """A file's identity (device, inode, size, mtime, ctime): what the digest cache is keyed by."""
    return _identity(path)


_HEX64 = re.compile(r"[0-9a-f]{64}")


def hub_blob_sha256(path) -> str | None:
    """For a file in a Hugging Face cache snapshot (`snapshots/<rev>/<file>` -> `blobs/<sha256>`), the
    sha256 the hub recorded, taken from the blob's name; None for any other file. LFS files (every
    .safetensors) are named by their sha256; small files by a git sha1 (40 hex), which is not matched."""
    path = Path(path)
    if not path.is_symlink() and not any(p.is_symlink() for p in path.parents):
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
        return target.name
    return None


def size_only(path) -> str:
    return f"size:{Path(path).stat().st_size}"


class Hasher:
    """sha256 of files on one background thread; results keyed by a label. With enabled=False
    (`--no-hash`) only sizes are recorded: hashing reads every input and output byte once more."""

    def __init__(self, enabled: bool = True):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.jobs: dict[str, Future[str]] = {}
        self.cache = DigestCache() if enabled else None
        self.digest = self.cache.sha256 if self.cache else size_only

    def add(self, key: str, path: Path) -> None:
        self.jobs[key] = self.pool.submit(self.digest, path)

    def set(self, key: str, digest: str) -> None:
        """Record a digest computed while the bytes streamed (see patcher.io.writer)."""
        done: Future[str] = Future()
        done.set_result(digest)
        self.jobs[key] = done

    def known(self, path: Path) -> str | None:
        """The cached sha256 of an unchanged file (None: not known, or hashing is off)."""
        return self.cache.lookup(path) if self.cache else None

    def add_folder(self, folder: Path, prefix: str = "", skip=()) -> None:
        for p in sorted(Path(folder).iterdir()):
            if p.is_file() and p.name not in skip:
                self.add(prefix + p.name, p)

    def results(self) -> dict[str, str]:
        out = {k: f.result() for k, f in self.jobs.items()}
        self.pool.shutdown()
        if self.cache:
            self.cache.save()
        return out

    def cancel(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def write(folder: Path, **kw) -> None:
    write_file(Path(folder) / MANIFEST, **kw)


def write_file(
    path: Path,
    *,
    kind: str,
    command: str | None,
    inputs: dict,
    outputs: dict,
    record: dict | None = None,
    directions: list | None = None,
    timings: dict | None = None,
    recipe: dict | None = None,
    extra: dict | None = None,
) -> None:
    """`extra`: further top-level keys (e.g. hub_cache, warnings), written only when given."""
    data = {
        **(extra or {}),
        "patcher": __version__,
        "kind": kind,
        "command": command,
        "recipe": recipe,
        "edit": record,
        "directions": directions or [],
        "inputs": inputs,
        "outputs": outputs,
        "timings": timings or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
    }
    Path(path).write_text(dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read(folder) -> dict | None:
    return read_file(Path(folder) / MANIFEST)


def read_file(path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(folder, fingerprint: str | None = None) -> bool:
    """True when the folder's manifest lists outputs that all exist with their recorded sha256 (and,
    if given, the manifest was made for the same step fingerprint): a re-run may skip it."""
    data = read(folder)
    if not data or not isinstance(data.get("outputs"), dict) or not data["outputs"]:
        return False
    if fingerprint is not None and (data.get("recipe") or {}).get("fingerprint") != fingerprint:
        return False
    cache = DigestCache()  # outputs written by patcher were remembered as they were hashed
    for name, digest in data["outputs"].items():
        p = Path(folder) / name
        if not p.is_file() or cache.sha256(p) != digest:
            return False
    cache.save()
    return True
