"""The browser runtime a `patcher web` site runs on: transformers.js and the onnxruntime-web build it was
made with, at pinned versions.

By default it is fetched once from the npm registry into a user cache (`npm pack`: the two package
tarballs only, no dependency tree, no install scripts), checked against the pinned sha512, and only the
files a site needs are kept (~41 MB of the 35 MB download). `--js` takes them from another install of the
same packages; `--cdn` makes the page load them from jsDelivr instead.
"""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from patcher.errors import PatcherError
from patcher.io.paths import read_json_object

TRANSFORMERS_PKG = "@huggingface/transformers"
ORT_PKG = "onnxruntime-web"
TRANSFORMERS_MODULE = "transformers.min.js"
# The WASM build transformers.js loads (asyncify: WASM and WebGPU in one binary); the plain build is
# Safari < 26's fallback, and the one ort.wasm.min.mjs (scripts/bench_web.py's runtime) loads.
WASM_FILES = (
    "ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm",
    "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm",
)
ORT_MODULE = "ort.wasm.min.mjs"
CDN = "https://cdn.jsdelivr.net/npm"


@dataclass(frozen=True)
class Pin:
    version: str
    integrity: str  # npm's sha512 of the package tarball
    files: tuple  # what the cache keeps, paths inside the package


# transformers.js's own package.json pins this exact onnxruntime-web build (a test checks it)
PINS = {
    TRANSFORMERS_PKG: Pin(
        "4.3.2",
        "sha512-V3+dqf3iWlRYJ9I9GreM3zGQd0lAXnnoPeddmkOQYWAEE4l/+Fi6p7tx/qVUJlKQgLXGim2W76rTOzz+eC0i7g==",
        ("package.json", f"dist/{TRANSFORMERS_MODULE}"),
    ),
    ORT_PKG: Pin(
        "1.31.0-dev.20260914-8d85527a0",
        "sha512-Iy7rtadoBgxS/LLvDr3QW38DB1PNXRnr0GJMcL0TAt7c9qjgVQl83UlGCVyeAnK2InpmW8Uc3PL8XIuqtDeF6g==",
        ("package.json", f"dist/{ORT_MODULE}", *(f"dist/{f}" for f in WASM_FILES)),
    ),
}


@dataclass
class Runtime:
    """Where the page gets transformers.js and the WASM files: a local folder copied into the site,
    or pinned CDN URLs."""

    transformers_version: str
    ort_version: str
    dist: Path | None  # the folder holding transformers.min.js (None: CDN)
    wasm_dir: Path | None  # the folder holding WASM_FILES

    def module_url(self) -> str:
        if self.dist is None:
            return f"{CDN}/{TRANSFORMERS_PKG}@{self.transformers_version}/dist/{TRANSFORMERS_MODULE}"
        return f"./js/{TRANSFORMERS_MODULE}"

    def wasm_base(self) -> str:
        return f"{CDN}/{ORT_PKG}@{self.ort_version}/dist/" if self.wasm_dir is None else "./js/"


def cache_root() -> Path:
    """$PATCHER_WEB_RUNTIME, else $XDG_CACHE_HOME/patcher/web-runtime, else ~/.cache/patcher/web-runtime.
    Not under PATCHER_CACHE (exports, digests): the runtime depends on nothing but the pins."""
    if os.environ.get("PATCHER_WEB_RUNTIME"):
        return Path(os.environ["PATCHER_WEB_RUNTIME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patcher" / "web-runtime"


def cached_folder() -> Path:
    """One folder per pinned pair: a newer patcher never reuses an older runtime."""
    t, o = PINS[TRANSFORMERS_PKG].version, PINS[ORT_PKG].version
    return cache_root() / f"transformers-{t}_onnxruntime-web-{o}"


def _layout(folder: Path) -> dict[str, Path]:
    """package -> its files' folder inside a cached runtime (package.json + dist/ files)."""
    return {pkg: folder / pkg.replace("/", "+") for pkg in PINS}


def _complete(folder: Path) -> bool:
    return all((d / f).is_file() for pkg, d in _layout(folder).items() for f in PINS[pkg].files)


def pinned() -> Runtime:
    """The pinned versions, no files (--cdn)."""
    return Runtime(PINS[TRANSFORMERS_PKG].version, PINS[ORT_PKG].version, None, None)


def cached(fetch: bool = True, say=None) -> Runtime:
    """The pinned runtime from the user cache, fetched first (once) when it is not there."""
    folder = cached_folder()
    if not _complete(folder):
        if not fetch:
            raise PatcherError(folder, "the pinned browser runtime is not cached")
        fetch_runtime(folder, say)
    dirs = _layout(folder)
    return Runtime(
        pinned().transformers_version,
        pinned().ort_version,
        dirs[TRANSFORMERS_PKG] / "dist",
        dirs[ORT_PKG] / "dist",
    )


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise PatcherError(
            "npm",
            "not found: the browser runtime (transformers.js, onnxruntime-web) is fetched once from the npm "
            "registry with npm; install Node.js's npm (apt-get install npm), or pass --js DIST or --cdn",
        )
    return npm


def _npm_error(r: subprocess.CompletedProcess) -> str:
    """npm's own words without its stack trace and log-file lines, on one line."""
    lines = [ln.removeprefix("npm error").strip() for ln in (r.stderr or r.stdout).splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith(("at ", "A complete log"))]
    return " ".join(" ".join(keep).split())[:300] or f"exit {r.returncode}"


def _sri(path: Path) -> str:
    with path.open("rb") as f:
        return "sha512-" + base64.b64encode(hashlib.file_digest(f, "sha512").digest()).decode()


def fetch_runtime(folder: Path, say=None) -> None:
    """`npm pack` the pinned tarballs (the user's npm config: registry, proxy; a throw-away npm cache),
    check their sha512, keep only PINS[...].files, then move the folder into place in one rename."""
    npm = _npm()
    folder.parent.mkdir(parents=True, exist_ok=True)
    specs = [f"{pkg}@{pin.version}" for pkg, pin in PINS.items()]
    if say:
        say(
            f"fetching the pinned browser runtime ({', '.join(specs)}, ~35 MB) from the npm registry "
            f"into {folder} (once)"
        )
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder.parent) as scratch:
        tmp = Path(scratch)
        cmd = [
            npm,
            "pack",
            *specs,
            "--ignore-scripts",
            "--json",
            "--pack-destination",
            str(tmp),
            "--cache",
            str(tmp / "npm-cache"),
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0:
            raise PatcherError(
                "npm pack",
                f"could not fetch {' '.join(specs)}: {_npm_error(r)} (--js DIST or --cdn need no download)",
            )
        packed = {p["name"]: tmp / p["filename"] for p in json.loads(r.stdout)}
        stage = tmp / "runtime"
        for pkg, dst in _layout(stage).items():
            tgz, pin = packed.get(pkg), PINS[pkg]
            if tgz is None or _sri(tgz) != pin.integrity:
                raise PatcherError(
                    tgz or pkg, f"{pkg}@{pin.version}: not the pinned tarball (sha512 differs)"
                )
            with tarfile.open(tgz) as tar:
                for f in pin.files:
                    member = tar.extractfile(f"package/{f}")
                    if member is None:  # a folder or a link where the pin lists a file
                        raise PatcherError(tgz, f"{pkg}@{pin.version}: package/{f} is not a regular file")
                    (dst / f).parent.mkdir(parents=True, exist_ok=True)
                    with open(dst / f, "wb") as out:
                        shutil.copyfileobj(member, out)
        for p in [stage, *stage.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if folder.is_dir() and not _complete(folder):  # a damaged copy (a file deleted): replaced whole
            shutil.rmtree(folder)
        try:
            stage.rename(folder)
        except OSError:  # another process finished first: its copy is the same pinned files
            if not _complete(folder):
                raise


def from_js(js: Path) -> Runtime:
    """--js: node_modules/@huggingface/transformers/dist of another install, with the onnxruntime-web
    build it expects beside it (nested or hoisted, as npm lays it out)."""
    dist = Path(js)
    pkg_json = dist.parent / "package.json"
    hint = "pass the dist/ folder of an npm install of @huggingface/transformers, or leave --js out"
    if not (dist / TRANSFORMERS_MODULE).is_file() or not pkg_json.is_file():
        raise PatcherError(
            js, f"no transformers.js build at {dist} ({TRANSFORMERS_MODULE} and ../package.json); {hint}"
        )
    pkg = read_json_object(pkg_json)
    want = ((pkg.get("dependencies") or {}).get(ORT_PKG) or "").lstrip("^~=")
    if pkg.get("name") != TRANSFORMERS_PKG or not want:
        raise PatcherError(pkg_json, f"not the {TRANSFORMERS_PKG} package (or it lists no {ORT_PKG})")
    modules = dist.parent.parent.parent if dist.parent.parent.name.startswith("@") else dist.parent.parent
    for cand in (dist.parent / "node_modules" / ORT_PKG, modules / ORT_PKG):
        meta = cand / "package.json"
        if (
            meta.is_file()
            and read_json_object(meta).get("version") == want
            and all((cand / "dist" / f).is_file() for f in WASM_FILES)
        ):
            return Runtime(pkg["version"], want, dist, cand / "dist")
    raise PatcherError(
        dist,
        f"transformers.js {pkg['version']} needs {ORT_PKG} {want} "
        f"({', '.join(WASM_FILES[:2])}) and it is not installed beside it; {hint}",
    )


def find(js: Path | None, cdn: bool, say=None) -> Runtime:
    """--cdn: pinned URLs (with --js: that install's versions); --js: that folder; else the user cache."""
    if js is not None:
        rt = from_js(js)
        return Runtime(rt.transformers_version, rt.ort_version, None, None) if cdn else rt
    return pinned() if cdn else cached(say=say)
