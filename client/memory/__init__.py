"""The user's preference memory: one encrypted SQLite file that never leaves the device.

- ``store``: ``PreferenceMemory``, the encrypted SQLite store (transactions, snapshots,
  retrieval, forgetting);
- ``keys``: the data key and how it is kept (passphrase-wrapped or in the OS keyring);
- ``records``: the record kinds, their fields and checks;
- ``training``: records turned into DPO pairs and SFT examples, and stated preferences
  fitted into a request (pure functions);
- ``jsonl``: the JSONL form used by import and export.
"""

from importlib import import_module
from typing import Any

from fedpal.client.memory.records import (
    KIND_FIELDS,
    CorruptRecordWarning,
    Record,
    check_record,
    content_problem,
    records_as_json,
)

_LAZY = {"PreferenceMemory": "store", "PASSPHRASE_ENV": "keys", "PREFERENCE_MAX_BYTES": "training"}
"""Loaded on first use: the store pulls in SQLite, the cipher and the ranker, which a command
that only names record kinds (``fedpal memory --help``) should not pay for."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KIND_FIELDS",
    "PASSPHRASE_ENV",
    "PREFERENCE_MAX_BYTES",
    "CorruptRecordWarning",
    "PreferenceMemory",
    "Record",
    "check_record",
    "content_problem",
    "records_as_json",
]
