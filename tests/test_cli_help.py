"""``--help`` of every command shows the help of its positional arguments and its fixed choices;
a mistyped command is suggested once; ``-h``, ``--version`` and shell completion work.

The installed typer/click pair decides most of this (typer 0.20.1 with click 8.5 hid
positional help; with click 8.4 and typer's own suggestions on, "Did you mean" came twice),
so each command's help is read from a real ``fedpal`` process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib.metadata import version

import click
import pytest
import typer

from cli_helpers import fedpal, ok, user_error


def _commands() -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command and group under ``fedpal``, as (path, click command), found from the registered tree."""
    from fedpal.common import cli

    cli._register_commands()
    found = []

    def walk(path: tuple[str, ...], command: click.Command) -> None:
        found.append((path, command))
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                walk(path + (name,), sub)

    walk((), typer.main.get_command(cli.app))
    return found


COMMANDS = _commands()


def _flat(text: str) -> str:
    """Help text without rich's box characters and line wrapping."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "fedpal" for p, _ in COMMANDS])
def test_help_shows_every_argument_and_choice(path, command):
    shown = _flat(ok(fedpal(*path, "--help")).stdout)
    assert shown.startswith(f"Usage: {' '.join(('fedpal',) + path)}")
    for param in command.params:
        if isinstance(param, click.Argument):
            assert param.help, f"{' '.join(path)}: argument {param.name} has no help"
            assert _flat(param.help)[:60] in shown, f"{' '.join(path)}: help of {param.name} not shown"
        if isinstance(param.type, click.Choice):
            assert "|".join(param.type.choices) in shown, f"{' '.join(path)}: choices of {param.name} not listed"


def test_positional_arguments_of_the_commands_the_issue_names():
    assert "stated TEXT | pair PROMPT CHOSEN REJECTED" in _flat(ok(fedpal("memory", "add", "--help")).stdout)
    assert "'-' writes to standard output" in _flat(ok(fedpal("memory", "export", "-h")).stdout)
    assert "SuperLink connection name" in _flat(ok(fedpal("server", "run", "-h")).stdout)


@pytest.mark.parametrize("typo, meant", [(("trian",), "train"), (("memory", "lsit"), "list")])
def test_a_typo_is_suggested_once(typo, meant):
    line = user_error(fedpal(*typo), f"No such command '{typo[-1]}'")
    assert line.count("Did you mean") == 1 and f"'{meant}'" in line


def test_version_and_short_help():
    assert ok(fedpal("--version")).stdout.strip() == f"fedpal {version('fedpal')}"
    assert ok(fedpal("-h")).stdout == ok(fedpal("--help")).stdout
    assert "Show this message and exit" in ok(fedpal("generate", "-h")).stdout


@pytest.mark.skipif(shutil.which("fedpal") is None, reason="the fedpal command is not installed")
def test_shell_completion_script_and_answers():
    # the script `--install-completion` writes; asked for by name, since `--show-completion` guesses the
    # shell from the parent process (none under nohup or some CI runners)
    script = subprocess.run(
        ["fedpal"], capture_output=True, text=True, timeout=60, env={**os.environ, "_FEDPAL_COMPLETE": "source_bash"}
    )
    assert script.returncode == 0 and "_FEDPAL_COMPLETE" in script.stdout
    answer = subprocess.run(
        ["fedpal"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "_FEDPAL_COMPLETE": "complete_bash", "COMP_WORDS": "fedpal mem", "COMP_CWORD": "1"},
    )
    assert answer.returncode == 0 and "memory" in answer.stdout.split()
