"""What every command shares: the consoles, the one-line error guard, model opening, sizes."""
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from patcher.errors import PatcherError
from patcher.io.checkpoint import Checkpoint
from patcher.model.architectures import Resolved, for_model_type, load_table, resolve

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


def open_model(model: Path, arch_table: Optional[Path], need_arch: bool = True) -> tuple[Checkpoint, Optional[Resolved]]:
    from patcher.io.gguf import is_gguf
    if Path(model).is_file() and is_gguf(model):
        return open_gguf(model, arch_table)
    ck = Checkpoint(model)
    if not need_arch and arch_table is None and not ck.model_type:
        return ck, None
    if not ck.config and ck.path.is_file():
        raise PatcherError(model, "editing needs a model folder with config.json, not a lone .safetensors file")
    arch = load_table(arch_table) if arch_table else for_model_type(ck.model_type, ck.folder / "config.json")
    return ck, resolve(arch, ck.tensors, ck.config, ck.folder / "config.json")


def open_gguf(model: Path, arch_table: Optional[Path]):
    """A GGUF file and the table resolved against its own (GGUF) tensor names."""
    from patcher.io.gguf import GGUFFile
    g = GGUFFile(model)
    arch = load_table(arch_table) if arch_table else g.architecture
    if arch.gguf is None:
        raise PatcherError(arch.source, "this architecture table has no [gguf] section (GGUF names)")
    return g, resolve(arch.gguf, g.tensors, g.config, g.path)


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
        err.print(f"[bold red]error:[/] {e.filename or ''}: {e.strerror or e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def progress():
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)


def command_line() -> str:
    import shlex
    return shlex.join(["patcher", *sys.argv[1:]])
