"""The ``fedpal`` command.

Sub-commands live next to the code they drive (``fedpal.client``, ``fedpal.server``,
``fedpal.simulations``) and are found through the ``fedpal.commands`` entry-point group,
so that ``fedpal.common`` never imports the packages built on top of it.

Every mistake a user can fix ends the same way, whoever notices it: a ``FedpalError``
from fedpal's own checks, a usage error from click's parser (an unknown option, a value
outside its choices), or an operating-system refusal (a file where a folder should be,
no permission) is printed as ONE line starting with ``error:`` on stderr, and the exit
status is 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import warnings
from importlib.metadata import PackageNotFoundError, entry_points, version

import click
import typer

from fedpal.common.errors import FedpalError

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="fedpal",
    help="Federated on-device personalization of small language models.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    # click >= 8.4 suggests close command names itself; typer's own suggestion would repeat it.
    suggest_commands=False,
)


def fedpal_version() -> str:
    """The installed package's version (a source tree that was never installed says so)."""
    try:
        return version("fedpal")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fedpal {fedpal_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print fedpal's version and exit."
    ),
) -> None:
    """Federated on-device personalization of small language models."""


def _register_commands() -> None:
    for entry in sorted(entry_points(group="fedpal.commands"), key=lambda e: e.name):
        if any(command.name == entry.name for command in app.registered_commands) or any(
            group.name == entry.name for group in app.registered_groups
        ):
            continue  # registered by an earlier call (tests call this more than once)
        target = entry.load()
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=entry.name)
        else:
            app.command(entry.name)(target)


def one_line(message: str) -> str:
    """``message`` on a single line (a wrapped library message must not look like two errors)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _usage_message(err: click.UsageError) -> str:
    ctx = err.ctx
    hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return one_line(err.format_message()) + hint


def _os_message(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where}"


def main() -> None:
    """Run the CLI: user errors of any origin become one ``error:`` line on stderr and exit status 2."""
    # Libraries' notices of their own future changes (transformers, torch) are not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    _register_commands()
    try:
        code = app(prog_name="fedpal", standalone_mode=False)
    except FedpalError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError:
        sys.exit(2)  # typer has printed the help already
    except click.UsageError as err:
        print(f"error: {_usage_message(err)}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as err:
        print(f"error: {one_line(err.format_message())}", file=sys.stderr)
        sys.exit(2)
    except click.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except OSError as err:
        print(f"error: {one_line(_os_message(err))}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
