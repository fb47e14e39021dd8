"""``fedpal population``: many simulated users as one Flower app (``run``), and where DP stops hurting (``study``)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from fedpal.common.cli import CONTEXT
from fedpal.common.errors import FedpalError

app = typer.Typer(
    help="Population-scale simulations: one Flower app per run, on Flower's Simulation Engine.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)

Preset = Enum("Preset", {name: name for name in ("quick", "p100", "p300", "p1000")}, type=str)
Study = Enum("Study", {name: name for name in ("quick", "default")}, type=str)


def _settings(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise FedpalError(f"--set takes name=value, not {pair!r}")
        values[name.strip().replace("-", "_")] = value.strip()
    return values


def _writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FedpalError(f"--out {out} is a file; name a folder for the results")


@app.command()
def run(
    out: Path = typer.Option(..., "--out", help="Folder for results.json, the run folder and the users' homes."),
    preset: Preset = typer.Option(
        "quick", help="quick (12 users, ~40 s), p100, p300, p1000 (1000 users, ~3.5 min on 2 cores)."
    ),
    setting: list[str] = typer.Option(
        [], "--set", help="Any PopulationConfig field as name=value (repeatable), e.g. --set target_epsilon=8"
    ),
    ray_address: str = typer.Option(
        None, help="Join this Ray cluster (ray start --head ...) instead of starting Ray here."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs (else in OUT/flwr-run.log)."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the summary."),
) -> None:
    """Run one population preset as a single `flwr run` on a local simulation SuperLink."""
    from fedpal.simulations.cli import progress_bars
    from fedpal.simulations.population.engine import run_population
    from fedpal.simulations.population.settings import load_population_config
    from fedpal.simulations.population.study import run_results

    config = load_population_config(getattr(preset, "value", preset), _settings(setting))
    _writable(out)
    with progress_bars() as progress:
        finished = run_population(config, out, progress, verbose=verbose, ray_address=ray_address)
    results = run_results(config, finished)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    score = results["score"]
    table = Table(
        title=f"fedpal population run --preset {config.preset}: {config.users} users, "
        f"{config.clients_per_round} per round, epsilon "
        f"{'off' if results['epsilon'] is None else format(results['epsilon'], '.2f')}"
    )
    for column in ("round", "seconds"):
        table.add_column(column)
    for number, seconds in enumerate(results["round_seconds"], start=1):
        table.add_row(str(number), f"{seconds:.1f}")
    console = Console()
    console.print(table)
    low, high = score["gain_ci95"]
    console.print(
        f"held-out preference accuracy over {score['users']} users: base {score['base_accuracy']:.3f}, "
        f"shared {score['shared_accuracy']:.3f}, gain {score['gain']:+.3f} [{low:+.3f}, {high:+.3f}]"
        f"{' (beats the base model)' if score['beats_base'] else ''}"
    )
    console.print(
        f"peak memory {results['peak_memory_mb']:.0f} MiB (summed RSS); {results['wall_seconds']} s; "
        f"wrote {out / 'results.json'}"
    )


@app.command()
def study(
    out: Path = typer.Option(..., "--out", help="Folder for results.json, report.md, the PNG plots and every run."),
    preset: Study = typer.Option(
        "default",
        help="default (20 to 1000 users with noise-only twins and two seeds up to 300, 5 budgets, 3 adapter sizes: "
        "24 runs, ~36 min on 2 cores) or quick (3 runs, ~2 min).",
    ),
    ray_address: str = typer.Option(None, help="Join this Ray cluster instead of starting Ray here."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the summary."),
) -> None:
    """Shared-adapter utility against the number of users at a fixed epsilon, and against epsilon."""
    from fedpal.simulations.cli import progress_bars
    from fedpal.simulations.population.study import STUDIES, population_study

    _writable(out)
    with progress_bars() as progress:
        results = population_study(STUDIES[getattr(preset, "value", preset)], out, progress, ray_address=ray_address)
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    first = results["first_size_beating_base"]
    typer.echo(
        f"the shared adapter first beats the base model at {first} users"
        if first
        else "the shared adapter does not beat the base model beyond its 95% interval at any size run"
    )
    typer.echo(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")
