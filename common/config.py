"""Where fedpal keeps its files."""

from __future__ import annotations

import os
from pathlib import Path


def fedpal_home() -> Path:
    """The cache root (``FEDPAL_HOME``, default ``~/.cache/fedpal``): converted models, exports."""
    root = os.environ.get("FEDPAL_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fedpal"
