"""`patcher audit`: signs of an edit in a checkpoint alone, without its base."""

import json
from pathlib import Path
from typing import Optional

import typer

from patcher.errors import PatcherError
from patcher.cli.common import ARCH_TABLE_HELP, err, out

_SUFFIXES = {"--save-direction": ".npy", "--plot": ".svg"}


def _check_output(option: str, path: Optional[Path], model: Path) -> None:
    if path is None:
        return
    if path.suffix != _SUFFIXES[option]:
        raise PatcherError(option, f"{path}: must end in {_SUFFIXES[option]}")
    from patcher.io.hub import locate
    model, extra = locate(model)
    folder = model if model.is_dir() else model.parent
    target = path.resolve()
    inside = any(p.resolve() == target or p.resolve() in target.parents for p in extra)
    if inside or target == model.resolve() or folder.resolve() in target.parents:
        raise PatcherError(option, f"{path} is inside the audited model; write it elsewhere")


def register(app) -> None:
    @app.command("audit")
    def audit_command(
        model: Path = typer.Argument(..., help="Model folder to audit (no base needed)"),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
        save_direction: Optional[Path] = typer.Option(
            None, "--save-direction", help="Write the recovered direction(s) to FILE.npy"
        ),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write the spectrum plot (.svg)"),
        arch_table: Optional[Path] = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
    ):
        """Look for directions the writers cannot write and for baked biases, with no base model.
        Exit code 0 no sign of an edit, 1 signs of one, 2 error."""
        try:
            import numpy as np
            from patcher.edit.audit import audit, plot as write_plot, print_report

            for option, path in (("--save-direction", save_direction), ("--plot", plot)):
                _check_output(option, path, model)
            rep = audit(model, arch_table)
            if save_direction is not None:
                if rep.direction is not None:
                    np.save(save_direction, np.asarray(rep.direction, dtype=np.float32))
                    rep.notes.append(f"recovered direction written to {save_direction}")
                else:
                    rep.notes.append("no direction was recovered: nothing written to --save-direction")
            if plot is not None:
                write_plot(rep, plot)
                rep.notes.append(f"plot written to {plot}")
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130)
        except PatcherError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except OSError as e:
            err.print(
                f"[bold red]error:[/] {e.filename or ''}: {e.strerror or e}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2)
        if as_json:
            print(json.dumps(rep.to_json(), indent=2))
        else:
            print_report(rep, out)
        raise typer.Exit(1 if rep.edited else 0)
