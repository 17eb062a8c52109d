"""Where patcher may write, and what it may read.

`check_output` is the one gate every command that writes goes through, before any work: an output
never equals, lies inside, or contains an input (model folders, input files, and the files their
symlinks point to, as in a Hugging Face cache snapshot); `""`, `.`, `~`, the home folder, the
current folder and its parents are refused; and `--force` replaces only a previous patcher output:

- a folder whose `patcher-manifest.json` is a valid manifest (by content, not by name) and that holds
  nothing the manifest does not list (files added later are named in the refusal), or an empty folder;
- a single file patcher recorded as its own when it published it (`owned-outputs.json` in the patcher
  cache: real path and identity, which any rewrite changes). Never guessed from contents: a unit vector
  in an `.npy`, or a file carrying patcher's metadata, may be the user's own (copied, edited).
Replacements `check_output` approves are remembered for this process: patcher.io.atomic replaces a
target only if it was approved and is still what was approved.

`regular_file` / `read_bytes` / `read_text`: inputs are read only from regular files, so a FIFO or a
device in place of a shard, prompt file or config is one clear error instead of a read that waits
forever.
"""

import json
import os
import stat
from pathlib import Path

from patcher.errors import PatcherError

MANIFEST = "patcher-manifest.json"
SVG_MARK = "<!-- written by patcher -->"  # for readers; ownership is recorded
_MAX_LISTED = 20_000  # files looked at per input folder for symlink targets (model folders are flat)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


# Largest text/JSON side file read whole (configs, tokenizer.json, templates, prompts, recipes): real
# tokenizer.json files are under 40 MB; a 3 GB one took 3.2 GB of memory before failing.
MAX_SIDE_FILE = 256 << 20


def regular_file(path, what: str = "file", limit: int | None = None) -> Path:
    """`path` if it is (or links to) a regular file (of at most `limit` bytes); otherwise one clear
    error, without opening it."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PatcherError(path, f"{what} not found (no such file)") from None
    except OSError as e:
        raise PatcherError(path, f"cannot read {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise PatcherError(path, f"{what} is {_kind(st.st_mode)}, not a regular file")
    if limit is not None and st.st_size > limit:
        raise PatcherError(
            path,
            f"{what} is {st.st_size / 2**20:,.0f} MiB; more than the {limit >> 20} MiB "
            "patcher reads whole (a damaged or wrong file?)",
        )
    return path


def read_bytes(path, what: str = "file") -> bytes:
    regular_file(path, what, MAX_SIDE_FILE)
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


# --- ownership of single-file outputs: recorded when published, never guessed from contents ----------


def _owned_path() -> Path:
    from patcher.io.manifest import digest_cache_path

    return digest_cache_path().parent / "owned-outputs.json"


def _file_identity(path) -> str:
    from patcher.io.manifest import identity

    return identity(path)


def _owned_table(fd: int) -> dict:
    raw = b""
    while chunk := os.read(fd, 1 << 20):
        raw += chunk
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        data = {}
    return data if isinstance(data, dict) else {}


def record_owned(path) -> None:
    """Remember that patcher published this file (its real path and identity): `--force` may replace it
    later while nobody has rewritten it. A cache: losing it only makes `--force` refuse."""
    import fcntl

    path = Path(path)
    table_path = _owned_path()
    try:
        table_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(table_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        table = _owned_table(fd)
        table[str(_real(path.absolute()))] = _file_identity(path)
        if len(table) > 20_000:  # keep it small: forget files that are gone or were rewritten
            table = {k: v for k, v in table.items() if os.path.isfile(k) and _file_identity(k) == v}
        data = json.dumps(table).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass  # a read-only cache only costs a later --force
    finally:
        os.close(fd)


def owned_file(path) -> bool:
    """Did patcher publish this very file (same identity as when it was recorded)?"""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        fd = os.open(_owned_path(), os.O_RDONLY)
    except OSError:
        return False
    try:
        table = _owned_table(fd)
    finally:
        os.close(fd)
    return table.get(str(_real(path.absolute()))) == _file_identity(path)


# --- ownership of folders: a valid manifest that lists everything inside -----------------------------

_MAX_FOREIGN_SCAN = 100_000


def valid_manifest(folder) -> bool:
    """Is `folder/patcher-manifest.json` a manifest patcher wrote (checked by content, not by name)?"""
    from patcher.io.manifest import read

    data = read(folder) or {}
    return (
        bool(data)
        and isinstance(data.get("patcher"), str)
        and isinstance(data.get("kind"), str)
        and isinstance(data.get("created"), str)
        and isinstance(data.get("inputs"), dict)
        and isinstance(data.get("outputs"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in data["outputs"].items())
    )


def foreign_entries(folder) -> list[str]:
    """Files and folders inside a patcher output folder that its manifest does not list (added later)."""
    from patcher.io.manifest import read

    folder = Path(folder)
    listed = set((read(folder) or {}).get("outputs") or {}) | {MANIFEST}
    parents = {q.as_posix() for k in listed for q in Path(k).parents}
    foreign: list[str] = []
    foreign_dirs: list[str] = []
    for n, p in enumerate(sorted(folder.rglob("*"))):
        if n >= _MAX_FOREIGN_SCAN:
            return foreign + [f"(more than {_MAX_FOREIGN_SCAN} entries)"]
        rel = p.relative_to(folder).as_posix()
        if any(rel.startswith(d + "/") for d in foreign_dirs):
            continue  # inside a foreign folder: the folder is named
        if p.is_dir() and not p.is_symlink():
            if rel not in parents:
                foreign_dirs.append(rel)
                foreign.append(rel + "/")
        elif rel not in listed:
            foreign.append(rel)
    return foreign


def replaceable(path, kind: str) -> str | None:
    """Why `path` may not be replaced as a previous patcher output (None: it may)."""
    path = Path(path)
    if kind == "folder":
        if not (path / MANIFEST).is_file():
            return f"has no {MANIFEST}"
        if not valid_manifest(path):
            return f"has a {MANIFEST} patcher did not write (not a valid manifest)"
        foreign = foreign_entries(path)
        if foreign:
            listed = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            return f"holds files its {MANIFEST} does not list (added after patcher wrote it): {listed}"
        return None
    if owned_file(path):
        return None
    return "was not written by patcher (or was changed since; patcher records the files it writes)"


def is_patcher_output(path) -> bool:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return not any(path.iterdir()) or replaceable(path, "folder") is None
    return replaceable(path, "file") is None


_APPROVED: dict[str, str] = {}  # real path -> why check_output approved replacing it (this process)


def approve(path: Path, why: str) -> None:
    _APPROVED[str(_real(Path(path).absolute()))] = why


def approved_replacement(path) -> str | None:
    """ "empty folder" or "patcher output" when check_output approved replacing `path`; else None."""
    return _APPROVED.pop(str(_real(Path(path).absolute())), None)


def refuse_inputs(target, inputs, kind: str = "folder") -> None:
    """An output may not be, lie inside, or contain any input, symlink targets included. Both the path
    as written and its real path (symlinks followed) are checked; "inside" is reported first."""
    raw = str(target)
    targets = {_real(Path(target).absolute()), Path(os.path.abspath(target))}
    cands = _input_paths(inputs)
    for named, src in cands:
        if any(src in t.parents for t in targets):
            if not Path(named).is_dir():
                raise PatcherError(
                    raw,
                    f"output path runs through the input file {named} (a file, not a "
                    "folder); choose another path (inputs are never modified)",
                )
            raise PatcherError(
                raw,
                f"output lies inside the input folder {named}; choose a {kind} outside "
                "it (inputs are never modified)",
            )
    for named, src in cands:
        if src in targets:
            raise PatcherError(
                raw, f"output is the input {named}; choose a new {kind} (inputs are never modified)"
            )
    for named, src in cands:
        if any(t in src.parents for t in targets):
            raise PatcherError(raw, f"output {kind} contains the input {named}; choose another {kind}")


def check_output(
    target,
    inputs=(),
    *,
    force: bool = False,
    kind: str = "folder",
    option: str = "-o/--output",
    replace_ok: bool = False,
    resume: bool = False,
) -> Path:
    """Refuse an unsafe output path before any work (see the module docstring); returns it absolute.
    kind: "folder" or "file". replace_ok: the caller replaces previous patcher outputs by design
    (recipe steps, export variants), as if --force were given. resume: a folder the caller writes
    into without replacing it (recipe and demo folders)."""
    if target is None:
        raise PatcherError(option, "no output path given")
    raw = str(target)
    if not raw.strip() or raw.strip() in (".", "./"):
        raise PatcherError(
            option, f"{raw!r} is not an output path (an unset shell variable?); name a new folder or file"
        )
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
    if not resume and not path.parent.is_dir():  # no folders the user did not ask for (a typo); a recipe
        # (resume) declares its output folders and gets them
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise PatcherError(raw, f"the folder it would be written in ({path.parent}) {what}; create it first")
    if path.is_symlink():
        raise PatcherError(raw, "is a symbolic link; give the real path of a new output")
    if not path.exists():
        return path
    if kind == "folder" and path.is_dir() and not any(path.iterdir()):
        approve(path, "empty folder")
        return path  # an empty folder is as good as none
    if not (force or replace_ok or resume):
        raise PatcherError(
            raw,
            "already exists; pass --force to replace it (only a previous patcher output is ever replaced)",
        )
    if kind == "folder" and not path.is_dir():
        raise PatcherError(raw, "exists and is not a folder; choose a new folder")
    if kind == "file" and path.is_dir():
        raise PatcherError(raw, "is a folder; the output here is a file")
    if resume:  # written into, never replaced: only its manifest has to be patcher's
        if not valid_manifest(path):
            raise PatcherError(
                raw,
                f"exists and has no valid {MANIFEST}: not a previous patcher output; "
                "choose a new folder (or remove it yourself)",
            )
        return path
    problem = replaceable(path, kind)
    if problem:
        raise PatcherError(
            raw, f"exists and {problem}: refusing to replace it; choose a new {kind} (or remove it yourself)"
        )
    approve(path, "patcher output")
    return path


def check_distinct(paths: dict[str, Path]) -> None:
    """Two outputs of one command must not be the same file or nest inside each other."""
    items = [(k, _real(Path(v).absolute())) for k, v in paths.items() if v is not None]
    for i, (a, pa) in enumerate(items):
        for b, pb in items[i + 1 :]:
            if pa == pb or pa in pb.parents or pb in pa.parents:
                raise PatcherError(b, f"overlaps the output of {a} ({paths[a]}); give them separate paths")
