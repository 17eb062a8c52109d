"""Publishing an output without losing anything: one helper for folders and files.

An output is built under a hidden name beside the target (`.NAME.partial-PID-TOKEN`) and published
by a rename that never replaces: `renameat2(RENAME_NOREPLACE)` (Linux; elsewhere `link` + `unlink`
for files, a checked rename for folders). Something that appears at the target during the run is
therefore never overwritten. An existing target is replaced only when `check_output` approved it
(`--force`, or a command that replaces its own outputs) and it is still what was approved: it is
first moved aside, then checked again (same folder or file, still patcher's, nothing foreign added)
and put back untouched if not.

`OutputLock`: `flock` on `.NAME.lock` beside the target, so two runs writing one output cannot both
"win"; the lock file records the partial and set-aside names of its run (process id + random
token), and only those names, left by a run that no longer holds the lock, are ever cleaned up (a
killed run's set-aside previous output is put back when nothing replaced it).
"""

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TypeGuard

from patcher.errors import PatcherError

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_LOCK_KIND = "patcher output lock"


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()


def rename_noreplace(src, dst) -> None:
    """Rename `src` to `dst`; FileExistsError if `dst` exists (it is never replaced)."""
    src, dst = os.fsencode(src), os.fsencode(dst)
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # not supported here: fall back
            raise OSError(e, os.strerror(e), os.fsdecode(dst))
    if os.path.isdir(src) and not os.path.islink(src):
        if os.path.lexists(dst):  # checked rename: a race window remains where renameat2 is missing
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)  # fails with EEXIST, never replaces
    os.unlink(src)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputLock:
    """An exclusive lock on one output path (see the module notes); `record` names this run's
    temporary paths in the lock file, `leftovers` are those a killed run recorded."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.fd = -1
        self.leftovers: dict = {}

    def acquire(self) -> "OutputLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise PatcherError(
                    self.target,
                    f"cannot create the lock file {self.path.name} beside the output ({e.strerror})",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PatcherError(
                    self.target,
                    f"another patcher run is writing this output right now (it holds {self.path.name}); wait "
                    "for it to finish or choose another output",
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:  # not unlinked by the previous holder between our open and flock
                break
            os.close(fd)
        self.fd = fd
        raw = os.pread(fd, 1 << 16, 0)
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError:
            data = None
        if not isinstance(data, dict) or (data and data.get("kind") != _LOCK_KIND):
            os.close(fd)
            self.fd = -1
            raise PatcherError(
                self.path,
                "exists and is not patcher's lock file; remove it yourself "
                "(patcher uses this name to lock the output beside it)",
            )
        self.leftovers = data
        self.record()
        return self

    def record(self, **names) -> None:
        """Write this run's temporary names into the lock file before creating them."""
        data = json.dumps({"kind": _LOCK_KIND, "pid": os.getpid(), **names}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def clean_leftovers(self) -> None:
        """Remove what a killed run left: only the names it recorded in this lock file (each carries
        its process id and a random token); put back a previous output it had set aside if nothing
        replaced it."""
        parent = self.target.parent
        partial = self.leftovers.get("partial")
        if _plain_name(partial) and partial.startswith(f".{self.target.name}.partial-"):
            remove(parent / partial)
        old = self.leftovers.get("old")
        if _plain_name(old) and old.startswith(f".{self.target.name}.old-") and os.path.lexists(parent / old):
            try:
                rename_noreplace(parent / old, self.target)  # the run died before publishing
            except FileExistsError:
                remove(parent / old)  # it published, then died before removing the old output
            else:
                raise PatcherError(
                    self.target,
                    f"an interrupted run had set the previous output aside as "
                    f"{old}; it was put back: run again",
                )

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink()  # while still locked: the next run's open-and-flock sees a fresh file
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


def _plain_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and name != "" and "/" not in name and name not in (".", "..")


def _stat_key(path: Path):
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (
        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if not os.path.isdir(path)
        else (st.st_dev, st.st_ino)
    )


class AtomicOutput:
    """Build an output (kind "folder" or "file") at `tmp`, publish it at `target` on success.

    `target` must have passed `patcher.io.paths.check_output` in this process: an existing target is
    replaced only if the check approved replacing it and it is still what was approved."""

    def __init__(self, target, kind: str = "file"):
        from patcher.io.paths import approved_replacement

        self.target, self.kind = Path(target).absolute(), kind
        self.approved = approved_replacement(self.target)
        self.checked = _stat_key(self.target)
        if self.checked is not None and self.approved is None:
            raise PatcherError(
                self.target,
                "already exists; pass --force to replace it (only a previous "
                "patcher output is ever replaced)",
            )
        token = f"{os.getpid()}-{secrets.token_hex(3)}"
        suffix = self.target.suffix if kind == "file" else ""  # writers that insist on a suffix
        self.tmp = self.target.parent / f".{self.target.name}.partial-{token}{suffix}"
        self.old = self.target.parent / f".{self.target.name}.old-{token}"
        self.lock = OutputLock(self.target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self.lock.clean_leftovers()
            self.lock.record(partial=self.tmp.name)
            if self.kind == "folder":
                self.tmp.mkdir()
        except BaseException:
            self.lock.release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._publish()
        finally:
            if os.path.lexists(self.tmp):
                remove(self.tmp)
            self.lock.release()
        if isinstance(exc, OSError) and not exc.filename and not isinstance(exc, InterruptedError):
            # a full disk while writing (from a writer thread: no file name): say which output
            raise PatcherError(
                self.target, f"cannot write this output ({exc.strerror or exc}); nothing was written"
            ) from exc
        return False

    def _publish(self) -> None:
        if self.kind == "folder":
            for p in self.tmp.iterdir():  # one flush at the end: writeback overlapped the compute
                if not p.is_symlink():
                    fsync(p)
        fsync(self.tmp)
        try:
            rename_noreplace(self.tmp, self.target)
        except FileExistsError:
            self._replace()
        fsync(self.target.parent)
        if self.kind == "file":
            from patcher.io.paths import record_owned

            record_owned(self.target)

    def _replace(self) -> None:
        t = self.target
        if self.approved is None or _stat_key(t) != self.checked:
            raise PatcherError(
                t,
                "was created or changed while this run worked; it was left untouched and "
                "nothing was written (run again to replace it, or choose a new output)",
            )
        if self.approved == "empty folder":
            try:
                os.rmdir(t)
            except OSError:
                raise PatcherError(
                    t,
                    "files were added to this empty folder while this run worked; left "
                    "untouched, nothing was written",
                ) from None
            rename_noreplace(self.tmp, t)
            return
        from patcher.io.paths import replaceable

        if self.kind == "file" and (problem := replaceable(t, "file")):  # recorded by its path
            raise PatcherError(t, f"{problem}; it was left untouched and nothing was written")
        self.lock.record(partial=self.tmp.name, old=self.old.name)
        rename_noreplace(t, self.old)  # aside first: nothing can change it through the path now
        problem = None if _stat_key(self.old) == self.checked else "changed while this run worked"
        if self.kind == "folder":
            problem = problem or replaceable(self.old, "folder")
        if problem:
            rename_noreplace(self.old, t)
            raise PatcherError(t, f"{problem}; it was left untouched and nothing was written")
        try:
            rename_noreplace(self.tmp, t)
        except FileExistsError:
            remove(self.tmp)
            raise PatcherError(
                t,
                "was created while this run worked; left untouched, nothing was written "
                f"(the previous output is kept as {self.old.name})",
            ) from None
        remove(self.old)


def atomic_file(target) -> AtomicOutput:
    """`with atomic_file(path) as tmp:` write `tmp`; it is published at `path` when the block ends."""
    return AtomicOutput(target, "file")
