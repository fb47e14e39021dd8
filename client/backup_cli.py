"""``fedpal backup`` and ``fedpal restore``: one encrypted file holding a user's whole home.

Both use the memory's passphrase, so the restored memory opens as it did; a memory whose
key is in the OS keyring cannot travel this way (the key stays in this machine's keyring).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from fedpal.client.cli_common import PASSPHRASE_FILE, check_output_file, home_option, read_passphrase
from fedpal.common.errors import FedpalError

AS_JSON = typer.Option(False, "--json", help='Print {"file", "files", "memory", "bytes"}.')


def backup(
    file: Path = typer.Argument(..., help="The backup file to write (encrypted, mode 0600)."),
    home: str = home_option("The home to back up (memory, adapters, export record)."),
    force: bool = typer.Option(False, "--force", help="Replace FILE if it exists."),
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = AS_JSON,
) -> None:
    """Write an encrypted backup of a home, sealed with the memory's passphrase."""
    from fedpal.client.backup import write_backup
    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PASSPHRASE_ENV, PreferenceMemory

    client = ClientHome.existing(home)
    check_output_file(file, force, "fedpal-home.backup")
    source = PreferenceMemory.key_source(client.root)
    if source == "keyring":
        raise FedpalError(
            "this memory's key lives in the OS keyring, which a backup cannot carry; "
            "export the records instead (fedpal memory export)"
        )
    passphrase = read_passphrase(os.environ.get(PASSPHRASE_ENV), passphrase_file, ask=True, confirm=source is None)
    if passphrase is None:
        raise FedpalError(
            f"a backup is sealed with the memory passphrase: set {PASSPHRASE_ENV} or give --passphrase-file FILE"
        )
    if source == "passphrase":
        with PreferenceMemory.open(client.root, passphrase):
            pass  # the passphrase that will open the restored memory must be this one
    summary = write_backup(client, file, passphrase)
    _report(summary, as_json, f"backed up {summary.files} file(s) of {client.root} to {file}")


def restore(
    file: Path = typer.Argument(..., help="A file written by `fedpal backup`."),
    home: str = home_option("The new home to restore into (must not exist, or be an empty folder)."),
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = AS_JSON,
) -> None:
    """Restore a backup into a new home (never over an existing one)."""
    from fedpal.client.backup import restore_backup
    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PASSPHRASE_ENV

    if not file.is_file():
        raise FedpalError(f"cannot read {file}: no such file")
    target = ClientHome.planned(home)
    passphrase = read_passphrase(os.environ.get(PASSPHRASE_ENV), passphrase_file, ask=True)
    if passphrase is None:
        raise FedpalError(
            f"the backup opens with the memory passphrase: set {PASSPHRASE_ENV} or give --passphrase-file FILE"
        )
    summary = restore_backup(file, target, passphrase)
    _report(summary, as_json, f"restored {summary.files} file(s) into the new home {target.root}")


def _report(summary, as_json: bool, line: str) -> None:
    if as_json:
        typer.echo(
            json.dumps({"file": summary.file, "files": summary.files, "memory": summary.memory, "bytes": summary.bytes})
        )
    else:
        typer.echo(line)
