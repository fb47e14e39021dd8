"""The ``fedpal`` command.

Sub-commands live next to the code they drive (``fedpal.client``, ``fedpal.server``,
``fedpal.simulations``) and are found through the ``fedpal.commands`` entry-point group,
so that ``fedpal.common`` never imports the packages built on top of it.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

from fedpal.common.errors import FedpalError

app = typer.Typer(
    name="fedpal",
    help="Federated on-device personalization of small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    for entry in sorted(entry_points(group="fedpal.commands"), key=lambda e: e.name):
        target = entry.load()
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=entry.name)
        else:
            app.command(entry.name)(target)


def main() -> None:
    """Run the CLI; a ``FedpalError`` becomes one line on stderr and exit status 2."""
    _register_commands()
    try:
        app()
    except FedpalError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
