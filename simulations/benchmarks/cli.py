"""``fedpal bench``: where fedpal stands against what a user would pick instead.

Each sub-command runs one benchmark (its contenders side by side, medians of repeats),
prints its table, and writes ``<name>.json`` and ``<name>.md`` under ``--out``;
``fedpal bench all`` runs them in turn. ``--quick`` uses the tiny test model and small
sizes: a smoke test (CI runs it), not a measurement.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import typer

from fedpal.simulations.benchmarks.core import BENCHMARKS, BenchReport

MODULES = ("decode", "train", "federation", "memory", "scale")
"""The modules that register benchmarks, in the order ``fedpal bench all`` runs them."""

app = typer.Typer(
    help="Benchmarks: fedpal side by side with what a user would pick instead (tables, JSON, Markdown).",
    no_args_is_help=True,
)

QUICK = typer.Option(False, "--quick", help="Tiny model and small sizes: a smoke test, not a measurement.")
OUT = typer.Option(Path("fedpal-bench"), "--out", help="Folder for <name>.json and <name>.md.")
AS_JSON = typer.Option(False, "--json", help="Print the figures as JSON instead of a table.")


def load_benchmarks() -> None:
    """Import the benchmark modules, which register themselves (their heavy imports wait for a run)."""
    for module in MODULES:
        import_module(f"fedpal.simulations.benchmarks.{module}")


def _run(names: list[str], quick: bool, out: Path, as_json: bool) -> list[BenchReport]:
    from rich.console import Console

    console = Console(stderr=as_json)
    reports = []
    for name in names:
        entry = BENCHMARKS[name]
        console.print(f"[bold]fedpal bench {name}[/bold]: {entry.help}" + (" (quick)" if quick else ""))
        report = entry.run(quick)
        json_path, md_path = report.write(out)
        reports.append(report)
        if not as_json:
            console.print(report.rich_table())
            for note in report.notes:
                console.print(f"  - {note}")
            console.print(f"wrote {json_path} and {md_path}")
    if as_json:
        payload = [r.to_dict() for r in reports]
        typer.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    return reports


def _command(name: str, help: str):
    def command(quick: bool = QUICK, out: Path = OUT, as_json: bool = AS_JSON) -> None:
        _run([name], quick, out, as_json)

    command.__doc__ = help
    command.__name__ = name
    return command


load_benchmarks()
for _entry in BENCHMARKS.values():
    app.command(_entry.name, help=_entry.help)(_command(_entry.name, _entry.help))


@app.command("all")
def run_all(quick: bool = QUICK, out: Path = OUT, as_json: bool = AS_JSON) -> None:
    """Every benchmark in turn (decode, train, federation, memory, scale)."""
    _run(list(BENCHMARKS), quick, out, as_json)
