"""The `patcher` command line (typer + rich). Every user-fixable problem is one line on stderr and exit
code 1; the input is never written. Each command lives in its own module and registers itself; heavy
libraries are imported inside command bodies, so start-up stays fast."""

import signal
import sys

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors click as typer._click; older typer uses click itself
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]  # older typer: click itself, the same API

from patcher import __version__
from patcher.cli import audit, convert, demo, diff, edit, extract, inspect, onnx, run, search, web
from patcher.cli.common import Interrupted, err, one_line

try:
    from typer.exceptions import Abort as _Abort
except ImportError:  # pragma: no cover - older typer: click's own
    _Abort = click.exceptions.Abort  # type: ignore[misc,attr-defined]  # older typer only


class _OneLineErrors(TyperGroup):
    """A wrong command line (unknown option, `--scale abc`) is one line on stderr, like every other
    user error, instead of click's boxed usage text: exit 1 (2 for `diff` and `audit`, whose 1 is a
    finding)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            empty = self.empty_path(argv)
            if empty:  # click would read "" as the path ".", the current folder
                raise click.ClickException(
                    f"{empty} is empty (an unset shell variable?); name a file or folder"
                )
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            rv = e.exit_code
        except click.ClickException as e:
            err.print(f"[bold red]error:[/] {one_line(e.format_message())}", highlight=False, soft_wrap=True)
            rv = 2 if argv[:1] in (["diff"], ["audit"]) else 1  # their 1 means "changed" / "edited"
        except _Abort:
            err.print("[bold red]interrupted:[/] nothing was written")
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def empty_path(self, argv: list[str]) -> str | None:
        """The option (or "an argument" for a positional) given an empty string where a path goes."""
        command = self.commands.get(argv[0]) if argv else None
        if command is None:
            return None
        # by click's own names: typer's vendored click has no Option or Path class to test against
        opts = [p for p in command.params if p.param_type_name == "option" and not getattr(p, "is_flag", 0)]
        paths = {o for p in opts if p.type.name == "path" for o in p.opts}
        takes_value = {o for p in opts for o in p.opts}
        before = None
        for a in argv[1:]:
            name, eq, value = a.partition("=")
            if eq and name in paths and not value:
                return name
            if a == "" and (before in paths or before not in takes_value):
                return before if before in paths else "an argument"
            before = a
        return None


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Edit transformer checkpoints along residual-stream directions, streaming, without PyTorch.",
)

# help lists commands in this order
COMMANDS = (inspect, extract, edit, search, onnx, convert, run, diff, audit, demo, web)
for command in COMMANDS:
    command.register(app)


def _print_version(value: bool):
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    _version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the patcher version and exit"
    ),
):
    """Edit transformer checkpoints along residual-stream directions, streaming, without PyTorch."""


@app.command()
def version():
    """Print the patcher version."""
    print(__version__)


def _interrupt(_signum, _frame):
    raise Interrupted


def main():
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except Interrupted:
        err.print("[bold red]interrupted[/]")
        sys.exit(130)
