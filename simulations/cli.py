"""``fedpal simulate``: the federated personalization experiment with simulated users."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import typer


def simulate(
    out: Path = typer.Option(..., "--out", help="Folder for results.json, report.md and the PNG plots."),
    preset: str = typer.Option("quick", help="quick (tiny model, < 2 min), default (SmolLM2-135M, 8 users), large (GPU or cluster)."),
    config: Path = typer.Option(None, "--config", help="TOML or JSON file overriding preset settings (see fedpal.simulations.config)."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the summary table."),
) -> None:
    """Simulate users with known preferences, federate their adapters, score every baseline."""
    import warnings

    from fedpal.simulations.config import load_config
    from fedpal.simulations.runner import BASELINE_LABELS, simulate as run

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = load_config(preset, config)
    with _progress() as progress:
        results = run(settings, out, progress)
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedpal simulate --preset {settings.preset}: {results['users']} users, {results['rounds']} rounds, "
                        f"epsilon {_fmt(results['epsilon'])} at delta {results['delta']}")
    for column in ("baseline", "mean utility", "win rate vs base", "worst user"):
        table.add_column(column)
    for name, row in results["baselines"].items():
        table.add_row(BASELINE_LABELS.get(name, name), f"{row['mean_utility']:.3f}", f"{row['win_rate_vs_base']:.0%}",
                      f"{row['worst_user_utility']:.3f}")
    console = Console()
    console.print(table)
    console.print(f"own adapters best for {results['cross_user_diagonal_best_fraction']:.0%} of users; "
                  f"{results['bytes_per_client_round']} bytes up per client-round; {results['wall_time_s']} s")
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")


def _fmt(value: float | None) -> str:
    return "off" if value is None else f"{value:.2f}"


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """One rich bar per phase; the runner asks for a bar and gets back its advance function."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bars:

        def phase(description: str, total: int) -> Callable[[], None]:
            task = bars.add_task(description, total=total)
            return lambda: bars.advance(task)

        yield phase
