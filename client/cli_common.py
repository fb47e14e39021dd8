"""What the client's commands share: the ``--home`` and passphrase options, and fixed choices.

The home can come from ``FEDPAL_USER_HOME`` so it need not be typed each time; the
memory passphrase from ``FEDPAL_PASSPHRASE``, a file (``--passphrase-file``, ``-`` for
standard input: nothing on the command line, where other users' ``ps`` can see it) or,
in a terminal, a hidden prompt.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import TypeVar

import typer

from fedpal.client.home import HOME_ENV
from fedpal.common.errors import FedpalError

PASSPHRASE_FILE_ENV = "FEDPAL_PASSPHRASE_FILE"

E = TypeVar("E", bound=Enum)


def home_option(help: str) -> typer.models.OptionInfo:
    """``--home``, required unless ``FEDPAL_USER_HOME`` is set (a string: an empty value must be seen, not read as
    '.')."""
    return typer.Option(..., "--home", envvar=HOME_ENV, show_envvar=True, help=help)


PASSPHRASE_FILE = typer.Option(
    None,
    "--passphrase-file",
    envvar=PASSPHRASE_FILE_ENV,
    show_envvar=True,
    help="Read the memory passphrase from the first line of this file ('-': standard input).",
)


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A string Enum of ``values``: typer turns it into a fixed choice that ``--help`` lists and the parser checks."""
    return Enum(name, {value: value for value in values}, type=str)


def plain(value: object) -> object:
    """The string behind a choice (commands are also called from Python with plain strings)."""
    return value.value if isinstance(value, Enum) else value


def read_passphrase(
    passphrase: str | None,
    passphrase_file: str | None,
    *,
    ask: bool,
    confirm: bool = False,
    stdin_free: bool = True,
) -> str | None:
    """The passphrase from the file, else ``passphrase`` (option or environment), else a hidden prompt.

    ``ask``: prompt when stdin is a terminal and nothing else gave one; ``confirm``: ask
    twice (a new memory). ``stdin_free``: False where standard input carries something
    else (chat's conversation), so ``-`` is refused. None means no passphrase was given;
    the memory says what it needs if it needs one.
    """
    if passphrase_file is not None:
        if passphrase_file == "-":
            if not stdin_free:
                raise FedpalError("standard input is the conversation here; give --passphrase-file a file")
            text = sys.stdin.readline()
            where = "standard input"
        else:
            path = Path(passphrase_file).expanduser()
            try:
                text = path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError:
                raise FedpalError(f"the passphrase file {path} is not UTF-8 text") from None
            except OSError as err:
                raise FedpalError(f"cannot read the passphrase file {path}: {err.strerror}") from None
            where = str(path)
        line = text.split("\n", 1)[0].rstrip("\r")
        if not line:
            raise FedpalError(f"no passphrase in {where}: its first line is empty")
        return line
    if passphrase == "":
        raise FedpalError("the memory passphrase must not be empty")
    if passphrase is not None:
        return passphrase
    if ask and sys.stdin.isatty():
        return typer.prompt("Memory passphrase", hide_input=True, confirmation_prompt=confirm)
    return None


def check_output_file(path: Path, force: bool, example_name: str, shown: str | None = None) -> None:
    """Refuse to write ``path`` where that would fail or silently replace a file: a folder, a
    missing parent folder, or an existing file without ``force`` (asked in a terminal)."""
    shown = shown or str(path)
    if shown.endswith(("/", os.sep)) or path.is_dir():
        raise FedpalError(f"{shown} is a folder: name the file to write, e.g. {path / example_name}")
    if not path.parent.is_dir():
        raise FedpalError(f"cannot write {shown}: folder {path.parent} does not exist")
    if path.exists() and not force:
        if not sys.stdin.isatty():
            raise FedpalError(f"{shown} exists; add --force to replace it")
        typer.confirm(f"{shown} exists. Replace it?", abort=True)
