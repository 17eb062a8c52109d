"""What every command shares: the consoles, the one-line error guard, model opening, sizes.
Kept light (no numpy at import): `patcher --version` and `--help` import this module."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

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
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def open_model(model, arch_table: Optional[Path], need_arch: bool = True) -> "Model":
    """A MODEL argument (folder, .safetensors file or hub repo id) opened once, table resolved."""
    from patcher.model.opened import Model
    return Model.open(model, arch_table, require_arch=need_arch)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Not a KeyboardInterrupt, which click turns into 'Aborted!' and exit 1 when
    it lands outside a command body: this one always ends in cleanup and exit 130."""


def guard(fn):
    """Run a command body: PatcherError -> one line + exit 1; Ctrl-C -> exit 130, nothing left."""
    try:
        return fn()
    except PatcherError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except (KeyboardInterrupt, Interrupted):
        err.print("[bold red]interrupted:[/] no output was written (partial files removed)")
        raise typer.Exit(130)
    except OSError as e:
        err.print(f"[bold red]error:[/] {e.filename or ''}: {e.strerror or e}", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1)


def progress():
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)


def command_line() -> str:
    import shlex
    return shlex.join(["patcher", *sys.argv[1:]])
