"""The files of one client (one user) under its home directory.

Everything personal stays here: the encrypted memory, the personal adapter, training
checkpoints. Only the shared adapter's update ever leaves, and not from this folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientHome:
    """Paths inside a client's home directory (created on first use)."""

    root: Path

    @classmethod
    def at(cls, root: Path | str) -> "ClientHome":
        path = Path(root).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def memory_db(self) -> Path:
        return self.root / "memory.sqlite"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    def adapter_dir(self, name: str) -> Path:
        """Saved peft folder of adapter ``name`` ('shared' or 'personal')."""
        return self.adapters / name

    @property
    def training(self) -> Path:
        """Resumable training checkpoints."""
        return self.root / "training"

    @property
    def runtime(self) -> Path:
        """ONNX Runtime adapter files converted from the peft adapters."""
        return self.root / "runtime"
