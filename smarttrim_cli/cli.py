"""The ``smarttrim`` command line: a thin Typer layer; each command lives in ``commands/<name>.py``,
parses its options, calls the library and renders the result with rich."""
from __future__ import annotations

import functools
import os
import sys

import typer
from rich.console import Console

from .errors import SmartTrimError

# No network at run time: transformers/huggingface_hub must never try a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(name="smarttrim", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Make a fine-tuned vision-language model faster per input with SmartTrim "
                       "(adaptive token and attention-head trimming).")
console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn SmartTrimError into one red line on stderr and a non-zero exit, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SmartTrimError as e:
            err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130)
    return wrapper


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)):
    if version:
        from . import __version__
        console.print(f"smarttrim {__version__}")
        raise typer.Exit(0)


# Each command module registers itself on ``app`` when imported, so they are imported after ``app`` exists.
# Imported by name: a missing or renamed module fails at start-up instead of silently dropping its command.
from .commands import attach, compare, demo, export, finetune, profile  # noqa: E402,F401


def main():
    app(prog_name="smarttrim")


if __name__ == "__main__":
    # Run as `python -m smarttrim_cli.cli`, this file is a second module whose `app` holds no command (they
    # registered on the package's own): hand over to that one.
    from smarttrim_cli.cli import main as _package_main

    sys.exit(_package_main())
