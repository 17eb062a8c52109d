"""`patcher diff`: audit a checkpoint against its trusted base."""
from pathlib import Path
from typing import Optional

import typer

from patcher.errors import PatcherError
from patcher.io.jsonsafe import dumps
from patcher.cli.common import guard, out


def _save_npy(path: Path, arr) -> None:
    """Atomic: a hidden partial file renamed into place (np.save would append .npy to other names)."""
    import numpy as np
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
                                                               help="Custom architecture table (TOML)"),
                     force: bool = typer.Option(False, "--force",
                                                help="Replace --save-direction's file if patcher wrote it")):
        """Which tensors changed, how (relative size, rank), and the direction a rank-1 edit removed.
        Exit code 0 unchanged, 1 changed, 2 error."""
        def body():
            from patcher.edit.diff import diff, print_report
            from patcher.edit.directions import spec_file
            from patcher.io.paths import check_output
            import numpy as np
            if save_direction is not None:
                if save_direction.suffix != ".npy":
                    raise PatcherError(save_direction, "--save-direction writes a .npy file (name it "
                                       "FILE.npy)")
                check_output(save_direction, [base, candidate, spec_file(direction), arch_table], force=force,
                             kind="file", option="--save-direction")
            rep = diff(base, candidate, direction, arch_table)
            if save_direction is not None:
                if rep.direction is not None:
                    _save_npy(save_direction, rep.direction.astype(np.float32))
                    rep.notes.append(f"recovered direction written to {save_direction}")
                else:
                    rep.notes.append("no direction was recovered: nothing written to --save-direction")
            if as_json:
                print(dumps(rep.to_json(), indent=2))
            else:
                print_report(rep, out)
            raise typer.Exit(1 if rep.changed else 0)
        guard(body, interrupted="nothing was written", code=2)  # exit 1 means a finding
