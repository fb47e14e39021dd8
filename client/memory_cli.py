"""``fedpal memory``: look after one user's encrypted preference memory from the shell.

The passphrase comes from ``FEDPAL_PASSPHRASE`` or, in a terminal, a hidden prompt;
``--keyring`` creates a memory whose key lives in the OS keyring instead.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedpal.common.errors import FedpalError

if TYPE_CHECKING:
    from fedpal.client.memory import PreferenceMemory, Record

app = typer.Typer(help="The encrypted preference memory of one user.", no_args_is_help=True)

HOME = typer.Option(..., "--home", help="The client's home folder (holds memory.sqlite).")
KEYRING = typer.Option(False, "--keyring", help="When creating the memory, keep its key in the OS keyring.")
AS_JSON = typer.Option(False, "--json", help="Print a JSON array of records.")
ADD_USAGE = {
    "stated": ("TEXT",),
    "pair": ("PROMPT", "CHOSEN", "REJECTED"),
    "rating": ("PROMPT", "RESPONSE", "SCORE"),
    "edit": ("PROMPT", "RESPONSE", "EDITED"),
    "turn": ("ROLE", "TEXT"),
}


@contextmanager
def _memory(home: Path, *, create: bool = False, keyring: bool = False) -> Iterator["PreferenceMemory"]:
    """Open the memory, asking for the passphrase only when needed; warnings become one line each."""
    from fedpal.client.memory import PASSPHRASE_ENV, PreferenceMemory

    source = PreferenceMemory.key_source(home)
    if source is None and not create:
        raise FedpalError(f"no preference memory in {home} yet; create one with `fedpal memory add` or `import`")
    passphrase = None
    needs_passphrase = source == "passphrase" or (source is None and not keyring)
    if needs_passphrase and not os.environ.get(PASSPHRASE_ENV) and sys.stdin.isatty():
        passphrase = typer.prompt("Memory passphrase", hide_input=True, confirmation_prompt=source is None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with PreferenceMemory.open(home, passphrase, use_keyring=keyring) as memory:
                yield memory
        finally:
            for warning in caught:
                typer.echo(f"warning: {warning.message}", err=True)


def _when(value: str | None, option: str) -> float | None:
    """Epoch seconds from a number or an ISO 8601 date/time (naive = local time)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise FedpalError(f"{option} must be epoch seconds or an ISO date/time like 2026-11-22T14:00, not {value!r}")


def _summary(record: "Record", width: int = 70) -> str:
    f = record.fields
    text = {
        "stated": lambda: f["text"],
        "pair": lambda: f"{f['prompt']} => {f['chosen']}  (not: {f['rejected']})",
        "rating": lambda: f"[{f['score']}/5] {f['prompt']} => {f['response']}",
        "edit": lambda: f"{f['prompt']} => {f['edited']}  (was: {f['response']})",
        "turn": lambda: f"{f['role']}: {f['text']}",
    }[record.kind]()
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_records(records: list["Record"], as_json: bool) -> None:
    from fedpal.client.memory import records_as_json

    if as_json:
        typer.echo(records_as_json(records))
        return
    for r in records:
        when = datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M")
        tags = f"  [{', '.join(r.tags)}]" if r.tags else ""
        typer.echo(f"{r.id}  {r.kind:<6}  {when}  {_summary(r)}{tags}")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="JSONL file, one record per line."),
    home: Path = HOME,
    keyring: bool = KEYRING,
) -> None:
    """Add the records of a JSONL file, all or nothing (a bad line names its number)."""
    if not file.is_file():
        raise FedpalError(f"cannot read {file}: no such file")
    with _memory(home, create=True, keyring=keyring) as memory:
        added = memory.import_jsonl(file)
        typer.echo(f"imported {added} record(s) into {memory.path}")


@app.command()
def add(
    kind: str = typer.Argument(..., help="stated, pair, rating, edit or turn."),
    values: list[str] = typer.Argument(..., help="stated TEXT | pair PROMPT CHOSEN REJECTED | rating PROMPT "
                                                 "RESPONSE SCORE | edit PROMPT RESPONSE EDITED | turn ROLE TEXT"),
    tag: list[str] = typer.Option([], "--tag", help="A tag (repeatable)."),
    home: Path = HOME,
    keyring: bool = KEYRING,
) -> None:
    """Add one record and print its id."""
    if kind not in ADD_USAGE:
        raise FedpalError(f"unknown kind {kind!r}; expected one of {', '.join(ADD_USAGE)}")
    if len(values) != len(ADD_USAGE[kind]):
        raise FedpalError(f"`add {kind}` takes {' '.join(ADD_USAGE[kind])} ({len(ADD_USAGE[kind])} values), "
                          f"got {len(values)}")
    args: list[object] = list(values)
    if kind == "rating":
        try:
            args[2] = int(values[2])
        except ValueError:
            raise FedpalError(f"SCORE must be an integer from 1 to 5, not {values[2]!r}") from None
    with _memory(home, create=True, keyring=keyring) as memory:
        adder = getattr(memory, f"add_{kind}")
        typer.echo(adder(*args, tags=tag))


@app.command("list")
def list_(
    home: Path = HOME,
    kind: str = typer.Option(None, help="Only this kind."),
    as_json: bool = AS_JSON,
) -> None:
    """Show the records, oldest first (corrupt ones are named on stderr)."""
    with _memory(home) as memory:
        _print_records(memory.records(kind), as_json)


@app.command()
def search(
    prompt: str = typer.Argument(..., help="The prompt to find relevant records for."),
    home: Path = HOME,
    k: int = typer.Option(5, "-k", min=1, help="How many records."),
    kind: list[str] = typer.Option([], "--kind", help="Only these kinds (repeatable)."),
    as_json: bool = AS_JSON,
) -> None:
    """The records most relevant to a prompt: stated preferences first, then BM25 matches."""
    with _memory(home) as memory:
        _print_records(memory.retrieve(prompt, k=k, kinds=kind or None), as_json)


@app.command()
def forget(
    ids: list[str] = typer.Argument(None, help="Record ids to delete."),
    home: Path = HOME,
    since: str = typer.Option(None, help="Only records created at or after this (epoch or ISO time)."),
    until: str = typer.Option(None, help="Only records created before this (epoch or ISO time)."),
    tag: str = typer.Option(None, help="Only records with this tag."),
    everything: bool = typer.Option(False, "--all", help="Delete every record and destroy the key."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask before --all."),
) -> None:
    """Delete records by id, time range and/or tag, or all of them (--all also shreds the key)."""
    lo, hi = _when(since, "--since"), _when(until, "--until")
    if everything and not yes:
        if not sys.stdin.isatty():
            raise FedpalError("--all deletes every record for good; add --yes to confirm")
        typer.confirm(f"Delete every record in {home} and destroy its key?", abort=True)
    with _memory(home) as memory:
        count = memory.forget(ids or None, since=lo, until=hi, tag=tag, everything=everything)
        typer.echo(f"forgot {count} record(s)" + (" and destroyed the old key" if everything else ""))


@app.command()
def export(
    file: str = typer.Argument(..., help="Output JSONL file ('-' for standard output); decrypted, mode 0600."),
    home: Path = HOME,
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="Export the readable records even if some "
                                                                    "are corrupt."),
) -> None:
    """Write every record, decrypted, as JSONL (the format `import` reads)."""
    with _memory(home) as memory:
        if file == "-":
            for record in memory.records(strict=not skip_corrupt):
                typer.echo(json.dumps(record.to_json(), ensure_ascii=False))
            return
        count = memory.export_jsonl(file, skip_corrupt=skip_corrupt)
        typer.echo(f"exported {count} record(s) to {file}")


@app.command()
def verify(home: Path = HOME) -> None:
    """Check every record's authentication tag; fails naming the ids of tampered records."""
    from fedpal.client.encryption import CorruptRecordError

    with _memory(home) as memory:
        bad = memory.verify()
        if bad:
            raise CorruptRecordError(bad)
        typer.echo(f"all {len(memory)} record(s) verified")
