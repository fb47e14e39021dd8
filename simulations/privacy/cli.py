"""``fedpal privacy audit``: attack fedpal federations and report what they leak."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from fedpal.common.cli import CONTEXT
from fedpal.common.errors import FedpalError

app = typer.Typer(
    help="Privacy experiments: real attacks on fedpal's updates and adapters.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)

Preset = Enum("Preset", {name: name for name in ("quick", "default")}, type=str)


@app.command()
def audit(
    out: Path = typer.Option(..., "--out", help="Folder for results.json, report.md and the PNG plots."),
    preset: Preset = typer.Option(
        "quick", help="quick (tiny model, about 2.5 min on 2 cores) or default (SmolLM2-135M, 6 users, about 70 min)."
    ),
    config: Path = typer.Option(
        None, "--config", help="TOML or JSON file overriding preset settings (see fedpal.simulations.privacy.config)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the summary table."),
) -> None:
    """Run fedpal federations with protection off, DP, SecAgg+ and both, attack them, report the leaks."""
    import warnings

    from fedpal.simulations.cli import progress_bars
    from fedpal.simulations.privacy.config import load_audit_config
    from fedpal.simulations.privacy.experiment import privacy_audit

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = load_audit_config(getattr(preset, "value", preset), config)
    if out.exists() and not out.is_dir():
        raise FedpalError(f"--out {out} is a file; name a folder for the results")
    with progress_bars() as progress:
        results = privacy_audit(settings, out, progress)
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"fedpal privacy audit --preset {settings.preset}: {settings.users} users, "
        f"{settings.rounds} rounds, delta {settings.delta}"
    )
    for column in (
        "setting",
        "epsilon",
        "audited epsilon",
        "MIA AUC (global)",
        "TPR@1%FPR",
        "canary bits",
        "inversion recall",
    ):
        table.add_column(column)
    for name in results["settings"]:
        epsilon = results["epsilon"][name]
        mia = results["mia"][name]
        table.add_row(
            name,
            "no DP" if epsilon is None else f"{epsilon:.2f}",
            f"{results['audited_epsilon'][name]:.2f}",
            f"{mia['auc']:.3f}",
            f"{mia['tpr_at_1pct_fpr']:.2f}",
            f"{results['canary_exposure'][name]:.1f}",
            f"{results['inversion'][name]['token_recall']:.2f}",
        )
    console = Console()
    console.print(table)
    console.print(f"plaintext leaks: {results['plaintext_leaks']}; {results['wall_time_s']} s")
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")
