"""``fedpal memory``: look after one user's encrypted preference memory from the shell.

The passphrase comes from ``FEDPAL_PASSPHRASE``, ``--passphrase-file`` or, in a terminal,
a hidden prompt; ``--keyring`` creates a memory whose key lives in the OS keyring instead.
Only ``import`` and ``add`` create a home (and say so on stderr); every other command
needs one that exists. Every input is checked before the memory is opened or created, so
a refused command leaves no empty memory or folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedpal.client.cli_common import PASSPHRASE_FILE, check_output_file, choices, home_option, plain, read_passphrase
from fedpal.client.home import ClientHome
from fedpal.client.memory.records import KIND_FIELDS
from fedpal.common.errors import FedpalError

if TYPE_CHECKING:
    from fedpal.client.memory import PreferenceMemory, Record

app = typer.Typer(help="The encrypted preference memory of one user.", no_args_is_help=True, suggest_commands=False)

HOME = home_option("The client's home folder (holds memory.sqlite).")
KEYRING = typer.Option(False, "--keyring", help="When creating the memory, keep its key in the OS keyring.")
AS_JSON = typer.Option(False, "--json", help="Print a JSON array of records.")
ADD_USAGE = {kind: tuple(name.upper() for name in names) for kind, names in KIND_FIELDS.items()}
Kind = choices("Kind", tuple(ADD_USAGE))
PROGRESS_FROM = 1000
"""Imports of at least this many records show a progress bar (in a terminal)."""


@dataclass
class Opened:
    """What opening the memory did: whether it made the home folder or the memory file."""

    created_home: bool = False
    created_memory: bool = False


@contextmanager
def _memory(
    home: str,
    passphrase_file: str | None,
    *,
    create: bool = False,
    keyring: bool = False,
    opened: Opened | None = None,
) -> Iterator["PreferenceMemory"]:
    """Open the memory, asking for the passphrase only when needed; warnings become one line each.

    With ``create`` the home and the memory are made if missing, after every check passed,
    and removed again if the command then fails with the memory still empty.
    """
    from fedpal.client.memory import PASSPHRASE_ENV, PreferenceMemory

    opened = opened if opened is not None else Opened()
    client = ClientHome.planned(home) if create else ClientHome.existing(home)
    source = PreferenceMemory.key_source(client.root) if client.root.is_dir() else None
    if source is None and not create:
        raise FedpalError(
            f"no preference memory in {client.root} yet; `fedpal memory add` or `fedpal memory import` creates one"
        )
    needs_passphrase = source == "passphrase" or (source is None and not keyring)
    passphrase = (
        read_passphrase(os.environ.get(PASSPHRASE_ENV), passphrase_file, ask=needs_passphrase, confirm=source is None)
        if needs_passphrase
        else None
    )
    if source is None and needs_passphrase and passphrase is None:
        raise FedpalError(
            f"a new memory in {client.root} needs a passphrase: set {PASSPHRASE_ENV}, give "
            "--passphrase-file FILE, type it in a terminal, or keep the key in the OS keyring (--keyring)"
        )
    if source is not None:
        client.writable()
    made = client.create() if create else None
    opened.created_home = made is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                memory = PreferenceMemory.open(client.root, passphrase, use_keyring=keyring)
            except BaseException:
                _undo(client, made, source)
                raise
            opened.created_memory = source is None
            if source is None:
                what = "the OS keyring" if keyring else "your passphrase"
                where = f"a new fedpal home at {client.root}" if made is not None else f"a new memory in {client.root}"
                typer.echo(f"note: created {where} (encrypted; key protected by {what})", err=True)
            try:
                with memory:
                    yield memory
            except BaseException:
                if source is None and _is_empty(client):
                    _undo(client, made, source)
                raise
        finally:
            for warning in caught:
                typer.echo(f"warning: {warning.message}", err=True)


def _is_empty(client: ClientHome) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(client.memory_db) as conn:
            return conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
    except sqlite3.DatabaseError:
        return False


def _undo(client: ClientHome, made: Path | None, source: str | None) -> None:
    """Remove what a failed command created: the new memory's files and the folders it made."""
    if source is None:
        for suffix in ("", "-wal", "-shm"):
            client.memory_db.with_name(client.memory_db.name + suffix).unlink(missing_ok=True)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


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


def _print_records(records: list["Record"], as_json: bool) -> None:
    from fedpal.client.memory import records_as_json

    if as_json:
        typer.echo(records_as_json(records))
        return
    for r in records:
        when = datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M")
        tags = f"  [{', '.join(r.tags)}]" if r.tags else ""
        typer.echo(f"{r.id}  {r.kind:<6}  {when}  {r.summary()}{tags}")


def _echo_json(data: dict) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False))


@app.command("import")
def import_(
    file: Path = typer.Argument(
        ...,
        help="JSONL file, one record per line (fields: see the README); "
        "a file written by `fedpal memory export` restores its records.",
    ),
    home: str = HOME,
    keyring: bool = KEYRING,
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = typer.Option(False, "--json", help='Print {"added", "skipped_duplicates", "from_export", ...}.'),
) -> None:
    """Add the records of a JSONL file, all or nothing (a bad line names its number). Creates the home if needed."""
    from fedpal.client.memory import PreferenceMemory, content_problem

    if file.is_dir():
        raise FedpalError(f"cannot read {file}: it is a folder, not a JSONL file")
    if not file.is_file():
        raise FedpalError(f"cannot read {file}: no such file")
    parsed = PreferenceMemory.parse_jsonl(file)
    for item in parsed:
        problem = content_problem(item.kind, item.fields)
        if problem:
            raise FedpalError(f"{file}:{item.line}: {problem} (nothing was imported)")
    opened = Opened()
    with _memory(home, passphrase_file, create=True, keyring=keyring, opened=opened) as memory:
        with _progress(len(parsed)) as advance:
            report = memory.import_records(parsed, on_record=advance)
    if as_json:
        _echo_json(
            {
                "added": report.added,
                "skipped_duplicates": report.duplicates,
                "from_export": report.with_ids,
                "memory": str(memory.path),
                "created_home": opened.created_home,
                "created_memory": opened.created_memory,
            }
        )
        return
    skipped = f"; {report.duplicates} already there (same id) were skipped" if report.duplicates else ""
    typer.echo(f"imported {report.added} record(s) into {memory.path}{skipped}")
    if report.with_ids and not opened.created_memory:
        typer.echo(
            f"{report.with_ids} of them came with ids from an export: any you had forgotten here are back "
            "(`fedpal memory forget ID` removes one again)"
        )


@contextmanager
def _progress(total: int) -> Iterator[object]:
    """A progress bar on stderr for a large import in a terminal; otherwise nothing to advance."""
    if total < PROGRESS_FROM or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bars:
        task = bars.add_task("encrypting records", total=total)
        yield lambda: bars.advance(task)


@app.command()
def add(
    kind: Kind = typer.Argument(..., help="The kind of record; each takes its own VALUES, in this order."),
    values: list[str] = typer.Argument(
        ...,
        help="stated TEXT | pair PROMPT CHOSEN REJECTED | rating PROMPT "
        "RESPONSE SCORE(1-5) | edit PROMPT RESPONSE EDITED | turn ROLE TEXT",
    ),
    tag: list[str] = typer.Option([], "--tag", help="A tag (repeatable)."),
    home: str = HOME,
    keyring: bool = KEYRING,
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = typer.Option(False, "--json", help='Print {"id", "kind", "created_home", "created_memory"}.'),
) -> None:
    """Add one record and print its id. Creates the home if needed.

    Example: fedpal memory add pair "What is BM25?" "A ranking function." "A vitamin." --home ~/fedpal-me
    """
    from fedpal.client.memory import PREFERENCE_MAX_BYTES, check_record, content_problem

    kind = plain(kind)
    if len(values) != len(ADD_USAGE[kind]):
        raise FedpalError(
            f"`add {kind}` takes {' '.join(ADD_USAGE[kind])} ({len(ADD_USAGE[kind])} values), got {len(values)}"
        )
    args: list[object] = list(values)
    if kind == "rating":
        try:
            args[2] = int(values[2])
        except ValueError:
            raise FedpalError(f"SCORE must be an integer from 1 to 5, not {values[2]!r}") from None
    fields = dict(zip(KIND_FIELDS[kind], args))
    check_record(kind, fields, tag)
    problem = content_problem(kind, fields)
    if problem:
        raise FedpalError(problem)
    opened = Opened()
    with _memory(home, passphrase_file, create=True, keyring=keyring, opened=opened) as memory:
        record_id = getattr(memory, f"add_{kind}")(*args, tags=tag)
    if kind == "stated" and len(values[0].encode("utf-8")) > PREFERENCE_MAX_BYTES:
        typer.echo(
            f"warning: retrieval adds only the first {PREFERENCE_MAX_BYTES} bytes of a stated preference", err=True
        )
    if as_json:
        _echo_json(
            {
                "id": record_id,
                "kind": kind,
                "created_home": opened.created_home,
                "created_memory": opened.created_memory,
            }
        )
    else:
        typer.echo(record_id)


@app.command("list")
def list_(
    home: str = HOME,
    kind: Kind = typer.Option(None, help="Only this kind."),
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = AS_JSON,
) -> None:
    """Show the records, oldest first, and how many there are (corrupt ones are named on stderr)."""
    kind = plain(kind)
    with _memory(home, passphrase_file) as memory:
        records = memory.records(kind)
        total = len(memory)
    if as_json:
        _print_records(records, True)
        return
    if not records:
        typer.echo(f"no {kind} records ({total} of other kinds)" if kind and total else "the memory is empty")
        return
    _print_records(records, False)
    typer.echo(f"{len(records)} {kind + ' ' if kind else ''}record(s)")


@app.command()
def search(
    prompt: str = typer.Argument(..., help="The prompt to find relevant records for."),
    home: str = HOME,
    k: int = typer.Option(5, "-k", min=1, help="How many records."),
    kind: list[Kind] = typer.Option([], "--kind", help="Only these kinds (repeatable)."),
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = AS_JSON,
) -> None:
    """The records most relevant to a prompt: stated preferences first, then BM25 matches."""
    with _memory(home, passphrase_file) as memory:
        found = memory.retrieve(prompt, k=k, kinds=[plain(x) for x in kind] or None)
    if not found and not as_json:
        typer.echo("no record matches")
        return
    _print_records(found, as_json)


@app.command()
def forget(
    ids: list[str] = typer.Argument(
        None, help="Ids of the records to delete (as `list` shows them); an unknown id deletes nothing."
    ),
    home: str = HOME,
    since: str = typer.Option(None, help="Only records created at or after this (epoch or ISO time)."),
    until: str = typer.Option(None, help="Only records created before this (epoch or ISO time)."),
    tag: str = typer.Option(None, help="Only records with this tag."),
    everything: bool = typer.Option(False, "--all", help="Delete every record and destroy the key."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask before --all."),
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = typer.Option(False, "--json", help='Print {"forgotten", "key_destroyed"}.'),
) -> None:
    """Delete records by id, time range and/or tag, or all of them (--all also shreds the key)."""
    lo, hi = _when(since, "--since"), _when(until, "--until")
    if everything and (ids or lo is not None or hi is not None or tag is not None):
        raise FedpalError("--all deletes everything: give it no ids, --since, --until or --tag")
    if not everything and not ids and lo is None and hi is None and tag is None:
        raise FedpalError("say what to forget: record ids, --since/--until, --tag, or --all")
    if everything and not yes:
        if not sys.stdin.isatty():
            raise FedpalError("--all deletes every record for good; add --yes to confirm")
        typer.confirm(f"Delete every record in {home} and destroy its key?", abort=True)
    with _memory(home, passphrase_file) as memory:
        count = memory.forget(ids or None, since=lo, until=hi, tag=tag, everything=everything, unknown_ids_ok=False)
    if as_json:
        _echo_json({"forgotten": count, "key_destroyed": everything})
    else:
        typer.echo(f"forgot {count} record(s)" + (" and destroyed the old key" if everything else ""))


@app.command()
def export(
    file: str = typer.Argument(..., help="Output JSONL file, decrypted, mode 0600; '-' writes to standard output."),
    home: str = HOME,
    skip_corrupt: bool = typer.Option(
        False, "--skip-corrupt", help="Export the readable records even if some are corrupt."
    ),
    force: bool = typer.Option(False, "--force", help="Replace FILE if it exists."),
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = typer.Option(False, "--json", help='Print {"exported", "file"} (not with FILE "-").'),
) -> None:
    """Write every record, decrypted, as JSONL (the format `import` reads)."""
    if file != "-":
        target = Path(file).expanduser()
        check_output_file(target, force, "memory.jsonl", shown=file)
    with _memory(home, passphrase_file) as memory:
        if file == "-":
            for record in memory.records(strict=not skip_corrupt):
                typer.echo(json.dumps(record.to_json(), ensure_ascii=False))
            return
        count = memory.export_jsonl(target, skip_corrupt=skip_corrupt)
    if as_json:
        _echo_json({"exported": count, "file": str(target.resolve())})
    else:
        typer.echo(f"exported {count} record(s) to {file}")


@app.command()
def verify(
    home: str = HOME,
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = typer.Option(
        False, "--json", help='Print {"records", "corrupt"} (and still fail if any is corrupt).'
    ),
) -> None:
    """Check every record's authentication tag; fails naming the ids of tampered records."""
    from fedpal.client.encryption import CorruptRecordError

    with _memory(home, passphrase_file) as memory:
        bad = memory.verify()
        total = len(memory)
    if as_json:
        _echo_json({"records": total, "corrupt": bad})
    if bad:
        raise CorruptRecordError(bad)
    if not as_json:
        typer.echo(f"all {total} record(s) verified")
