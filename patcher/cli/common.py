"""What every command shares: the consoles, the one-line error guard, model opening, sizes.
Kept light (no numpy at import): `patcher --version` and `--help` import this module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from patcher.errors import PatcherError

if TYPE_CHECKING:
    from patcher.model.opened import Model

# piped output (scripts, CI logs) gets wide lines so tensor names are never cut
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

DIRECTION_HELP = "FILE.npy, or FILE.safetensors[:LAYER] from `patcher extract`"
ARCH_TABLE_HELP = "Custom architecture table (TOML)"
DIRECTION_HELP_SHORT = "Direction to measure per layer: " + DIRECTION_HELP


def human(n: float) -> str:
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def open_model(model, arch_table: Path | None, need_arch: bool = True) -> Model:
    """A MODEL argument (folder, .safetensors file or hub repo id) opened once, table resolved."""
    from patcher.model.opened import Model

    return Model.open(model, arch_table, require_arch=need_arch)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Not a KeyboardInterrupt, which click turns into 'Aborted!' and exit 1 when
    it lands outside a command body: this one always ends in cleanup and exit 130."""


INTERRUPTED = "no output was written (partial files removed)"


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def one_line(text: object) -> str:
    """Messages are one line: a newline in a file name or an error text must not split them."""
    from rich.markup import escape

    return escape(" ".join(str(text).split("\n")))  # a file named "[red]x" is not markup


class _numeric_warnings_as_notes:
    """numpy's RuntimeWarnings (overflow, invalid value) become one "note:" line each, once, when the
    command succeeds, instead of raw warning text with source lines; other warnings pass through."""

    def __enter__(self):
        import warnings

        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("default")
        return self

    def __exit__(self, exc_type, exc, tb):
        import warnings

        self.caught.__exit__(exc_type, exc, tb)
        seen = set()
        for w in self.records:
            if not issubclass(w.category, RuntimeWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif exc_type is None and str(w.message) not in seen:
                seen.add(str(w.message))
                err.print(
                    f"[yellow]note:[/] numeric warning: {one_line(w.message)} (some values may be "
                    "inf or NaN)",
                    highlight=False,
                )
        return False


def guard(fn, interrupted: str = INTERRUPTED, code: int = 1):
    """Run a command body: PatcherError -> one line + exit `code`; Ctrl-C -> exit 130, nothing left
    (`interrupted` says truthfully what is kept); anything unexpected is one line too (set
    PATCHER_DEBUG=1 for the traceback)."""
    import os

    try:
        with _numeric_warnings_as_notes():
            return fn()
    except typer.Exit:
        raise
    except PatcherError as e:
        text = escape_markup(str(e)) if e.lines else one_line(e)
        err.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
    except (KeyboardInterrupt, Interrupted):
        err.print(f"[bold red]interrupted:[/] {interrupted}")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `patcher diff ... | head`: the reader left; nothing to say to it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        raise typer.Exit(141) from None  # 128 + SIGPIPE, as the shell reports it
    except OSError as e:
        where = f"{one_line(e.filename)}: " if e.filename else ""
        err.print(f"[bold red]error:[/] {where}{one_line(e.strerror or e)}", highlight=False, soft_wrap=True)
    except MemoryError:
        err.print("[bold red]error:[/] out of memory (try a smaller --batch-size or shorter prompts)")
    except Exception as e:
        if os.environ.get("PATCHER_DEBUG"):
            raise
        err.print(
            f"[bold red]error:[/] internal error: {type(e).__name__}: {one_line(e)} (please report it; "
            "PATCHER_DEBUG=1 shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(code)


PLAIN_PROGRESS_SECONDS = 10.0  # without a terminal (logs, CI): one progress line this often


class PlainProgress:
    """Progress for a run whose stderr is not a terminal (the bar is hidden there): every
    PLAIN_PROGRESS_SECONDS one line with the count, the total and an estimate of the time left."""

    def __init__(self, what: str, total: int | None):
        import time

        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        import time

        self.done += n
        now = time.monotonic()
        if err.is_terminal or now - self.last < PLAIN_PROGRESS_SECONDS:
            return
        self.last = now
        left = ""
        if self.total:
            minutes = (self.total - self.done) / max(self.done, 1) * (now - self.start) / 60
            left = f" of {self.total} ({100 * self.done / self.total:.0f} %), ~{minutes:.0f} min left"
        err.print(f"{self.what}: {round(self.done)}{left}", highlight=False)


def progress():
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def command_line() -> str:
    import shlex

    return shlex.join(["patcher", *sys.argv[1:]])


def check_report_file(
    option: str, path: Path | None, suffix: str, models: list, inputs: list, force: bool
) -> None:
    """A file that `diff` or `audit` writes beside its report: not inside any model's folder (hub ids
    resolved first, so their cache entries count too), the common output rule, then the right suffix."""
    if path is None:
        return
    from patcher.io.hub import locate
    from patcher.io.paths import check_output

    target, resolved = path.resolve(), []
    for model in models:
        local, extra = locate(model)
        if any(p.resolve() == target or p.resolve() in target.parents for p in (local, *extra)):
            raise PatcherError(option, f"{path} is inside the model {model}; write it elsewhere")
        resolved += [local, *extra]
    check_output(path, [*resolved, *inputs], force=force, kind="file", option=option)
    if path.suffix != suffix:  # after the path itself is known to be sane ("" reads as ".")
        raise PatcherError(option, f"{path}: must end in {suffix}")


def save_direction(rep, path: Path | None) -> None:
    """Write a report's recovered direction (unit, float32) to `path` atomically and say so in its notes:
    a hidden partial file renamed into place (np.save would append .npy to other names)."""
    if path is None:
        return
    if rep.direction is None:
        rep.notes.append("no direction was recovered: nothing written to --save-direction")
        return
    import numpy as np

    from patcher.io.atomic import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(rep.direction, dtype=np.float32))
    rep.notes.append(f"recovered direction written to {path}")
