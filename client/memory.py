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

import codecs
import json
import math
import os
import sqlite3
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from fedpal.client.encryption import (
    OWASP_ARGON2ID,
    SCHEMA_VERSION,
    CorruptRecordError,
    KdfParams,
    decrypt_record,
    derive_wrapping_key,
    encrypt_record,
    key_matches,
    keyring_available,
    keyring_delete_key,
    keyring_load_key,
    keyring_store_key,
    new_data_key,
    seal_key_check,
    unwrap_data_key,
    wrap_data_key,
)
from fedpal.client.home import ClientHome
from fedpal.client.retrieval import BM25Ranker, Ranker, RankIndex
from fedpal.common.files import write_atomic
from fedpal.common.errors import FedpalError
from fedpal.common.generation import place_preferences
from fedpal.common.types import PreferencePair, SFTExample

TrainingItem = TypeVar("TrainingItem", PreferencePair, SFTExample)

PASSPHRASE_ENV = "FEDPAL_PASSPHRASE"

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "stated": ("text",),
    "pair": ("prompt", "chosen", "rejected"),
    "rating": ("prompt", "response", "score"),
    "edit": ("prompt", "response", "edited"),
    "turn": ("role", "text"),
}
TURN_ROLES = ("system", "user", "assistant", "tool")
SFT_MIN_SCORE = 4
MAX_FIELD_CHARS = 100_000
"""Longest text field of a record (prompt, reply, stated preference...): about 25k tokens, far
more than a small model reads, so only a mistake (a pasted file) is refused."""
MAX_TAG_CHARS = 1_000
MAX_TAGS = 100
RETRIEVAL_MAX_BYTES = 1_000
"""Most UTF-8 bytes of stated preferences that retrieval adds to a request (about 250 tokens
of English; a byte-level tokenizer never makes more tokens than bytes), so the user's
request and the reply always keep room in the model's context."""
PREFERENCE_MAX_BYTES = 400
"""A longer stated preference is cut (at a word) when retrieval adds it."""
_PAD_TO = 128
_MAX_ID_CHARS = 200

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE records (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,"
    " created REAL NOT NULL, sealed BLOB NOT NULL)",
    "CREATE INDEX records_by_time ON records (created)",
    "CREATE INDEX records_by_kind ON records (kind, created)",
)


class CorruptRecordWarning(UserWarning):
    """Some records failed authentication and were left out of a read."""


@dataclass(frozen=True)
class Record:
    """One decrypted memory record. ``fields`` holds the kind's fields (see ``KIND_FIELDS``)."""

    id: str
    kind: str
    created: float
    tags: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def document(self) -> str:
        """The text a ranker sees: every text field and the tags."""
        parts = [value for name, value in self.fields.items() if isinstance(value, str) and name != "role"]
        return "\n".join(parts + list(self.tags))

    def to_json(self) -> dict[str, Any]:
        """The JSONL form used by export, import and ``--json`` (flat: kind, fields, tags, id, created)."""
        return {"kind": self.kind, **self.fields, "tags": list(self.tags), "id": self.id, "created": self.created}


def _check_text(name: str, value: Any, limit: int = MAX_FIELD_CHARS) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"'{name}' is not valid Unicode text (lone surrogate)") from None
    if len(value) > limit:
        raise ValueError(f"'{name}' is {len(value):,} characters long; the limit is {limit:,}")
    return value


def _validated(kind: Any, fields: dict[str, Any], tags: Any) -> tuple[str, dict[str, Any], list[str]]:
    """Check one record; raise ValueError with a reason a user can act on."""
    if kind not in KIND_FIELDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KIND_FIELDS)}")
    names = KIND_FIELDS[kind]
    missing = [name for name in names if name not in fields]
    if missing:
        raise ValueError(f"a {kind} record needs {', '.join(repr(m) for m in missing)}")
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(f"unknown field(s) for a {kind} record: {', '.join(repr(u) for u in unknown)}")
    clean: dict[str, Any] = {}
    for name in names:
        value = fields[name]
        if name == "score":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
                raise ValueError(f"'score' must be an integer from 1 to 5, got {value!r}")
            clean[name] = value
        else:
            clean[name] = _check_text(name, value)
    if kind == "turn" and clean["role"] not in TURN_ROLES:
        raise ValueError(f"'role' must be one of {', '.join(TURN_ROLES)}, got {clean['role']!r}")
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise ValueError("'tags' must be a list of strings")
    if len(tags) > MAX_TAGS:
        raise ValueError(f"a record has at most {MAX_TAGS} tags, not {len(tags)}")
    clean_tags = [_check_text("tags", tag, MAX_TAG_CHARS) for tag in tags]
    if any(tag == "" for tag in clean_tags):
        raise ValueError("tags must not be empty strings")
    return kind, clean, clean_tags


def check_record(kind: Any, fields: dict[str, Any], tags: Any = ()) -> None:
    """Raise a ``FedpalError`` saying what is wrong with this record (kind, fields, tags, sizes)."""
    try:
        _validated(kind, fields, list(tags) if isinstance(tags, tuple) else tags)
    except ValueError as err:
        raise FedpalError(str(err)) from None


def content_problem(kind: str, fields: dict[str, Any]) -> str | None:
    """Why a well-formed record would teach nothing (None if it is fine).

    The memory API stores such records (a program may log whatever happened), but a person
    adding or importing one has made a mistake worth hearing about: an empty stated
    preference, a pair whose two replies are the same, an edit that changed nothing.
    """
    if kind == "stated" and not fields["text"].strip():
        return "the stated preference is empty"
    if kind == "turn" and not fields["text"].strip():
        return "the turn's text is empty"
    if "prompt" in fields and not fields["prompt"].strip():
        return f"the {kind}'s prompt is empty"
    if kind == "pair" and fields["chosen"] == fields["rejected"]:
        return "chosen and rejected are the same reply: a pair needs two different ones"
    if kind == "edit" and fields["edited"] == fields["response"]:
        return "the edited reply is the same as the response: nothing was corrected"
    return None


def fit_preferences(
    texts: Iterable[str], max_bytes: int = RETRIEVAL_MAX_BYTES, each_bytes: int = PREFERENCE_MAX_BYTES
) -> list[str]:
    """``texts`` in order, each cut to ``each_bytes`` and all together at most ``max_bytes`` of UTF-8.

    A preference that no longer fits is left out and the next (shorter) one tried, so the
    most relevant preferences that fit are the ones the model sees.
    """
    kept: list[str] = []
    left = max_bytes
    for text in texts:
        text = _cut_utf8(" ".join(text.split()), each_bytes)
        size = len(text.encode("utf-8")) + (1 if kept else 0)
        if text and size <= left:
            kept.append(text)
            left -= size
    return kept


def _cut_utf8(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` UTF-8 bytes, else its longest whole-word start that does, plus "…"."""
    if len(text.encode("utf-8")) <= limit:
        return text
    room = limit - len("…".encode("utf-8"))
    head = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
    if " " in head.strip():
        head = head.rstrip()[: head.rstrip().rfind(" ")]
    return head.rstrip() + "…"


def _epoch(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    return value.timestamp()


def _resolve_passphrase(passphrase: str | None, path: Path) -> str:
    if passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        raise FedpalError(
            f"the preference memory at {path} needs a passphrase: set {PASSPHRASE_ENV}, give --passphrase-file FILE, "
            "or run in a terminal to type it"
        )
    if passphrase == "":
        raise FedpalError("the memory passphrase must not be empty")
    return passphrase


@dataclass(frozen=True)
class ParsedRecord:
    """One checked line of a JSONL file, ready to store (``record_id``/``created`` None: new ones)."""

    line: int
    record_id: str | None
    kind: str
    created: float | None
    fields: dict[str, Any]
    tags: list[str]


@dataclass(frozen=True)
class ImportReport:
    """What an import did: records added, records skipped because their id was already stored,
    and how many of the added ones carried an id (came from an export, so may be records
    forgotten here since)."""

    added: int
    duplicates: int
    with_ids: int


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
        store_id: str,
        key_source: str,
        key: bytes,
        key_id: str,
        wrapping_key: bytes | None,
        kdf: KdfParams | None,
        ranker: Ranker,
    ):
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self._store_id = store_id
        self._key_source = key_source
        self._key = key
        self._key_id = key_id
        self._wrapping_key = wrapping_key
        self._kdf = kdf
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
            _resolve_passphrase(passphrase, path)
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
        store_id = uuid.uuid4().hex
        key_id = uuid.uuid4().hex
        data_key = new_data_key()
        meta = {"schema_version": str(SCHEMA_VERSION), "store_id": store_id, "key_id": key_id}
        wrapping_key = params = None
        if use_keyring:
            meta["key_source"] = "keyring"
            meta["key_check"] = seal_key_check(data_key, f"{store_id}:{key_id}").hex()
        else:
            params = kdf.with_new_salt()
            wrapping_key = derive_wrapping_key(_resolve_passphrase(passphrase, path), params)
            meta["key_source"] = "passphrase"
            meta["kdf"] = params.to_json()
            meta["wrapped_key"] = wrap_data_key(wrapping_key, data_key, store_id, params).hex()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if cls._read_meta(conn) is not None:
                conn.execute("ROLLBACK")
                return None
            if use_keyring:
                keyring_store_key(f"{store_id}:{key_id}", data_key)
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", sorted(meta.items()))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return cls(conn, path, store_id, meta["key_source"], data_key, key_id, wrapping_key, params, ranker)

    @classmethod
    def _unlock(
        cls, conn: sqlite3.Connection, path: Path, meta: dict[str, str], passphrase: str | None, ranker: Ranker
    ) -> "PreferenceMemory":
        version = int(meta.get("schema_version", "0"))
        if version != SCHEMA_VERSION:
            raise FedpalError(f"{path} uses memory schema {version}; this fedpal reads schema {SCHEMA_VERSION}")
        store_id, key_id = meta["store_id"], meta["key_id"]
        if meta["key_source"] == "keyring":
            data_key = cls._keyring_key(meta)
            return cls(conn, path, store_id, "keyring", data_key, key_id, None, None, ranker)
        params = KdfParams.from_json(meta["kdf"])
        wrapping_key = derive_wrapping_key(_resolve_passphrase(passphrase, path), params)
        data_key = unwrap_data_key(wrapping_key, bytes.fromhex(meta["wrapped_key"]), store_id, params)
        return cls(conn, path, store_id, "passphrase", data_key, key_id, wrapping_key, params, ranker)

    @staticmethod
    def _keyring_key(meta: dict[str, str]) -> bytes:
        label = f"{meta['store_id']}:{meta['key_id']}"
        data_key = keyring_load_key(label)
        if not key_matches(data_key, label, bytes.fromhex(meta["key_check"])):
            raise FedpalError("the key in the OS keyring does not open this memory")
        return data_key

    # ------------------------------------------------------------------ transactions

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FedpalError("this preference memory is closed")
        return self._conn

    def _sync_key(self) -> None:
        """Pick up a data key replaced by another process's ``forget(everything=True)``."""
        meta = dict(self._db().execute("SELECT name, value FROM meta").fetchall())
        if meta["key_id"] == self._key_id:
            return
        if self._key_source == "keyring":
            self._key = self._keyring_key(meta)
        else:
            assert self._wrapping_key is not None and self._kdf is not None
            self._key = unwrap_data_key(
                self._wrapping_key, bytes.fromhex(meta["wrapped_key"]), self._store_id, self._kdf
            )
        self._key_id = meta["key_id"]

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
        return encrypt_record(self._key, record_id, kind, payload)

    def _open_row(self, record_id: str, kind: str, created: float, sealed: bytes) -> Record:
        payload = json.loads(decrypt_record(self._key, record_id, kind, sealed))
        return Record(record_id, kind, created, payload["tags"], payload["fields"])

    # ------------------------------------------------------------------ adding

    def _add(self, kind: str, fields: dict[str, Any], tags: Iterable[str]) -> str:
        try:
            kind, fields, clean_tags = _validated(kind, fields, tags if isinstance(tags, str) else list(tags))
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
            key_id = self._key_id
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
        placed: dict[str, tuple[str, str | None]] = {}
        for item in items:
            if item.prompt not in placed:
                placed[item.prompt] = place_preferences(item.prompt, None, self.stated_preferences(item.prompt), where)
        return [replace(item, prompt=placed[item.prompt][0], system=placed[item.prompt][1]) for item in items]

    def preference_pairs(self) -> list[PreferencePair]:
        """DPO pairs: explicit pairs, edits (edited over original), and ratings of one prompt ranked pairwise.

        A rating-derived pair's ``source_id`` is ``"<higher id>><lower id>"``.
        """
        pairs: list[PreferencePair] = []
        ratings: dict[str, list[Record]] = {}
        for r in self.records():
            f = r.fields
            if r.kind == "pair" and f["chosen"] != f["rejected"]:
                pairs.append(PreferencePair(f["prompt"], f["chosen"], f["rejected"], r.id))
            elif r.kind == "edit" and f["edited"] != f["response"]:
                pairs.append(PreferencePair(f["prompt"], f["edited"], f["response"], r.id))
            elif r.kind == "rating":
                ratings.setdefault(f["prompt"], []).append(r)
        for prompt, rated in ratings.items():
            for i, a in enumerate(rated):
                for b in rated[i + 1 :]:
                    hi, lo = (a, b) if a.fields["score"] > b.fields["score"] else (b, a)
                    if hi.fields["score"] != lo.fields["score"] and hi.fields["response"] != lo.fields["response"]:
                        pairs.append(
                            PreferencePair(prompt, hi.fields["response"], lo.fields["response"], f"{hi.id}>{lo.id}")
                        )
        return pairs

    def sft_examples(self) -> list[SFTExample]:
        """SFT targets: chosen answers, edited answers, and responses rated 4 or 5 (duplicates dropped).

        Turns are left out: they are the model's own outputs and carry no judgement.
        """
        examples: list[SFTExample] = []
        seen: set[tuple[str, str]] = set()
        for r in self.records():
            f = r.fields
            if r.kind == "pair":
                target = f["chosen"]
            elif r.kind == "edit":
                target = f["edited"]
            elif r.kind == "rating" and f["score"] >= SFT_MIN_SCORE:
                target = f["response"]
            else:
                continue
            if (f["prompt"], target) not in seen:
                seen.add((f["prompt"], target))
                examples.append(SFTExample(f["prompt"], target, r.id))
        return examples

    # ------------------------------------------------------------------ import / export

    @staticmethod
    def _parse_line(raw: bytes, seen_ids: set[str]) -> tuple[str | None, str, float | None, dict, list]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        if "kind" not in obj:
            raise ValueError("missing 'kind'")
        obj = dict(obj)
        kind = obj.pop("kind")
        tags = obj.pop("tags", [])
        record_id = obj.pop("id", None)
        created = obj.pop("created", None)
        if record_id is not None:
            if not isinstance(record_id, str) or not record_id or len(record_id) > _MAX_ID_CHARS:
                raise ValueError(f"'id' must be a non-empty string of at most {_MAX_ID_CHARS} characters")
            _check_text("id", record_id)
            if record_id in seen_ids:
                raise ValueError(f"id {record_id!r} appears twice in this file")
            seen_ids.add(record_id)
        if created is not None and (
            isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created)
        ):
            raise ValueError("'created' must be a finite number (epoch seconds)")
        kind, fields, tags = _validated(kind, obj, tags)
        return record_id, kind, None if created is None else float(created), fields, tags

    @classmethod
    def parse_jsonl(cls, path: Path | str) -> list[ParsedRecord]:
        """Read and check every line of a JSONL file without touching any memory.

        Blank lines are skipped and a UTF-8 byte order mark (as some editors write) is
        allowed; any bad line raises a ``FedpalError`` naming its number.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise FedpalError(f"cannot read {path}: {err.strerror}") from None
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8) :]
        parsed = []
        seen_ids: set[str] = set()
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                parsed.append(ParsedRecord(number, *cls._parse_line(raw.rstrip(b"\r"), seen_ids)))
            except ValueError as err:
                raise FedpalError(f"{path}:{number}: {err} (nothing was imported)") from None
        return parsed

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
        text = "".join(json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records)
        write_atomic(path, text.encode("utf-8"), 0o600)
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
        new_key, new_key_id = new_data_key(), uuid.uuid4().hex
        new_label = f"{self._store_id}:{new_key_id}"
        with self._transaction(write=True) as conn:
            old_label = f"{self._store_id}:{self._key_id}"
            count = conn.execute("DELETE FROM records").rowcount
            updates = {"key_id": new_key_id}
            if self._key_source == "keyring":
                keyring_store_key(new_label, new_key)
                updates["key_check"] = seal_key_check(new_key, new_label).hex()
            else:
                assert self._wrapping_key is not None and self._kdf is not None
                updates["wrapped_key"] = wrap_data_key(self._wrapping_key, new_key, self._store_id, self._kdf).hex()
            conn.executemany("UPDATE meta SET value = ? WHERE name = ?", [(v, k) for k, v in updates.items()])
        self._key, self._key_id = new_key, new_key_id
        if self._key_source == "keyring":
            keyring_delete_key(old_label)
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
        self._key = b""
        self._wrapping_key = None
        self._snapshot = None
        self._opened = {}

    def __enter__(self) -> "PreferenceMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PreferenceMemory({str(self.path)!r}, key in {self._key_source})"


def records_as_json(records: Sequence[Record]) -> str:
    """A JSON array of records in their JSONL form (what ``--json`` prints)."""
    return json.dumps([r.to_json() for r in records], ensure_ascii=False, indent=2)


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
