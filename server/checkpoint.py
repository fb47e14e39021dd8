"""Per-round server checkpoints: global adapter, strategy state, privacy ledger, round.

One folder, replaced atomically each round (``fedpal.common.files.staged_folder``), so a
server killed at any moment leaves either the previous round's checkpoint or this one,
never half of each. Flower has no checkpointing for ServerApps; this is written here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpal.common.errors import FedpalError
from fedpal.common.files import set_aside, staged_folder

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
    global_names: tuple[str, ...] = ()
    """The global adapter's tensor names (peft's), in the order of ``global_arrays``."""

    def global_adapter(self) -> dict[str, np.ndarray]:
        """The global adapter, tensors by name."""
        if len(self.global_names) != len(self.global_arrays):
            raise FedpalError("this checkpoint does not name its global adapter's tensors (an older fedpal wrote it)")
        return dict(zip(self.global_names, self.global_arrays))


def save_checkpoint(directory: Path | str, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``directory``, replacing the previous one atomically."""
    directory = Path(directory)
    with staged_folder(directory) as staging:
        names = checkpoint.global_names or [f"arr_{i}" for i in range(len(checkpoint.global_arrays))]
        np.savez(staging / GLOBAL_FILE, **dict(zip(names, checkpoint.global_arrays)))
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
    return directory


def load_checkpoint(directory: Path | str) -> Checkpoint | None:
    """The checkpoint in ``directory``; None when there is none yet."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        old = set_aside(directory)
        if old is not None and (old / STATE_FILE).is_file():  # killed between the two renames of a save
            directory = old
        else:
            return None
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise FedpalError(f"checkpoint {directory} has format {state.get('format')}, expected {FORMAT_VERSION}")
        with np.load(directory / GLOBAL_FILE) as data:
            global_names = tuple(data.files)
            global_arrays = [data[name] for name in global_names]
        if global_names == tuple(f"arr_{i}" for i in range(len(global_names))):
            global_names = ()  # written without names (tests, or an older fedpal)
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
        global_names=global_names,
    )
