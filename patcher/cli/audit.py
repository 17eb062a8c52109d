"""`patcher audit`: signs of an edit in a checkpoint alone, without its base."""

from pathlib import Path
from typing import Optional

import typer

from patcher.errors import PatcherError
from patcher.cli.common import ARCH_TABLE_HELP, guard, out
from patcher.io.jsonsafe import dumps

_SUFFIXES = {"--save-direction": ".npy", "--plot": ".svg"}


def _check_output(option: str, path: Optional[Path], model: Path, inputs: list, force: bool) -> None:
    from patcher.io.paths import check_output
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
    check_output(path, inputs, force=force, kind="file", option=option)


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
        force: bool = typer.Option(False, "--force", help="Replace --save-direction/--plot files patcher "
                                   "wrote"),
    ):
        """Look for directions the writers cannot write and for baked biases, with no base model.
        Exit code 0 no sign of an edit, 1 signs of one, 2 error."""
        def body():
            import numpy as np
            from patcher.edit.audit import audit, plot as write_plot, print_report

            from patcher.cli.diff import _save_npy
            from patcher.io.paths import check_distinct
            for option, path in (("--save-direction", save_direction), ("--plot", plot)):
                _check_output(option, path, model, [model, arch_table], force)
            check_distinct({"--save-direction": save_direction, "--plot": plot})
            rep = audit(model, arch_table)
            if save_direction is not None:
                if rep.direction is not None:
                    _save_npy(save_direction, np.asarray(rep.direction, dtype=np.float32))
                    rep.notes.append(f"recovered direction written to {save_direction}")
                else:
                    rep.notes.append("no direction was recovered: nothing written to --save-direction")
            if plot is not None:
                write_plot(rep, plot)
                rep.notes.append(f"plot written to {plot}")
            if as_json:
                print(dumps(rep.to_json(), indent=2))
            else:
                print_report(rep, out)
            raise typer.Exit(1 if rep.edited else 0)
        guard(body, interrupted="nothing was written", code=2)  # exit 1 means a finding
