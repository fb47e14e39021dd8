"""The user's preference memory: one encrypted SQLite file that never leaves the device.

What is stored, and what stays readable
    Table ``records`` has one row per record: ``id`` (random hex), ``kind`` (stated, pair,
    rating, edit, turn), ``created`` (epoch seconds) and ``sealed``: AES-256-GCM over the
    JSON of the record's fields *and tags*, padded to a multiple of 128 bytes so lengths
    leak only coarsely. ``kind`` and ``created`` stay in clear on purpose: they let the
    memory filter by kind and forget by time range with plain SQL; both are bound into the
    GCM associated data (kind) or carry no content (time). Texts and tags are never stored
    in clear. Table ``meta`` holds the schema version, the Argon2id parameters and the
    wrapped data key (or, for keyring stores, only a key check value).

Faults
    A record whose ciphertext, id or kind was changed fails its GCM tag. Readers skip it
    with a ``CorruptRecordWarning`` naming its id (the chat agent and the trainer keep
    working on the rest); ``strict=True``, ``export_jsonl`` and ``verify()`` report it.
    Writes are single SQLite transactions (``BEGIN IMMEDIATE``, WAL mode), so another
    process writing at the same time waits instead of losing records.

Forgetting
    ``secure_delete`` zeroes deleted rows; ``forget(everything=True)`` also replaces the
    data key, so any copy of old pages (backups, WAL remnants) can no longer be opened.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpal.client.encryption import (
    OWASP_ARGON2ID,
    CorruptRecordError,
    KdfParams,
    decrypt_record,
    encrypt_record,
    keyring_available,
)
from fedpal.client.home import ClientHome
from fedpal.client.memory.keys import MemoryKey, resolve_passphrase
from fedpal.client.memory import training
from fedpal.client.memory.jsonl import ImportReport, ParsedRecord, parse_jsonl, records_to_jsonl
from fedpal.client.memory.records import KIND_FIELDS, CorruptRecordWarning, Record, validated
from fedpal.client.memory.training import RETRIEVAL_MAX_BYTES, TrainingItem, fit_preferences
from fedpal.client.retrieval import BM25Ranker, Ranker, RankIndex
from fedpal.common.files import write_atomic
from fedpal.common.errors import FedpalError
from fedpal.common.types import PreferencePair, SFTExample

_PAD_TO = 128

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE records (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,"
    " created REAL NOT NULL, sealed BLOB NOT NULL)",
    "CREATE INDEX records_by_time ON records (created)",
    "CREATE INDEX records_by_kind ON records (kind, created)",
)


def _epoch(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    return value.timestamp()


@dataclass
class _Snapshot:
    """The decrypted records at one database version, with what retrieval derives from them."""

    version: tuple[int, int]
    records: list[Record]
    corrupt: list[str]
    index: RankIndex | None = None
    positions: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for position, record in enumerate(self.records):
            self.positions.setdefault(record.kind, []).append(position)


class PreferenceMemory:
    """Encrypted store of one user's stated preferences, choices, ratings, edits and turns.

    Open with ``PreferenceMemory.open(home, passphrase)``; use one instance per thread.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        key: MemoryKey,
        ranker: Ranker,
    ):
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self._key: MemoryKey | None = key
        self.ranker = ranker
        self._writes = 0
        self._snapshot: _Snapshot | None = None
        self._opened: dict[tuple, Record] = {}
        self._opened_key_id: str | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        home: Path | str,
        passphrase: str | None = None,
        *,
        use_keyring: bool = False,
        kdf: KdfParams = OWASP_ARGON2ID,
        ranker: Ranker | None = None,
    ) -> "PreferenceMemory":
        """Open (or create) the memory in ``home``.

        A passphrase store needs ``passphrase`` or ``FEDPAL_PASSPHRASE``; a keyring store
        (created with ``use_keyring=True``) needs neither. ``use_keyring`` and ``kdf``
        only matter when the memory is created; later opens use what the file records.
        A wrong passphrase raises ``WrongPassphraseError`` and writes nothing.
        """
        path = ClientHome(Path(home).expanduser().resolve()).memory_db
        ranker = ranker or BM25Ranker()
        existed = path.exists() and path.stat().st_size > 0
        if not existed and not use_keyring:
            resolve_passphrase(passphrase, path)
        if not existed and use_keyring and not keyring_available():
            raise FedpalError("no OS keyring is available here; use a passphrase (FEDPAL_PASSPHRASE) instead")
        ClientHome.at(path.parent)  # created only now: a refused open leaves no empty folder behind
        conn = cls._connect(path)
        try:
            meta = cls._read_meta(conn)
            if meta is None:
                created = cls._initialize(conn, path, passphrase, use_keyring, kdf, ranker)
                if created is not None:
                    return created
                meta = cls._read_meta(conn)
                assert meta is not None
            return cls._unlock(conn, path, meta, passphrase, ranker)
        except sqlite3.DatabaseError as err:
            conn.close()
            raise FedpalError(f"{path} is not a readable fedpal memory ({err})") from None
        except (KeyError, TypeError, ValueError) as err:
            conn.close()
            raise FedpalError(f"{path} has damaged key metadata ({type(err).__name__}: {err})") from None
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def key_source(home: Path | str) -> str | None:
        """'passphrase' or 'keyring' for an existing memory, None if there is none yet (writes nothing)."""
        path = ClientHome(Path(home).expanduser().resolve()).memory_db
        if not path.exists() or path.stat().st_size == 0:
            return None
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            meta = PreferenceMemory._read_meta(conn)
        except sqlite3.DatabaseError as err:
            raise FedpalError(f"{path} is not a readable fedpal memory ({err})") from None
        finally:
            conn.close()
        return None if meta is None else meta["key_source"]

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA secure_delete = ON")
        except sqlite3.OperationalError as err:
            conn.close()
            if _is_busy(err):
                raise FedpalError(f"the preference memory at {path} is busy ({err}); try again") from None
            raise FedpalError(f"{path} is not a readable fedpal memory ({err})") from None
        except sqlite3.DatabaseError as err:
            conn.close()
            raise FedpalError(f"{path} is not a readable fedpal memory ({err})") from None
        return conn

    @staticmethod
    def _read_meta(conn: sqlite3.Connection) -> dict[str, str] | None:
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not has_meta:
            return None
        return dict(conn.execute("SELECT name, value FROM meta").fetchall())

    @classmethod
    def _initialize(
        cls,
        conn: sqlite3.Connection,
        path: Path,
        passphrase: str | None,
        use_keyring: bool,
        kdf: KdfParams,
        ranker: Ranker,
    ) -> "PreferenceMemory | None":
        """Create tables and key in one transaction; None if another process got there first."""
        key, meta = MemoryKey.create(path, passphrase, use_keyring, kdf)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if cls._read_meta(conn) is not None:
                conn.execute("ROLLBACK")
                return None
            key.keep()
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", sorted(meta.items()))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return cls(conn, path, key, ranker)

    @classmethod
    def _unlock(
        cls, conn: sqlite3.Connection, path: Path, meta: dict[str, str], passphrase: str | None, ranker: Ranker
    ) -> "PreferenceMemory":
        return cls(conn, path, MemoryKey.unlock(path, meta, passphrase), ranker)

    # ------------------------------------------------------------------ transactions

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FedpalError("this preference memory is closed")
        return self._conn

    def _sync_key(self) -> None:
        """Pick up a data key replaced by another process's ``forget(everything=True)``."""
        self._key = self._memory_key().current(dict(self._db().execute("SELECT name, value FROM meta").fetchall()))

    def _memory_key(self) -> MemoryKey:
        if self._key is None:
            raise FedpalError("this preference memory is closed")
        return self._key

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.OperationalError as err:
            raise FedpalError(f"the preference memory at {self.path} is busy ({err}); try again") from None
        try:
            self._sync_key()
            yield conn
        except sqlite3.DatabaseError as err:
            self._rollback()
            raise FedpalError(f"the preference memory at {self.path} is damaged or unreadable ({err})") from None
        except BaseException:
            self._rollback()
            raise
        conn.execute("COMMIT")
        if write:
            self._writes += 1

    def _rollback(self) -> None:
        try:
            self._db().execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # the failed statement already ended the transaction

    def _seal(self, record_id: str, kind: str, fields: dict[str, Any], tags: list[str]) -> bytes:
        payload = json.dumps({"fields": fields, "tags": tags}, ensure_ascii=False).encode("utf-8")
        payload += b" " * (-len(payload) % _PAD_TO)
        return encrypt_record(self._memory_key().key, record_id, kind, payload)

    def _open_row(self, record_id: str, kind: str, created: float, sealed: bytes) -> Record:
        payload = json.loads(decrypt_record(self._memory_key().key, record_id, kind, sealed))
        return Record(record_id, kind, created, payload["tags"], payload["fields"])

    # ------------------------------------------------------------------ adding

    def _add(self, kind: str, fields: dict[str, Any], tags: Iterable[str]) -> str:
        try:
            kind, fields, clean_tags = validated(kind, fields, tags if isinstance(tags, str) else list(tags))
        except ValueError as err:
            raise FedpalError(str(err)) from None
        record_id = uuid.uuid4().hex
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO records (id, kind, created, sealed) VALUES (?, ?, ?, ?)",
                (record_id, kind, time.time(), self._seal(record_id, kind, fields, clean_tags)),
            )
        return record_id

    def add_stated(self, text: str, tags: Iterable[str] = ()) -> str:
        """Store a preference in the user's words ("I like short answers"); returns its id."""
        return self._add("stated", {"text": text}, tags)

    def add_pair(self, prompt: str, chosen: str, rejected: str, tags: Iterable[str] = ()) -> str:
        """Store that, for ``prompt``, the user chose ``chosen`` over ``rejected``."""
        return self._add("pair", {"prompt": prompt, "chosen": chosen, "rejected": rejected}, tags)

    def add_rating(self, prompt: str, response: str, score: int, tags: Iterable[str] = ()) -> str:
        """Store a 1..5 rating of ``response`` to ``prompt``."""
        return self._add("rating", {"prompt": prompt, "response": response, "score": score}, tags)

    def add_edit(self, prompt: str, response: str, edited: str, tags: Iterable[str] = ()) -> str:
        """Store the user's correction ``edited`` of the model's ``response``."""
        return self._add("edit", {"prompt": prompt, "response": response, "edited": edited}, tags)

    def add_turn(self, role: str, text: str, tags: Iterable[str] = ()) -> str:
        """Store one conversation turn (role: system, user, assistant or tool)."""
        return self._add("turn", {"role": role, "text": text}, tags)

    # ------------------------------------------------------------------ reading

    def version(self) -> tuple[int, int]:
        """A value that changes whenever the records change, through this connection or any other
        (SQLite's data version plus this connection's own writes): a cache key for derived data."""
        return (self._db().execute("PRAGMA data_version").fetchone()[0], self._writes)

    def _load(self, force: bool = False) -> _Snapshot:
        version = self.version()
        if not force and self._snapshot is not None and self._snapshot.version == version:
            return self._snapshot
        records: list[Record] = []
        corrupt: list[str] = []
        opened: dict[tuple, Record] = {}
        with self._transaction(write=False) as tx:
            key_id = self._memory_key().key_id
            rows = tx.execute("SELECT id, kind, created, sealed FROM records ORDER BY created, seq").fetchall()
        known = {} if force or key_id != self._opened_key_id else self._opened
        for row in rows:
            # Rows are immutable once written: a row seen before, byte for byte, needs no decryption.
            record = known.get(row)
            if record is None:
                try:
                    record = self._open_row(*row)
                except CorruptRecordError:
                    corrupt.append(row[0])
                    continue
            opened[row] = record
            records.append(record)
        self._opened, self._opened_key_id = opened, key_id
        self._snapshot = _Snapshot(version, records, corrupt)
        return self._snapshot

    def _readable(self, strict: bool) -> _Snapshot:
        snapshot = self._load()
        if snapshot.corrupt:
            if strict:
                raise CorruptRecordError(snapshot.corrupt)
            warnings.warn(CorruptRecordWarning(str(CorruptRecordError(snapshot.corrupt))), stacklevel=3)
        return snapshot

    def records(self, kind: str | None = None, *, strict: bool = False) -> list[Record]:
        """All readable records, oldest first; corrupt ones are skipped with a warning (or raise if ``strict``)."""
        if kind is not None and kind not in KIND_FIELDS:
            raise FedpalError(f"unknown kind {kind!r}; expected one of {', '.join(KIND_FIELDS)}")
        snapshot = self._readable(strict)
        return [r for r in snapshot.records if kind is None or r.kind == kind]

    def __len__(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def verify(self) -> list[str]:
        """Ids of records that fail authentication (tampered, truncated, moved or relabelled)."""
        return list(self._load(force=True).corrupt)

    def retrieve(self, prompt: str, k: int = 5, kinds: Iterable[str] | str | None = None) -> list[Record]:
        """The ``k`` records most useful for ``prompt``.

        Stated preferences come first (those sharing words with the prompt by rank, then
        the newest others, since a general preference applies to any prompt); then other
        kinds that match the prompt, by rank.
        """
        wanted = set(KIND_FIELDS) if kinds is None else {kinds} if isinstance(kinds, str) else set(kinds)
        unknown = wanted - set(KIND_FIELDS)
        if unknown:
            raise FedpalError(f"unknown kind(s) {', '.join(sorted(unknown))}; expected {', '.join(KIND_FIELDS)}")
        if k <= 0:
            return []
        snapshot = self._readable(strict=False)
        if snapshot.index is None:
            snapshot.index = self.ranker.index([r.document for r in snapshot.records])
        records = snapshot.records
        stated = snapshot.positions.get("stated", []) if "stated" in wanted else []
        order = [i for i, _ in snapshot.index.search(prompt, stated, k)] if stated else []
        if len(order) < k:
            matched = set(order)
            order += [i for i in reversed(stated) if i not in matched][: k - len(order)]  # newest first
        if len(order) < k:
            others = [i for kind in sorted(wanted - {"stated"}) for i in snapshot.positions.get(kind, [])]
            order += [i for i, _ in snapshot.index.search(prompt, others, k - len(order))] if others else []
        return [records[i] for i in order[:k]]

    def stated_preferences(
        self, prompt: str | None = None, k: int = 5, max_bytes: int = RETRIEVAL_MAX_BYTES
    ) -> list[str]:
        """Texts of up to ``k`` stated preferences: most relevant to ``prompt`` first, else newest first.

        Together they take at most ``max_bytes`` of UTF-8 (see :func:`fit_preferences`): what
        retrieval adds to a request must leave the request and the reply room in the model's
        context, however long a preference someone stored.
        """
        return fit_preferences((r.fields["text"] for r in self.retrieve(prompt or "", k, kinds=["stated"])), max_bytes)

    # ------------------------------------------------------------------ training views

    def in_context(self, items: Sequence[TrainingItem], where: str = "prompt") -> list[TrainingItem]:
        """``items`` with each prompt's retrieved stated preferences placed ``where`` (prompt or system).

        With retrieval on, the generator shows the model exactly this context; an adapter
        trained on bare prompts would answer in a context it never learned in.
        """
        return training.in_context(items, self.stated_preferences, where)

    def preference_pairs(self) -> list[PreferencePair]:
        """DPO pairs from the records (see :func:`fedpal.client.memory.training.preference_pairs`)."""
        return training.preference_pairs(self.records())

    def sft_examples(self) -> list[SFTExample]:
        """SFT examples from the records (see :func:`fedpal.client.memory.training.sft_examples`)."""
        return training.sft_examples(self.records())

    # ------------------------------------------------------------------ import / export

    parse_jsonl = staticmethod(parse_jsonl)

    def import_jsonl(self, path: Path | str) -> int:
        """Add the records of a JSONL file in one transaction; returns how many were new.

        Lines may carry ``id`` and ``created`` (as written by ``export_jsonl``); a record
        whose id is already stored is skipped, so re-importing a backup is harmless. Any
        bad line aborts the whole import with its line number; nothing is written.
        """
        return self.import_records(self.parse_jsonl(path)).added

    def import_records(
        self, parsed: Sequence[ParsedRecord], on_record: Callable[[], None] | None = None
    ) -> ImportReport:
        """Store records checked by :meth:`parse_jsonl`, all in one transaction.

        A record whose id is already stored is skipped (and counted). A record that
        carries an id but is not stored is added even if it was here once and forgotten:
        the memory keeps no trace of what it forgot, so a backup restores it. ``on_record``
        is called after each record is sealed (a progress bar).
        """
        now = time.time()
        with self._transaction(write=True) as conn:
            with_ids = [p.record_id for p in parsed if p.record_id is not None]
            existing = {row[0] for row in conn.execute("SELECT id FROM records")} if with_ids else set()
            rows = []
            for item in parsed:
                if item.record_id in existing:
                    continue
                record_id = item.record_id or uuid.uuid4().hex
                rows.append(
                    (
                        record_id,
                        item.kind,
                        now if item.created is None else item.created,
                        self._seal(record_id, item.kind, item.fields, item.tags),
                    )
                )
                if on_record is not None:
                    on_record()
            conn.executemany("INSERT INTO records (id, kind, created, sealed) VALUES (?, ?, ?, ?)", rows)
        restored = sum(1 for item in parsed if item.record_id is not None and item.record_id not in existing)
        return ImportReport(added=len(rows), duplicates=len(parsed) - len(rows), with_ids=restored)

    def export_jsonl(self, path: Path | str, *, skip_corrupt: bool = False) -> int:
        """Write every record, decrypted, as JSONL (file mode 0600); returns the count.

        Refuses if any record is corrupt, unless ``skip_corrupt``: a backup that silently
        misses records is worse than none.
        """
        records = self.records(strict=not skip_corrupt)
        path = Path(path)
        write_atomic(path, records_to_jsonl(records).encode("utf-8"), 0o600)
        return len(records)

    # ------------------------------------------------------------------ forgetting

    def forget(
        self,
        ids: Iterable[str] | str | None = None,
        *,
        since: float | datetime | None = None,
        until: float | datetime | None = None,
        tag: str | None = None,
        everything: bool = False,
        unknown_ids_ok: bool = True,
    ) -> int:
        """Delete records and return how many went.

        Criteria combine (ids AND ``since <= created < until`` AND tag); naive datetimes
        are local time. ``everything`` deletes all records and replaces the data key, so
        no copy of the old file can be opened again even with the passphrase. With
        ``unknown_ids_ok=False`` an id that names no record (a typo) raises before anything
        is deleted.
        """
        if everything:
            if ids is not None or since is not None or until is not None or tag is not None:
                raise FedpalError("forget everything takes no other criteria")
            return self._forget_everything()
        if ids is None and since is None and until is None and tag is None:
            raise FedpalError("say what to forget: ids, a time range, a tag, or everything")
        wanted = None if ids is None else ({ids} if isinstance(ids, str) else set(ids))
        lo, hi = _epoch(since), _epoch(until)
        unreadable: list[str] = []
        with self._transaction(write=True) as conn:
            if wanted is not None and not unknown_ids_ok:
                stored = {row[0] for row in conn.execute("SELECT id FROM records")}
                unknown = sorted(wanted - stored)
                if unknown:
                    raise FedpalError(f"no record with id {', '.join(unknown)} (nothing was forgotten)")
            rows = conn.execute(
                "SELECT seq, id, kind, created, sealed FROM records WHERE created >= ? AND created < ?",
                (-math.inf if lo is None else lo, math.inf if hi is None else hi),
            ).fetchall()
            doomed = []
            for seq, record_id, kind, created, sealed in rows:
                if wanted is not None and record_id not in wanted:
                    continue
                if tag is not None:
                    try:
                        if tag not in self._open_row(record_id, kind, created, sealed).tags:
                            continue
                    except CorruptRecordError:
                        unreadable.append(record_id)
                        continue
                doomed.append((seq,))
            conn.executemany("DELETE FROM records WHERE seq = ?", doomed)
        if unreadable:
            warnings.warn(
                CorruptRecordWarning(
                    f"could not read the tags of {len(unreadable)} corrupt record(s), kept: {', '.join(unreadable)}"
                ),
                stacklevel=2,
            )
        self._checkpoint()
        return len(doomed)

    def _forget_everything(self) -> int:
        old = self._memory_key()
        new, updates = old.replaced()
        with self._transaction(write=True) as conn:
            count = conn.execute("DELETE FROM records").rowcount
            conn.executemany("UPDATE meta SET value = ? WHERE name = ?", [(v, k) for k, v in updates.items()])
        self._key = new
        old.drop()
        self._db().execute("VACUUM")
        self._checkpoint()
        return count

    def _checkpoint(self) -> None:
        """Fold the WAL into the file and truncate it, so deleted pages do not linger there."""
        try:
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:
            pass  # another process is mid-transaction; its own checkpoint will follow

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close the database and drop the key from this object."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._key = None
        self._snapshot = None
        self._opened = {}

    def __enter__(self) -> "PreferenceMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PreferenceMemory({str(self.path)!r}, key in {self._key.source if self._key else 'closed memory'})"


BUSY_TIMEOUT_S = 30.0


def _is_busy(err: sqlite3.OperationalError) -> bool:
    return "locked" in str(err) or "busy" in str(err)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying while another process holds the lock.

    The switch needs an exclusive lock and SQLite answers "database is locked" at once
    instead of running the busy handler, so two processes opening a new memory together
    (a chat agent and an import) would otherwise fail one of them.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if not _is_busy(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
