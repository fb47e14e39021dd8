"""Writing files and folders so that readers never see half of one."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpal.common.errors import FedpalError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
STALE_STAGING_S = 3600
"""A staging folder this old was left by a writer that was killed (a save takes seconds)."""


@contextmanager
def staged_folder(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` that replaces it in one step on success.

    The staged files are flushed to disk, then the staging folder and an existing
    ``target`` swap places in one ``renameat2(RENAME_EXCHANGE)``: a crash or power loss at
    any moment leaves the old ``target`` or the new one, complete, and a reader never
    finds it missing; what is left over is only a hidden staging folder. Where the
    exchange is not available the old folder is moved aside first, so a crash between the
    two renames leaves it, complete, in a hidden folder beside ``target``. With
    ``keep_existing`` a ``target`` that another process finished meanwhile wins (for
    deterministic content, such as the tiny model of a given seed).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists() and keep_existing:
            return
        _flush(staging)
        if not target.exists():
            staging.rename(target)
        elif not _exchange(staging, target):
            aside = staging.with_name(f"{staging.name}-old")
            target.rename(aside)
            staging.rename(target)
            shutil.rmtree(aside)
        _flush_folder(target.parent)
        _sweep_stale(target)
    finally:
        # after an exchange the staging path holds the old folder
        shutil.rmtree(staging, ignore_errors=True)


def set_aside(target: Path) -> Path | None:
    """The old folder a writer killed between :func:`staged_folder`'s two renames left beside
    ``target`` (only where the one-step exchange is not available), newest first; None if none."""
    asides = sorted(target.parent.glob(f".{target.name}-*-old"), key=lambda p: p.stat().st_mtime, reverse=True)
    return asides[0] if asides else None


def _sweep_stale(target: Path) -> None:
    """Remove staging folders of ``target`` left by killed writers (hidden, so ``ls`` never shows
    them, but a backup would carry them). A live writer's folder is minutes old at most."""
    cutoff = time.time() - STALE_STAGING_S
    for leftover in target.parent.glob(f".{target.name}-*"):
        try:
            if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass  # another writer swept it first


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _flush(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves, so a rename never publishes empty files."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _flush_folder(Path(root))


def _flush_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str, mode: int = 0o644) -> Iterator[Path]:
    """A temporary file name beside ``path`` for a writer that wants a name (``torch.save``, ONNX
    Runtime's adapter export, ``numpy.savez``); it is renamed over ``path`` when the block ends
    without error and removed otherwise. ``mode`` is set before the rename.

    Readers see the old file or the new one, never a mix; the temporary name is unique, so
    two writers never share it. A failed write is one line (``cannot write PATH: why``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.chmod(tmp, mode)
        tmp.replace(path)
    except OSError as err:
        raise FedpalError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` whole or not at all (see :func:`atomic_path`), flushed to disk, with ``mode``
    from the start: a private key is never readable by others, not even for a moment."""
    with atomic_path(path, mode) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
