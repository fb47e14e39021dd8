"""The files of one client (one user) under its home directory.

Everything personal stays here: the encrypted memory, the personal adapter, training
checkpoints. Only the shared adapter's update ever leaves, and not from this folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedpal.common.errors import FedpalError

EXPORT_RECORD = "export.json"


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

    def kept_aside(self, name: str) -> Path:
        """Where a trained adapter goes that was not activated (worse, or degenerate)."""
        return self.root / "kept-aside" / name

    @property
    def training(self) -> Path:
        """Resumable training checkpoints."""
        return self.root / "training"

    @property
    def runtime(self) -> Path:
        """ONNX Runtime adapter files converted from the peft adapters."""
        return self.root / "runtime"

    def adapter_targets(self) -> tuple[str, ...] | None:
        """The LoRA target modules of the saved adapters (None: none saved, fedpal's defaults apply)."""
        targets: set[str] = set()
        for folder in (self.adapters / "shared", self.adapters / "personal"):
            config = folder / "adapter_config.json"
            if config.is_file():
                try:
                    targets.update(json.loads(config.read_text()).get("target_modules") or [])
                except ValueError:
                    raise FedpalError(f"corrupt adapter config {config}") from None
        return tuple(sorted(targets)) or None

    def export_record(self) -> dict | None:
        """Which ONNX export this user answers with (``fedpal export`` records it), or None."""
        path = self.runtime / EXPORT_RECORD
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise FedpalError(f"corrupt {path}; run: fedpal export --home {self.root}") from None

    def record_export(self, model: str, precision: str, max_rank: int, provider: str, key: str) -> None:
        """Remember the export this user answers with (written whole, replacing any earlier one)."""
        self.runtime.mkdir(parents=True, exist_ok=True)
        record = {"model": model, "precision": precision, "max_rank": max_rank, "provider": provider, "key": key}
        tmp = self.runtime / (EXPORT_RECORD + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.runtime / EXPORT_RECORD)
