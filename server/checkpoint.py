"""Per-round server checkpoints: global adapter, strategy state, privacy ledger, round.

One folder, replaced atomically each round (written next to it, then renamed), so a
server killed at any moment leaves either the previous round's checkpoint or this one,
never half of each. Flower has no checkpointing for ServerApps; this is written here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpal.common.errors import FedpalError

STATE_FILE = "state.json"
GLOBAL_FILE = "global.npz"
STRATEGY_FILE = "strategy.npz"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Everything needed to continue a federation after ``round``."""

    round: int
    global_arrays: list[np.ndarray]
    strategy_state: dict[str, list[np.ndarray]] = field(default_factory=dict)
    accountant_state: dict | None = None
    run_settings: dict = field(default_factory=dict)
    rounds_skipped: int = 0
    round_secret: int | None = None


def save_checkpoint(directory: Path | str, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``directory``, replacing the previous one atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        np.savez(staging / GLOBAL_FILE, *checkpoint.global_arrays)
        flat = {f"{key}/{i}": a for key, arrays in checkpoint.strategy_state.items() for i, a in enumerate(arrays)}
        np.savez(staging / STRATEGY_FILE, **flat)
        state = {
            "format": FORMAT_VERSION,
            "round": checkpoint.round,
            "accountant": checkpoint.accountant_state,
            "run_settings": checkpoint.run_settings,
            "rounds_skipped": checkpoint.rounds_skipped,
            "round_secret": None if checkpoint.round_secret is None else str(checkpoint.round_secret),
            "strategy_keys": {key: len(arrays) for key, arrays in checkpoint.strategy_state.items()},
        }
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_checkpoint(directory: Path | str) -> Checkpoint | None:
    """The checkpoint in ``directory``; None when there is none yet."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        old = directory.with_name(f".{directory.name}.old")
        if (old / STATE_FILE).is_file():  # killed between the two renames of a save
            directory = old
        else:
            return None
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise FedpalError(f"checkpoint {directory} has format {state.get('format')}, expected {FORMAT_VERSION}")
        with np.load(directory / GLOBAL_FILE) as data:
            global_arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
        strategy_state: dict[str, list[np.ndarray]] = {}
        with np.load(directory / STRATEGY_FILE) as data:
            for key, count in state["strategy_keys"].items():
                strategy_state[key] = [data[f"{key}/{i}"] for i in range(count)]
    except (OSError, ValueError, KeyError) as err:
        raise FedpalError(f"corrupt checkpoint in {directory}: {err}") from None
    return Checkpoint(
        round=int(state["round"]),
        global_arrays=global_arrays,
        strategy_state=strategy_state,
        accountant_state=state.get("accountant"),
        run_settings=state.get("run_settings", {}),
        rounds_skipped=int(state.get("rounds_skipped", 0)),
        round_secret=int(state["round_secret"]) if state.get("round_secret") else None,
    )
