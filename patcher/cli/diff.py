"""`patcher diff`: audit a checkpoint against its trusted base."""

from pathlib import Path

import typer

from patcher.cli.common import check_report_file, guard, out
from patcher.cli.common import save_direction as save
from patcher.io.jsonsafe import dumps


def register(app) -> None:
    """Add `patcher diff` to the CLI. Exit codes 0 unchanged, 1 changed: errors are 2 (guard's code),
    so scripts can tell them apart."""

    @app.command("diff")
    def diff_command(
        base: Path = typer.Argument(..., help="Trusted base model folder"),
        candidate: Path = typer.Argument(..., help="Model folder to audit against it"),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
        direction: str | None = typer.Option(
            None,
            "-d",
            "--direction",
            help="Known direction to compare with: FILE.npy or FILE.safetensors[:LAYER]",
        ),
        save_direction: Path | None = typer.Option(
            None, "--save-direction", help="Write the recovered direction (unit, float32) to FILE.npy"
        ),
        arch_table: Path | None = typer.Option(None, "--arch-table", help="Custom architecture table (TOML)"),
        force: bool = typer.Option(
            False, "--force", help="Replace --save-direction's file if patcher wrote it"
        ),
    ):
        """Which tensors changed, how (relative size, rank), and the direction a rank-1 edit removed.
        Exit code 0 unchanged, 1 changed, 2 error."""

        def body():
            from patcher.edit.diff import diff, print_report
            from patcher.edit.directions import spec_file

            check_report_file(
                "--save-direction",
                save_direction,
                ".npy",
                [base, candidate],
                [spec_file(direction), arch_table],
                force,
            )
            rep = diff(base, candidate, direction, arch_table)
            save(rep, save_direction)
            if as_json:
                print(dumps(rep.to_json(), indent=2))
            else:
                print_report(rep, out)
            raise typer.Exit(1 if rep.changed else 0)

        guard(body, interrupted="nothing was written", code=2)  # exit 1 means a finding
