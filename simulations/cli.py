"""``fedpal simulate``: the federated personalization experiment with simulated users."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

import typer

from fedpal.common.errors import FedpalError

Preset = Enum("Preset", {name: name for name in ("quick", "default", "large")}, type=str)


def simulate(
    out: Path = typer.Option(..., "--out", help="Folder for results.json, report.md and the PNG plots."),
    preset: Preset = typer.Option(
        "quick", help="quick (tiny model, < 2 min), default (SmolLM2-135M, 8 users), large (GPU or cluster)."
    ),
    config: Path = typer.Option(
        None, "--config", help="TOML or JSON file overriding preset settings (see fedpal.simulations.config)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the summary table."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs (else in OUT/flwr-run.log)."),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Run on this Ray cluster (HOST:PORT of `ray start --head`)."
    ),
) -> None:
    """Simulate users with known preferences, federate their adapters, score every baseline.

    The whole experiment is one Flower app, run with `flwr run` on a local simulation
    SuperLink: each user on its own virtual SuperNode."""
    import warnings

    from fedpal.simulations.config import load_config
    from fedpal.simulations.experiment.results import BASELINE_LABELS
    from fedpal.simulations.runner import simulate as run

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = load_config(getattr(preset, "value", preset), config)
    _check_before_running(settings, out)
    with progress_bars() as progress:
        results = run(settings, out, progress, verbose=verbose, ray_address=ray_address)
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"fedpal simulate --preset {settings.preset}: {results['users']} users, {results['rounds']} rounds, "
        f"epsilon {_fmt(results['epsilon'])} at delta {results['delta']}"
    )
    for column in ("baseline", "mean utility", "win rate vs base", "worst user"):
        table.add_column(column)
    for name, row in results["baselines"].items():
        table.add_row(
            BASELINE_LABELS.get(name, name),
            f"{row['mean_utility']:.3f}",
            f"{row['win_rate_vs_base']:.0%}",
            f"{row['worst_user_utility']:.3f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"own adapters best for {results['cross_user_diagonal_best_fraction']:.0%} of users; "
        f"{results['bytes_per_client_round']} bytes up per client-round; {results['wall_time_s']} s"
    )
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")


def _check_before_running(settings, out: Path) -> None:
    """Everything the run would trip over later, checked before candidates or homes are written.

    The federation's run config is built and checked exactly as the run will build it,
    and a local model folder is looked up; a hub id is left to the run.
    """
    from fedpal.common.models import DEFAULT, TINY, resolve_model_path

    if out.exists() and not out.is_dir():
        raise FedpalError(f"--out {out} is a file; name a folder for the results")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise FedpalError(f"cannot write under {ancestor}: choose another --out")
    settings.federation(out)
    if settings.model not in (DEFAULT, TINY) and (
        Path(settings.model).expanduser().exists() or settings.model.count("/") != 1
    ):
        resolve_model_path(settings.model)


def _fmt(value: float | None) -> str:
    return "off" if value is None else f"{value:.2f}"


@contextlib.contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """One rich bar per phase; the launcher asks for a bar and gets back its advance function."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # on stderr, so that stdout holds only the summary or, with --json, one JSON document
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bars:

        def phase(description: str, total: int) -> Callable[[], None]:
            task = bars.add_task(description, total=total)
            return lambda: bars.advance(task)

        yield phase
