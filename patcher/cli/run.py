"""`patcher run`: recipes."""

from pathlib import Path

import typer

from patcher.cli.common import err, guard, human, out


def register(app) -> None:
    @app.command("run")
    def run_recipe(
        recipe: Path = typer.Argument(..., help="Recipe TOML: [[model]] tables and [[step]] tables"),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Validate and print the whole plan, write nothing"
        ),
        jobs: int = typer.Option(1, "--jobs", min=1, help="Models run in N processes (same results as 1)"),
    ):
        """Run a batch of edits (extract, ablate, inject, export, verify) over one or more models."""

        def body():
            from rich.table import Table

            from patcher.pipelines import recipe as rc

            plans = rc.validate(rc.load(recipe))
            if dry_run:
                total = 0
                for row in rc.describe(plans):
                    out.print(
                        f"[bold]{row['model']}[/] step {row['step']} {row['op']}: {row['input']} -> "
                        f"{row['output']}",
                        highlight=False,
                    )
                    for name, formula, nbytes in row["tensors"]:
                        out.print(f"    {name}  {formula}  {human(nbytes)}", highlight=False)
                    total += row["bytes"]
                out.print(
                    f"dry run: {sum(len(p.actions) for p in plans)} steps over {len(plans)} model(s), "
                    f"{human(total)} of tensors rewritten; nothing written"
                )
                return
            with err.status(f"running {recipe} ({len(plans)} model(s), jobs={jobs})"):
                results = rc.run(plans, str(recipe), jobs=jobs)
            t = Table(title=f"recipe {recipe}", title_justify="left")
            for col in ("model", "step", "op", "result"):
                t.add_column(col)
            for name, rows in results.items():
                for index, op, summary in rows:
                    t.add_row(name, str(index), op, summary)
            out.print(t)

        guard(
            body,
            interrupted="finished steps are kept (a re-run resumes after them); the step in "
            "progress was removed",
        )
