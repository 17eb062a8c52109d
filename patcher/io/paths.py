"""Where patcher may write, and what it may read.

`check_output` is the one gate every command that writes goes through, before any work: an output
never equals, lies inside, or contains an input (model folders, input files, and the files their
symlinks point to, as in a Hugging Face cache snapshot); `""`, `.`, `~`, the home folder, the
current folder and its parents are refused; and `--force` replaces only a previous patcher output:

- a folder with `patcher-manifest.json` (every folder patcher writes has one), or an empty folder;
- a single file carrying patcher's mark: a `.safetensors` whose `__metadata__` has a "patcher" entry
  (directions files), an `.svg` with the `<!-- written by patcher -->` comment, a `.png` whose
  "Software" text chunk starts with "patcher", a `.json` with a top-level "patcher" key, or an
  `.npy` holding one float32 unit vector (the only thing patcher writes as .npy: --save-direction).

`regular_file` / `read_bytes` / `read_text`: inputs are read only from regular files, so a FIFO or a
device in place of a shard, prompt file or config is one clear error instead of a read that waits
forever.
"""
import json
import os
import stat
import struct
from pathlib import Path

from patcher.errors import PatcherError

MANIFEST = "patcher-manifest.json"
SVG_MARK = "<!-- written by patcher -->"
_MAX_LISTED = 20_000  # files looked at per input folder for symlink targets (model folders are flat)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR,
                                                                                       "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path, what: str = "file") -> Path:
    """`path` if it is (or links to) a regular file; otherwise one clear error, without opening it."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PatcherError(path, f"{what} not found (no such file)") from None
    except OSError as e:
        raise PatcherError(path, f"cannot read {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise PatcherError(path, f"{what} is {_kind(st.st_mode)}, not a regular file")
    return path


def is_irregular(path) -> bool:
    """True when `path` exists but is neither a regular file nor a folder (a FIFO, device, socket)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def read_bytes(path, what: str = "file") -> bytes:
    regular_file(path, what)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise PatcherError(path, f"cannot read {what} ({e.strerror})") from None


def read_text(path, what: str = "file") -> str:
    try:
        return read_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise PatcherError(path, f"{what} is not UTF-8 text (byte {e.start})") from None


def read_json_object(path, what: str = "file") -> dict:
    """A JSON file that must hold an object (config.json, generation_config.json, ...)."""
    import json
    try:
        data = json.loads(read_text(path, what))
    except (ValueError, RecursionError) as e:
        raise PatcherError(path, f"cannot parse JSON ({e})") from None
    if not isinstance(data, dict):
        raise PatcherError(path, "expected a JSON object")
    return data


# --- outputs -----------------------------------------------------------------------------------------

def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _input_paths(inputs) -> list[tuple[Path, Path]]:
    """(what the user named, a real path it covers): the input itself, and for folders every symlink
    target of the files inside (a hub snapshot's blobs)."""
    out = []
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        if not os.path.lexists(src):
            continue
        out += [(src, _real(src.absolute())), (src, Path(os.path.abspath(src)))]
        if src.is_dir():
            for n, p in enumerate(src.rglob("*")):
                if n >= _MAX_LISTED:
                    break
                if p.is_symlink():
                    out.append((src, _real(p)))
    return out


def _forbidden_places(target: Path, real: Path) -> str | None:
    cwd = _real(Path.cwd())
    if real == cwd:
        return "is the current folder"
    if real in cwd.parents:
        return "contains the current folder"
    home = _real(Path.home())
    if real == home:
        return "is your home folder"
    if real in home.parents:
        return "contains your home folder"
    return None


def _marked_file(path: Path) -> bool:
    """Does this existing file carry patcher's mark (see the module docstring)?"""
    if not path.is_file() or path.is_symlink():
        return False
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            if suffix == ".safetensors":
                if len(head) < 8:
                    return False
                (n,) = struct.unpack("<Q", head[:8])
                f.seek(8)
                header = json.loads(f.read(min(n, 100_000_000)))
                return isinstance(header, dict) and "patcher" in (header.get("__metadata__") or {})
    except (OSError, ValueError, RecursionError):
        return False
    if suffix == ".svg":
        return SVG_MARK.encode() in head
    if suffix == ".png":
        return b"Software\x00patcher" in head
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and "patcher" in data
    if suffix == ".gguf":  # patcher's GGUF outputs (models, control vectors, LoRA) carry patcher.* keys
        from patcher.errors import CheckpointError
        from patcher.io.gguf_header import GGUFHeader
        try:
            header = GGUFHeader(path)
        except (OSError, ValueError, CheckpointError):  # not a readable GGUF: not ours
            return False
        try:
            return any(k.startswith("patcher.") for k in header.metadata)
        finally:
            header.close()
    if suffix == ".npy":
        import numpy as np
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return False
        return (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1
                and abs(float(np.linalg.norm(a.astype(np.float64))) - 1.0) < 1e-4)
    return False


def is_patcher_output(path) -> bool:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return (path / MANIFEST).is_file() or not any(path.iterdir())
    return _marked_file(path)


def refuse_inputs(target, inputs, kind: str = "folder") -> None:
    """An output may not be, lie inside, or contain any input, symlink targets included. Both the path
    as written and its real path (symlinks followed) are checked; "inside" is reported first."""
    raw = str(target)
    targets = {_real(Path(target).absolute()), Path(os.path.abspath(target))}
    cands = _input_paths(inputs)
    for named, src in cands:
        if any(src in t.parents for t in targets):
            raise PatcherError(raw, f"output lies inside the input folder {named}; choose a {kind} outside "
                               f"it "
                                    "(inputs are never modified)")
    for named, src in cands:
        if src in targets:
            raise PatcherError(raw, f"output is the input {named}; choose a new {kind} (inputs are never "
                               f"modified)")
    for named, src in cands:
        if any(t in src.parents for t in targets):
            raise PatcherError(raw, f"output {kind} contains the input {named}; choose another {kind}")


def check_output(target, inputs=(), *, force: bool = False, kind: str = "folder", option: str = "-o/--output",
                 replace_ok: bool = False) -> Path:
    """Refuse an unsafe output path before any work (see the module docstring); returns it absolute.
    kind: "folder" or "file". replace_ok: the caller replaces previous patcher outputs by design
    (recipe and demo folders, resumable), as if --force were given."""
    if target is None:
        raise PatcherError(option, "no output path given")
    raw = str(target)
    if not raw.strip() or raw.strip() in (".", "./"):
        raise PatcherError(option, f"{raw!r} is not an output path (an unset shell variable?); "
                                   "name a new folder or file")
    if raw == "~" or raw.startswith("~/"):
        raise PatcherError(option, f"{raw!r}: '~' was not expanded (quoted?); give the full path")
    path = Path(target).absolute()
    real = _real(path)
    if real == Path(real.anchor):
        raise PatcherError(raw, "is the root of the file system; name a new folder")
    place = _forbidden_places(path, real)
    if place:
        raise PatcherError(raw, f"{place}; name a new {kind} (the output replaces what is there)")
    refuse_inputs(target, inputs, kind)
    if path.is_symlink():
        raise PatcherError(raw, "is a symbolic link; give the real path of a new output")
    if not path.exists():
        return path
    if kind == "folder" and path.is_dir() and not any(path.iterdir()):
        return path  # an empty folder is as good as none
    if not (force or replace_ok):
        raise PatcherError(raw, "already exists; pass --force to replace it (only a previous patcher output "
                                "is ever replaced)")
    if kind == "folder" and not path.is_dir():
        raise PatcherError(raw, "exists and is not a folder; choose a new folder")
    if kind == "file" and path.is_dir():
        raise PatcherError(raw, "is a folder; the output here is a file")
    if not is_patcher_output(path):
        what = f"has no {MANIFEST}" if kind == "folder" else "was not written by patcher"
        raise PatcherError(raw, f"exists and {what}: refusing to replace it; choose a new {kind} "
                                "(or remove it yourself)")
    return path


def check_distinct(paths: dict[str, Path]) -> None:
    """Two outputs of one command must not be the same file or nest inside each other."""
    items = [(k, _real(Path(v).absolute())) for k, v in paths.items() if v is not None]
    for i, (a, pa) in enumerate(items):
        for b, pb in items[i + 1:]:
            if pa == pb or pa in pb.parents or pb in pa.parents:
                raise PatcherError(b, f"overlaps the output of {a} ({paths[a]}); give them separate paths")
