"""Memory records: the kinds a user's memory holds, their fields, and the checks every record passes.

A record kind is its fields (``KIND_FIELDS``); every way into the memory (the API, a JSONL
import, ``fedpal memory add``) goes through :func:`check_record`'s rules, and
:func:`content_problem` says why a well-formed record would teach nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedpal.common.errors import FedpalError

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "stated": ("text",),
    "pair": ("prompt", "chosen", "rejected"),
    "rating": ("prompt", "response", "score"),
    "edit": ("prompt", "response", "edited"),
    "turn": ("role", "text"),
}
TURN_ROLES = ("system", "user", "assistant", "tool")
MAX_FIELD_CHARS = 100_000
"""Longest text field of a record (prompt, reply, stated preference...): about 25k tokens, far
more than a small model reads, so only a mistake (a pasted file) is refused."""
MAX_TAG_CHARS = 1_000
MAX_TAGS = 100


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

    def summary(self, width: int = 70) -> str:
        """One line saying what the record holds (``fedpal memory list``), cut to ``width``."""
        f = self.fields
        text = {
            "stated": lambda: f["text"],
            "pair": lambda: f"{f['prompt']} => {f['chosen']}  (not: {f['rejected']})",
            "rating": lambda: f"[{f['score']}/5] {f['prompt']} => {f['response']}",
            "edit": lambda: f"{f['prompt']} => {f['edited']}  (was: {f['response']})",
            "turn": lambda: f"{f['role']}: {f['text']}",
        }[self.kind]()
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    def to_json(self) -> dict[str, Any]:
        """The JSONL form used by export, import and ``--json`` (flat: kind, fields, tags, id, created)."""
        return {"kind": self.kind, **self.fields, "tags": list(self.tags), "id": self.id, "created": self.created}


def check_text(name: str, value: Any, limit: int = MAX_FIELD_CHARS) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"'{name}' is not valid Unicode text (lone surrogate)") from None
    if len(value) > limit:
        raise ValueError(f"'{name}' is {len(value):,} characters long; the limit is {limit:,}")
    return value


def validated(kind: Any, fields: dict[str, Any], tags: Any) -> tuple[str, dict[str, Any], list[str]]:
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
            clean[name] = check_text(name, value)
    if kind == "turn" and clean["role"] not in TURN_ROLES:
        raise ValueError(f"'role' must be one of {', '.join(TURN_ROLES)}, got {clean['role']!r}")
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise ValueError("'tags' must be a list of strings")
    if len(tags) > MAX_TAGS:
        raise ValueError(f"a record has at most {MAX_TAGS} tags, not {len(tags)}")
    clean_tags = [check_text("tags", tag, MAX_TAG_CHARS) for tag in tags]
    if any(tag == "" for tag in clean_tags):
        raise ValueError("tags must not be empty strings")
    return kind, clean, clean_tags


def check_record(kind: Any, fields: dict[str, Any], tags: Any = ()) -> None:
    """Raise a ``FedpalError`` saying what is wrong with this record (kind, fields, tags, sizes)."""
    try:
        validated(kind, fields, list(tags) if isinstance(tags, tuple) else tags)
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


def records_as_json(records: Sequence[Record]) -> str:
    """A JSON array of records in their JSONL form (what ``--json`` prints)."""
    return json.dumps([r.to_json() for r in records], ensure_ascii=False, indent=2)
