"""`patcher audit`: signs of an edit in a checkpoint alone, without its base."""

from pathlib import Path

import typer

from patcher.cli.common import ARCH_TABLE_HELP, check_report_file, guard, out
from patcher.cli.common import save_direction as save
from patcher.io.jsonsafe import dumps

EXIT_CODES = {"no sign": 0, "abliterated": 1, "inconclusive": 3}


def register(app) -> None:
    @app.command("audit")
    def audit_command(
        model: Path = typer.Argument(..., help="Model folder to audit (no base needed)"),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
        save_direction: Path | None = typer.Option(
            None, "--save-direction", help="Write the recovered direction(s) to FILE.npy"
        ),
        plot: Path | None = typer.Option(None, "--plot", help="Write the spectrum plot (.svg)"),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
        force: bool = typer.Option(
            False, "--force", help="Replace --save-direction/--plot files patcher wrote"
        ),
    ):
        """Look for directions the writers cannot write and for baked biases, with no base model.
        Exit code 0 no sign of an edit, 1 abliterated (or a baked bias), 2 error, 3 inconclusive."""

        def body():
            from patcher.edit.audit import audit, print_report
            from patcher.edit.audit import plot as write_plot
            from patcher.io.paths import check_distinct

            for option, path, suffix in (
                ("--save-direction", save_direction, ".npy"),
                ("--plot", plot, ".svg"),
            ):
                check_report_file(option, path, suffix, [model], [arch_table], force)
            check_distinct({"--save-direction": save_direction, "--plot": plot})
            rep = audit(model, arch_table)
            save(rep, save_direction)
            if plot is not None:
                write_plot(rep, plot)
                rep.notes.append(f"plot written to {plot}")
            if as_json:
                print(dumps(rep.to_json(), indent=2))
            else:
                print_report(rep, out)
            raise typer.Exit(EXIT_CODES[rep.level])

        guard(body, interrupted="nothing was written", code=2)  # exit 1 means a finding
