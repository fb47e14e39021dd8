"""The memory's JSONL form: one record per line (``kind``, its fields, ``tags``, and ``id`` and
``created`` when it came from an export), read and checked whole before anything is stored."""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpal.client.memory.records import Record, check_text, validated
from fedpal.common.errors import FedpalError

MAX_ID_CHARS = 200


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


def parse_line(raw: bytes, seen_ids: set[str]) -> tuple[str | None, str, float | None, dict, list]:
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
        if not isinstance(record_id, str) or not record_id or len(record_id) > MAX_ID_CHARS:
            raise ValueError(f"'id' must be a non-empty string of at most {MAX_ID_CHARS} characters")
        check_text("id", record_id)
        if record_id in seen_ids:
            raise ValueError(f"id {record_id!r} appears twice in this file")
        seen_ids.add(record_id)
    if created is not None and (
        isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created)
    ):
        raise ValueError("'created' must be a finite number (epoch seconds)")
    kind, fields, tags = validated(kind, obj, tags)
    return record_id, kind, None if created is None else float(created), fields, tags


def parse_jsonl(path: Path | str) -> list[ParsedRecord]:
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
            parsed.append(ParsedRecord(number, *parse_line(raw.rstrip(b"\r"), seen_ids)))
        except ValueError as err:
            raise FedpalError(f"{path}:{number}: {err} (nothing was imported)") from None
    return parsed


def records_to_jsonl(records: list[Record]) -> str:
    """The JSONL text of ``records`` (what ``export_jsonl`` writes and ``parse_jsonl`` reads back)."""
    return "".join(json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records)
