"""A population run as one ``flwr run`` (``fedpal.simulations.engine``), and what it left behind."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpal.common.errors import FedpalError
from fedpal.server.federation import METRICS_FILE
from fedpal.simulations.engine import Progress, check_ray_address, flwr_run, write_app
from fedpal.simulations.population.server_app import EVALUATION_FILE
from fedpal.simulations.population.settings import PopulationConfig

APP_COMPONENTS = {
    "serverapp": "fedpal.simulations.population.server_app:app",
    "clientapp": "fedpal.simulations.population.client_app:app",
}


@dataclass(frozen=True)
class PopulationRun:
    """What one run left behind: its folders, timings and peak memory."""

    out: Path
    run_dir: Path
    wall_seconds: float
    peak_memory_bytes: int

    def metrics(self) -> list[dict[str, Any]]:
        from fedpal.server.cli import read_metrics

        return read_metrics(self.run_dir)[0]

    def evaluation(self) -> dict[str, Any]:
        path = self.run_dir / EVALUATION_FILE
        if not path.is_file():
            raise FedpalError(
                f"the run ended without scoring the adapter ({path} missing); see {self.out / 'flwr-run.log'}"
            )
        return json.loads(path.read_text())


def run_population(
    config: PopulationConfig,
    out: Path,
    progress: Progress | None = None,
    *,
    verbose: bool = False,
    ray_address: str | None = None,
) -> PopulationRun:
    """Run ``config`` as one ``flwr run`` on a fresh simulation SuperLink; returns the finished run."""
    if ray_address:
        check_ray_address(ray_address)
    out = Path(out).resolve()
    run_dir, homes = out / "run", out / "users"
    for stale in (run_dir / METRICS_FILE, run_dir / EVALUATION_FILE):
        stale.unlink(missing_ok=True)
    app = write_app(out / "app", "fedpal-population", APP_COMPONENTS, config.run_config(run_dir, homes))
    advance = (progress or (lambda d, t: lambda: None))(
        f"{config.users} users, {config.rounds} rounds (flwr run)", config.rounds + 1
    )
    reported = [0]

    def follow() -> None:
        done = _rounds_logged(run_dir)
        for _ in range(done - reported[0]):
            advance()
        reported[0] = max(reported[0], done)

    wall, peak = flwr_run(app, config.federation_config(), out, follow, verbose=verbose, ray_address=ray_address)
    finished = PopulationRun(out, run_dir, wall, peak)
    finished.evaluation()  # raises when the ServerApp failed before scoring
    for _ in range(config.rounds + 1 - reported[0]):
        advance()
    return finished


def _rounds_logged(run_dir: Path) -> int:
    """Rounds the server has written so far (a line still being written is not counted)."""
    from fedpal.server.cli import read_metrics

    return len(read_metrics(run_dir)[0]) if (run_dir / METRICS_FILE).is_file() else 0
