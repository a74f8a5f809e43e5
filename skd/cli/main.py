"""The console scripts `skd-cache` and `skd-train`: run a command, show usage mistakes and warnings
as one line.

The commands themselves are in cache_commands (build, info, stats, verify, codecs, recode) and
train_command.
"""

from __future__ import annotations

import sys
import warnings

import click

from skd.cli.cache_commands import cache
from skd.cli.train_command import train
from skd.errors import SkdWarning, raise_on_sigterm


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """skd's warnings as one `warning:` line (others as Python prints them); the signature of
    warnings.showwarning."""
    if issubclass(category, SkdWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        click.echo(
            warnings.formatwarning(message, category, filename, lineno, line).rstrip(), err=True
        )


def run_command(command: click.Command, prog_name: str) -> None:
    """Run a click command; a usage mistake is one `error:` line naming the option and where help
    is; SIGTERM stops the command as Ctrl-C does (one line saying how to continue), with exit status
    143."""
    warnings.showwarning = show_warning
    raise_on_sigterm()
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # the group's help, not a mistake
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else prog_name
        click.echo(f"error: {exc.format_message().rstrip('.')} (see {where} --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)


def main_cache():
    """The `skd-cache` console script."""
    run_command(cache, "skd-cache")


def main_train():
    """The `skd-train` console script."""
    run_command(train, "skd-train")


if __name__ == "__main__":
    main_cache()
