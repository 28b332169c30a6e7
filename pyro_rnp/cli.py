"""Running click commands the way users expect: one-line errors, no tracebacks, honest exit codes."""
from __future__ import annotations

import sys

import click

from .data import DataError
from .runs import RunError


class TrainingError(Exception):
    """Training cannot go on (for example it diverged); str(e) says what happened and what to do."""


def run(command: click.Command, args=None) -> None:
    """Invoke ``command``; usage errors and known failures print one line to stderr."""
    prog = f"python -m {command.name}"
    try:
        command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"{prog}: error: {e.format_message()} (see --help)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"{prog}: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (DataError, RunError, TrainingError) as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
