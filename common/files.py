"""Writing folders so that readers never see half of one."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` that replaces it in one rename on success.

    A crash leaves only a hidden staging folder, never a half-written ``target``. With
    ``keep_existing`` a ``target`` that another process finished meanwhile wins (for
    deterministic content, such as the tiny model of a given seed).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            if keep_existing:
                return
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
