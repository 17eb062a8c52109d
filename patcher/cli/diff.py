"""`patcher diff`: audit a checkpoint against its trusted base."""
import json
from pathlib import Path
from typing import Optional

import typer

from patcher.errors import PatcherError
from patcher.cli.common import err, out


def register(app) -> None:
    """Add `patcher diff` to the CLI. `guard` (exit 1 on errors) is not used: diff's exit codes are
    0 unchanged, 1 changed, so an error must be 2 for scripts to tell them apart."""
    @app.command("diff")
    def diff_command(base: Path = typer.Argument(..., help="Trusted base model folder"),
                     candidate: Path = typer.Argument(..., help="Model folder to audit against it"),
                     as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
                     direction: Optional[str] = typer.Option(None, "-d", "--direction",
                         help="Known direction to compare with: FILE.npy or FILE.safetensors[:LAYER]"),
                     save_direction: Optional[Path] = typer.Option(None, "--save-direction",
                         help="Write the recovered direction (unit, float32) to FILE.npy"),
                     arch_table: Optional[Path] = typer.Option(None, "--arch-table",
                                                               help="Custom architecture table (TOML)")):
        """Which tensors changed, how (relative size, rank), and the direction a rank-1 edit removed.
        Exit code 0 unchanged, 1 changed, 2 error."""
        try:
            from patcher.edit.diff import diff, print_report
            import numpy as np
            rep = diff(base, candidate, direction, arch_table)
            if save_direction is not None:
                if rep.direction is not None:
                    np.save(save_direction, rep.direction.astype(np.float32))
                    rep.notes.append(f"recovered direction written to {save_direction}")
                else:
                    rep.notes.append("no direction was recovered: nothing written to --save-direction")
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130)
        except PatcherError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except OSError as e:
            err.print(f"[bold red]error:[/] {e.filename or ''}: {e.strerror or e}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(2)
        except Exception as e:  # noqa: BLE001 — exit 1 means "changed": a crash must never look like that
            err.print(f"[bold red]error:[/] internal error: {type(e).__name__}: {e}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(2)
        if as_json:
            print(json.dumps(rep.to_json(), indent=2))
        else:
            print_report(rep, out)
        raise typer.Exit(1 if rep.changed else 0)
