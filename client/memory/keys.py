"""The key of a user's memory: a random data key that seals every record, kept either wrapped
by a key derived from the user's passphrase (Argon2id) or in the OS keyring.

The memory's ``meta`` table records which, with what is needed to unwrap or check it; the
key itself is never stored in clear. Forgetting everything replaces the data key, so old
copies of the file can no longer be opened.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from fedpal.client.encryption import (
    SCHEMA_VERSION,
    KdfParams,
    derive_wrapping_key,
    key_matches,
    keyring_delete_key,
    keyring_load_key,
    keyring_store_key,
    new_data_key,
    seal_key_check,
    unwrap_data_key,
    wrap_data_key,
)
from fedpal.common.errors import FedpalError

PASSPHRASE_ENV = "FEDPAL_PASSPHRASE"


def resolve_passphrase(passphrase: str | None, path: Path) -> str:
    """``passphrase``, else ``FEDPAL_PASSPHRASE``; one clear line when there is none."""
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
class MemoryKey:
    """One memory's data key and how it is kept (``source``: passphrase or keyring)."""

    store_id: str
    source: str
    key: bytes
    key_id: str
    wrapping_key: bytes | None = None
    kdf: KdfParams | None = None

    @property
    def label(self) -> str:
        """The key's name in the OS keyring (and the associated data of its check value)."""
        return f"{self.store_id}:{self.key_id}"

    @classmethod
    def create(
        cls, path: Path, passphrase: str | None, use_keyring: bool, kdf: KdfParams
    ) -> tuple["MemoryKey", dict[str, str]]:
        """A new data key for a new memory, and the ``meta`` rows that record it (not yet stored
        anywhere: :meth:`keep` puts a keyring key into the keyring)."""
        store_id, key_id, data_key = uuid.uuid4().hex, uuid.uuid4().hex, new_data_key()
        meta = {"schema_version": str(SCHEMA_VERSION), "store_id": store_id, "key_id": key_id}
        if use_keyring:
            meta["key_source"] = "keyring"
            meta["key_check"] = seal_key_check(data_key, f"{store_id}:{key_id}").hex()
            return cls(store_id, "keyring", data_key, key_id), meta
        params = kdf.with_new_salt()
        wrapping_key = derive_wrapping_key(resolve_passphrase(passphrase, path), params)
        meta["key_source"] = "passphrase"
        meta["kdf"] = params.to_json()
        meta["wrapped_key"] = wrap_data_key(wrapping_key, data_key, store_id, params).hex()
        return cls(store_id, "passphrase", data_key, key_id, wrapping_key, params), meta

    def keep(self) -> None:
        """Put a keyring key into the OS keyring (a passphrase key lives wrapped in ``meta``)."""
        if self.source == "keyring":
            keyring_store_key(self.label, self.key)

    @classmethod
    def unlock(cls, path: Path, meta: dict[str, str], passphrase: str | None) -> "MemoryKey":
        """The data key ``meta`` records, unwrapped with the passphrase or read from the keyring.
        A wrong passphrase raises ``WrongPassphraseError``."""
        version = int(meta.get("schema_version", "0"))
        if version != SCHEMA_VERSION:
            raise FedpalError(f"{path} uses memory schema {version}; this fedpal reads schema {SCHEMA_VERSION}")
        store_id, key_id = meta["store_id"], meta["key_id"]
        if meta["key_source"] == "keyring":
            return cls(store_id, "keyring", _keyring_key(meta), key_id)
        params = KdfParams.from_json(meta["kdf"])
        wrapping_key = derive_wrapping_key(resolve_passphrase(passphrase, path), params)
        data_key = unwrap_data_key(wrapping_key, bytes.fromhex(meta["wrapped_key"]), store_id, params)
        return cls(store_id, "passphrase", data_key, key_id, wrapping_key, params)

    def current(self, meta: dict[str, str]) -> "MemoryKey":
        """The key ``meta`` names now: this one, or the one another process's ``forget everything`` put in."""
        if meta["key_id"] == self.key_id:
            return self
        if self.source == "keyring":
            return replace(self, key=_keyring_key(meta), key_id=meta["key_id"])
        assert self.wrapping_key is not None and self.kdf is not None
        data_key = unwrap_data_key(self.wrapping_key, bytes.fromhex(meta["wrapped_key"]), self.store_id, self.kdf)
        return replace(self, key=data_key, key_id=meta["key_id"])

    def replaced(self) -> tuple["MemoryKey", dict[str, str]]:
        """A new data key for this memory and the ``meta`` updates that record it (a keyring key is
        already in the keyring; :meth:`drop` removes the old one once the updates are committed)."""
        new = replace(self, key=new_data_key(), key_id=uuid.uuid4().hex)
        updates = {"key_id": new.key_id}
        if self.source == "keyring":
            keyring_store_key(new.label, new.key)
            updates["key_check"] = seal_key_check(new.key, new.label).hex()
        else:
            assert self.wrapping_key is not None and self.kdf is not None
            updates["wrapped_key"] = wrap_data_key(self.wrapping_key, new.key, self.store_id, self.kdf).hex()
        return new, updates

    def drop(self) -> None:
        """Remove a replaced keyring key from the OS keyring."""
        if self.source == "keyring":
            keyring_delete_key(self.label)


def _keyring_key(meta: dict[str, str]) -> bytes:
    label = f"{meta['store_id']}:{meta['key_id']}"
    data_key = keyring_load_key(label)
    if not key_matches(data_key, label, bytes.fromhex(meta["key_check"])):
        raise FedpalError("the key in the OS keyring does not open this memory")
    return data_key
