"""The user's preference memory: one encrypted SQLite file that never leaves the device.

- ``store``: ``PreferenceMemory``, the encrypted SQLite store (transactions, snapshots,
  retrieval, forgetting);
- ``keys``: the data key and how it is kept (passphrase-wrapped or in the OS keyring);
- ``records``: the record kinds, their fields and checks;
- ``training``: records turned into DPO pairs and SFT examples, and stated preferences
  fitted into a request (pure functions);
- ``jsonl``: the JSONL form used by import and export.
"""

from fedpal.client.memory.keys import PASSPHRASE_ENV
from fedpal.client.memory.records import (
    KIND_FIELDS,
    CorruptRecordWarning,
    Record,
    check_record,
    content_problem,
    records_as_json,
)
from fedpal.client.memory.store import PreferenceMemory
from fedpal.client.memory.training import PREFERENCE_MAX_BYTES

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
