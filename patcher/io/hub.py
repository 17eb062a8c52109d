"""Models where users keep them: the Hugging Face hub cache, read offline.

A MODEL argument that is not an existing file or folder but reads as a repo id (`org/name`, optional
`@revision`: a branch, tag or commit) is looked up in the local cache with huggingface_hub, never on
the network. The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub, read at
call time (huggingface_hub reads its environment once, at import). A snapshot's files are symlinks to
`../../blobs/<sha256>`: the whole `models--org--name` folder is an input that no output may touch.
"""

import os
import re
from contextlib import contextmanager
from pathlib import Path

from patcher.errors import PatcherError

REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w][\w./-]*))?")


def cache_dir() -> Path:
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or str(
        Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """(repo, revision) when `text` reads as a hub repo id, else None."""
    m = REPO_ID.fullmatch(str(text))
    if not m or ".." in m["repo"] or m["repo"].endswith((".safetensors", ".json")):
        return None
    return m["repo"], m["revision"]


@contextmanager
def _offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def snapshot(repo: str, revision: str | None = None) -> Path:
    """The cached snapshot folder of `repo` at `revision` (default main); one-line error if absent."""
    cache = cache_dir()
    label = repo + (f"@{revision}" if revision else "")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PatcherError(
            label,
            "is not a file or folder, and huggingface_hub (needed to read the hub cache) is not installed",
        ) from None
    try:
        with _offline():
            folder = snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=True)
    except Exception as e:
        raise PatcherError(
            label,
            f"no such file or folder, and not in the Hugging Face cache {cache} "
            f"({type(e).__name__}); patcher never downloads: fetch it first, e.g. "
            f"`hf download {repo}`",
        ) from None
    return Path(folder)


def repo_root(path: Path) -> Path | None:
    """The `models--org--name` cache entry a snapshot folder belongs to, if it is one."""
    real = Path(path).resolve()
    for p in (real, *real.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith(("models--", "datasets--")):
            return p.parent.parent
    return None


def locate(source) -> tuple[Path, list[Path]]:
    """(local path to open, extra input paths): an existing path is itself; a repo id is its cached
    snapshot. A snapshot (given either way) brings its whole cache entry as an input."""
    path = Path(source)
    if not path.exists() and not path.is_symlink():
        parsed = parse_repo_id(str(source))
        if parsed is not None:
            path = snapshot(*parsed)
    root = repo_root(path) if path.exists() else None
    return path, [root] if root else []
