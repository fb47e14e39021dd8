"""Encryption at rest for the preference memory: a small API with safe defaults.

Layering follows ``cryptography``'s advice: callers see only ``encrypt_record`` /
``decrypt_record`` and key management helpers; the primitives (AES-256-GCM, Argon2id)
and their parameters are chosen here, once.

- Each record is sealed with AES-256-GCM under a random 256-bit *data key*. The
  associated data binds the record id, its kind and the schema version, so a ciphertext
  moved to another row, relabelled as another kind, or edited in any byte fails to open.
- The data key is never stored in clear. Either it is *wrapped* (AES-256-GCM again) by a
  key derived from the user's passphrase with Argon2id (OWASP minimum: 19 MiB, t=2, p=1),
  or it lives in the OS keyring. Destroying the wrapped key (or the keyring entry)
  shreds every record at once.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from fedpal.common.errors import FedpalError

SCHEMA_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEYRING_SERVICE = "fedpal-memory"


class WrongPassphraseError(FedpalError):
    """The passphrase does not unwrap the memory's data key."""


class CorruptRecordError(FedpalError):
    """One or more records failed authentication (tampered, truncated or misplaced)."""

    def __init__(self, record_ids: list[str]):
        self.record_ids = list(record_ids)
        shown = ", ".join(self.record_ids[:10]) + (" ..." if len(self.record_ids) > 10 else "")
        super().__init__(
            f"{len(self.record_ids)} memory record(s) failed authentication (tampered or truncated): {shown}; "
            "remove them with `fedpal memory forget ID...`"
        )


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters, stored next to the wrapped key so a store always reopens.

    The defaults are OWASP's minimum for Argon2id. Lower values exist only for tests and
    must be asked for explicitly.
    """

    salt: bytes = b""
    memory_cost_kib: int = 19 * 1024
    iterations: int = 2
    lanes: int = 1

    def with_new_salt(self) -> "KdfParams":
        return KdfParams(os.urandom(16), self.memory_cost_kib, self.iterations, self.lanes)

    def to_json(self) -> str:
        data = asdict(self)
        data["salt"] = base64.b64encode(self.salt).decode("ascii")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "KdfParams":
        data = json.loads(text)
        data["salt"] = base64.b64decode(data["salt"])
        return cls(**data)


OWASP_ARGON2ID = KdfParams()


def new_data_key() -> bytes:
    """A fresh random AES-256 key."""
    return AESGCM.generate_key(bit_length=256)


def derive_wrapping_key(passphrase: str, params: KdfParams) -> bytes:
    """Stretch a passphrase into a key-encryption key with Argon2id (deliberately slow)."""
    if not params.salt:
        raise ValueError("KdfParams needs a salt; use params.with_new_salt()")
    kdf = Argon2id(
        salt=params.salt,
        length=KEY_BYTES,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_cost_kib,
    )
    return kdf.derive(passphrase.encode("utf-8"))


def _key_aad(store_id: str, params: KdfParams) -> bytes:
    return json.dumps(["fedpal.memory.data-key", SCHEMA_VERSION, store_id, params.to_json()]).encode()


def wrap_data_key(wrapping_key: bytes, data_key: bytes, store_id: str, params: KdfParams) -> bytes:
    """Seal the data key under the passphrase-derived key, bound to the store and KDF settings."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(wrapping_key).encrypt(nonce, data_key, _key_aad(store_id, params))


def unwrap_data_key(wrapping_key: bytes, wrapped: bytes, store_id: str, params: KdfParams) -> bytes:
    """Open the wrapped data key; a wrong passphrase (or edited key row) raises WrongPassphraseError."""
    try:
        return AESGCM(wrapping_key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _key_aad(store_id, params))
    except (InvalidTag, ValueError):
        raise WrongPassphraseError("wrong passphrase for this preference memory (nothing was changed)") from None


def record_aad(record_id: str, kind: str) -> bytes:
    """Associated data of one record: unambiguous encoding of id, kind and schema version."""
    return json.dumps(["fedpal.memory.record", SCHEMA_VERSION, record_id, kind]).encode("utf-8")


def encrypt_record(key: bytes, record_id: str, kind: str, plaintext: bytes) -> bytes:
    """Seal one record: ``nonce || ciphertext || tag`` with a fresh random 96-bit nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, record_aad(record_id, kind))


def decrypt_record(key: bytes, record_id: str, kind: str, blob: bytes) -> bytes:
    """Open one record; any change to it, its id or its kind raises CorruptRecordError."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CorruptRecordError([record_id])
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], record_aad(record_id, kind))
    except InvalidTag:
        raise CorruptRecordError([record_id]) from None


def keyring_available() -> bool:
    """Whether a real OS keyring backend (not keyring's 'fail' placeholder) is configured."""
    try:
        import keyring
        from keyring.backends import fail

        backend = keyring.get_keyring()
    except Exception:  # noqa: BLE001 - any backend discovery failure means "not available"
        return False
    return not isinstance(backend, fail.Keyring)


def keyring_store_key(entry: str, data_key: bytes) -> None:
    """Keep a data key in the OS keyring under ``entry`` (service ``fedpal-memory``)."""
    import keyring
    from keyring.errors import KeyringError

    if not keyring_available():
        raise FedpalError("no OS keyring is available here; use a passphrase (FEDPAL_PASSPHRASE) instead")
    try:
        keyring.set_password(KEYRING_SERVICE, entry, base64.b64encode(data_key).decode("ascii"))
    except KeyringError as err:
        raise FedpalError(f"could not store the memory key in the OS keyring: {err}") from None


def keyring_load_key(entry: str) -> bytes:
    """Fetch a data key from the OS keyring."""
    import keyring
    from keyring.errors import KeyringError

    if not keyring_available():
        raise FedpalError("this memory keeps its key in the OS keyring, but no keyring is available here")
    try:
        stored = keyring.get_password(KEYRING_SERVICE, entry)
    except KeyringError as err:
        raise FedpalError(f"could not read the memory key from the OS keyring: {err}") from None
    if stored is None:
        raise FedpalError(f"the OS keyring has no key '{entry}' for this memory; its records cannot be opened")
    return base64.b64decode(stored)


def keyring_delete_key(entry: str) -> None:
    """Remove a data key from the OS keyring (no error if it is already gone)."""
    import keyring
    from keyring.errors import KeyringError

    try:
        keyring.delete_password(KEYRING_SERVICE, entry)
    except KeyringError:
        pass


def seal_key_check(data_key: bytes, label: str) -> bytes:
    """A tiny sealed value that proves, on reopening, that a key fetched from elsewhere is the right one."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, b"fedpal", label.encode("utf-8"))


def key_matches(data_key: bytes, label: str, check: bytes) -> bool:
    try:
        AESGCM(data_key).decrypt(check[:NONCE_BYTES], check[NONCE_BYTES:], label.encode("utf-8"))
    except (InvalidTag, ValueError):
        return False
    return True
