"""An encrypted backup of one user's home, and its restore on this or another machine.

A home's memory is encrypted already, but its adapters are not, and they were trained on
the user's preferences (LoRA updates leak what they learned). So a backup is one file
sealed as a whole: a gzip'd tar of the memory (a consistent SQLite snapshot, taken with
SQLite's backup API so a running chat cannot tear it), the trained adapters, the adapters
kept aside and the export record; AES-256-GCM under a key stretched from the memory's
passphrase with Argon2id (the memory's own primitives and parameters, a fresh salt per
backup). Derived files (converted runtime adapters, training checkpoints) are left out:
they are rebuilt on demand.

File layout: ``MAGIC``, one JSON header line (format, KDF parameters), a 12-byte nonce,
then the sealed archive; the magic and header are the associated data, so no byte of the
file can change without the restore failing.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedpal.client.encryption import NONCE_BYTES, OWASP_ARGON2ID, KdfParams, derive_wrapping_key
from fedpal.client.home import EXPORT_RECORD, ClientHome
from fedpal.common.files import staged_folder, write_atomic
from fedpal.common.errors import FedpalError

MAGIC = b"fedpal home backup\n"
FORMAT = 1
FOLDERS = ("adapters", "kept-aside")
"""Folders of the home that a backup carries whole (besides the memory and the export record)."""
_MEMORY = "memory.sqlite"
_RECORD = f"runtime/{EXPORT_RECORD}"


@dataclass(frozen=True)
class BackupSummary:
    """What a backup holds: how many files, whether a memory, and the sealed size."""

    file: str
    files: int
    memory: bool
    bytes: int


def write_backup(client: ClientHome, out: Path, passphrase: str, kdf: KdfParams = OWASP_ARGON2ID) -> BackupSummary:
    """Seal ``client``'s home into ``out`` (mode 0600, written whole or not at all)."""
    archive = io.BytesIO()
    count = 0
    has_memory = client.memory_db.is_file()
    with (
        tempfile.TemporaryDirectory(prefix="fedpal-backup-") as scratch,
        tarfile.open(fileobj=archive, mode="w:gz") as tar,
    ):
        if has_memory:
            snapshot = Path(scratch) / _MEMORY
            _copy_database(client.memory_db, snapshot)
            tar.add(snapshot, arcname=_MEMORY)
            count += 1
        record = client.runtime / EXPORT_RECORD
        if record.is_file():
            tar.add(record, arcname=_RECORD)
            count += 1
        for folder in FOLDERS:
            for path in sorted((client.root / folder).rglob("*")):
                if path.is_file() and not path.is_symlink():
                    tar.add(path, arcname=str(path.relative_to(client.root)))
                    count += 1
    if count == 0:
        raise FedpalError(f"{client.root} holds nothing to back up (no memory, adapters or export record)")
    params = kdf.with_new_salt()
    header = json.dumps({"format": FORMAT, "kdf": params.to_json(), "created": time.time()}).encode() + b"\n"
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(derive_wrapping_key(passphrase, params)).encrypt(nonce, archive.getvalue(), MAGIC + header)
    data = MAGIC + header + nonce + sealed
    write_atomic(out, data, 0o600)
    return BackupSummary(str(out), count, has_memory, len(data))


def restore_backup(backup: Path, target: ClientHome, passphrase: str) -> BackupSummary:
    """Unseal ``backup`` into the new home ``target`` (which must not exist, or be an empty folder).

    The archive is opened and checked entirely in a staging folder beside ``target``,
    which takes its place in one rename: a wrong passphrase, a damaged file or a hostile
    archive leaves nothing behind.
    """
    if target.root.exists() and (not target.root.is_dir() or any(target.root.iterdir())):
        raise FedpalError(f"{target.root} exists and is not an empty folder: restore into a new home, never over one")
    payload = _open_sealed(backup, passphrase)
    try:
        tar = tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz")
    except tarfile.TarError as err:
        raise FedpalError(f"{backup} holds no readable archive ({err})") from None
    with tar:
        members = tar.getmembers()
        for member in members:
            _check_member(member, backup)
        with staged_folder(target.root) as staging:  # the (empty) target is replaced only by a checked home
            # The members were checked above; the "data" filter (Python >= 3.11.4) refuses links and modes too.
            tar.extractall(staging, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            if (staging / _MEMORY).is_file():
                _check_memory_opens(staging, passphrase)
    files = sum(1 for m in members if m.isfile())
    return BackupSummary(str(backup), files, any(m.name == _MEMORY for m in members), backup.stat().st_size)


def _check_memory_opens(folder: Path, passphrase: str) -> None:
    from fedpal.client.memory import PreferenceMemory

    with PreferenceMemory.open(folder, passphrase) as memory:
        if memory.verify():
            raise FedpalError("the memory in the backup has records that fail authentication (nothing was restored)")


def _open_sealed(backup: Path, passphrase: str) -> bytes:
    try:
        data = backup.read_bytes()
    except OSError as err:
        raise FedpalError(f"cannot read {backup}: {err.strerror}") from None
    if not data.startswith(MAGIC):
        raise FedpalError(f"{backup} is not a fedpal home backup")
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC) : end])
        params = KdfParams.from_json(header["kdf"])
        if header["format"] != FORMAT:
            raise FedpalError(f"{backup} is backup format {header['format']}; this fedpal reads format {FORMAT}")
    except (ValueError, KeyError, TypeError):
        raise FedpalError(f"{backup} has a damaged header: not a readable fedpal home backup") from None
    body = data[end + 1 :]
    try:
        return AESGCM(derive_wrapping_key(passphrase, params)).decrypt(
            body[:NONCE_BYTES], body[NONCE_BYTES:], data[: end + 1]
        )
    except (InvalidTag, ValueError):
        raise FedpalError(f"wrong passphrase for {backup}, or the file is damaged (nothing was restored)") from None


def _check_member(member: tarfile.TarInfo, backup: Path) -> None:
    """Only the files a backup writes, as plain files and folders under the home: anything else means tampering."""
    path = PurePosixPath(member.name)
    allowed = member.name in (_MEMORY, _RECORD, "runtime") or (path.parts and path.parts[0] in FOLDERS)
    if path.is_absolute() or ".." in path.parts or not allowed or not (member.isfile() or member.isdir()):
        raise FedpalError(f"{backup} holds an unexpected entry '{member.name}'; refusing to restore it")


def _copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (another process may be writing)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    except sqlite3.DatabaseError as err:
        raise FedpalError(f"{source} is not a readable fedpal memory ({err})") from None
    finally:
        src.close()
        dst.close()
