"""The `patcher` command line (typer + rich). Every user-fixable problem is one line on stderr and exit
code 1; the input is never written. Each command lives in its own module and registers itself; heavy
libraries are imported inside command bodies, so start-up stays fast."""
import signal
import sys

import typer

from patcher import __version__
from patcher.cli import audit, demo, diff, edit, extract, inspect, onnx, run
from patcher.cli.common import Interrupted, err

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Edit transformer checkpoints along residual-stream directions, streaming, without "
                  "PyTorch.")

COMMANDS = (inspect, extract, edit, onnx, run, diff, audit, demo)  # help lists commands in this order
for command in COMMANDS:
    command.register(app)


def _print_version(value: bool):
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                        help="Print the patcher version and exit")):
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
