"""The files of one client (one user) under its home directory.

Everything personal stays here: the encrypted memory, the personal adapter, training
checkpoints. Only the shared adapter's update ever leaves, and not from this folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpal.common.errors import FedpalError

if TYPE_CHECKING:
    from fedpal.common.adapters import AdapterConfig

EXPORT_RECORD = "export.json"
HOME_ENV = "FEDPAL_USER_HOME"
"""Where the commands look for the home when ``--home`` is not given."""
HOME_ENTRIES = ("memory.sqlite", "adapters", "runtime", "training", "kept-aside")
"""What a folder holds once fedpal has used it as a home (any one of them makes it one)."""
CREATE_HINT = "`fedpal memory add --home {root} ...` or `fedpal memory import --home {root} FILE` creates one"


def home_path(root: Path | str | None) -> Path:
    """``--home`` as an absolute path; an empty value (which would mean the current folder) is refused."""
    if root is None or not str(root).strip():
        raise FedpalError(f"--home is empty: name the home folder (or set {HOME_ENV})")
    return Path(str(root)).expanduser().resolve()


@dataclass(frozen=True)
class ClientHome:
    """Paths inside a client's home directory (created on first use)."""

    root: Path

    @classmethod
    def at(cls, root: Path | str) -> "ClientHome":
        path = Path(root).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def existing(cls, root: Path | str | None) -> "ClientHome":
        """The home at ``root``, which must already be one; creates nothing.

        A mistyped ``--home`` must not become a new, empty home that silently answers
        without the user's adapters or binds a new memory to whatever passphrase is set.
        """
        path = home_path(root)
        if not path.exists():
            raise FedpalError(f"no fedpal home at {path}; {CREATE_HINT.format(root=path)}")
        if not path.is_dir():
            raise FedpalError(f"{path} is a file, not a fedpal home folder")
        if not os.access(path, os.R_OK | os.X_OK):
            raise FedpalError(f"cannot read the fedpal home {path}: permission denied")
        if not any((path / entry).exists() for entry in HOME_ENTRIES):
            raise FedpalError(
                f"{path} is not a fedpal home (no memory, adapters or export in it); {CREATE_HINT.format(root=path)}"
            )
        return cls(path)

    @classmethod
    def planned(cls, root: Path | str | None) -> "ClientHome":
        """The home at ``root``, existing or to be created by :meth:`create`; checks that it can be.

        Nothing is created here, so a command can check all its other input first.
        """
        path = home_path(root)
        if path.exists() and not path.is_dir():
            raise FedpalError(f"{path} is a file, not a fedpal home folder")
        ancestor = path
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise FedpalError(f"cannot create the fedpal home {path}: {ancestor} is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise FedpalError(f"cannot write to {ancestor}: permission denied")
        return cls(path)

    def create(self) -> Path | None:
        """Create the home's folder (and missing parents); returns the top-most folder created, None if it existed."""
        top = None
        for folder in [self.root, *self.root.parents]:
            if folder.exists():
                break
            top = folder
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FedpalError(f"cannot create the fedpal home {self.root}: {err.strerror}") from None
        return top

    def writable(self) -> "ClientHome":
        """This home, checked to accept new files (adapters, the export record, the memory)."""
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise FedpalError(f"cannot write to the fedpal home {self.root}: permission denied")
        return self

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

    def saved_adapter_config(self) -> "AdapterConfig | None":
        """The LoRA settings of an adapter already in this home (new ones must match them), or None."""
        from fedpal.common.adapters import ADAPTER_NAMES, FEDPAL_FILE, AdapterConfig

        for name in ADAPTER_NAMES:
            path = self.adapter_dir(name) / FEDPAL_FILE
            if path.is_file():
                try:
                    return AdapterConfig.from_dict(json.loads(path.read_text()))
                except (ValueError, TypeError) as err:
                    raise FedpalError(f"corrupt adapter settings {path}: {err}") from None
        return None

    def adapter_config(self, rank: int | None = None) -> "AdapterConfig":
        """The LoRA settings this home trains with: its saved adapters', else new ones of ``rank``;
        a ``rank`` other than the saved adapters' is refused (they are merged with each other)."""
        from fedpal.common.adapters import AdapterConfig

        saved = self.saved_adapter_config()
        if saved is None:
            return AdapterConfig.for_rank(rank)
        if rank is not None and saved.rank != rank:
            raise FedpalError(
                f"--rank {rank} cannot apply: the adapters in {self.root} have rank {saved.rank} and "
                f"new ones must match them (leave --rank out, or move {self.adapters} away to start over)"
            )
        return saved

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
        from fedpal.common.files import write_atomic

        record = {"model": model, "precision": precision, "max_rank": max_rank, "provider": provider, "key": key}
        write_atomic(self.runtime / EXPORT_RECORD, json.dumps(record, indent=2).encode())
