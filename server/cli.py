"""``fedpal server``: submit the federation to a SuperLink, and read a run's progress.

Submitting goes through Flower's own ``flwr run`` (it builds the app bundle and talks to
the SuperLink's Control API, TLS included); this command turns fedpal options into its
run config and hands it an app folder that ``flwr run`` may not rewrite.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import typer

from fedpal.common.errors import FedpalError

app = typer.Typer(help="Run and inspect the federation (Flower ServerApp).", no_args_is_help=True)

PROJECT_DIR = Path(__file__).resolve().parents[1]


def write_app_folder(target: Path, project: Path = PROJECT_DIR) -> Path:
    """A folder for ``flwr run`` holding only the project's pyproject, minus two sections.

    fedpal's ServerApp and ClientApp are already installed where they run, so the
    bundle needs no code. Left out: ``[tool.flwr.federations]``, which Flower 1.41
    migrates by rewriting the pyproject it finds it in, and ``dependencies``, which a
    SuperLink allowed to install them would resolve into a fresh environment per run.
    """
    text = (project / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.flwr\.federations[^\n]*\](?:\n(?!\[)[^\n]*)*", "\n", text)
    text = re.sub(r"(?s)\ndependencies = \[.*?\n\]", "\ndependencies = []", text)
    target.mkdir(parents=True, exist_ok=True)
    (target / "pyproject.toml").write_text(text)
    return target


def _toml_value(raw: str) -> str:
    """A value from the command line as TOML: numbers and booleans as they are, the rest quoted."""
    if raw.lower() in ("true", "false"):
        return raw.lower()
    try:
        float(raw)
        return raw
    except ValueError:
        return json.dumps(raw)


def run_config_string(values: dict[str, str]) -> str:
    """``k=v`` pairs for ``flwr run --run-config``, keys checked against fedpal's settings."""
    from fedpal.server.strategy import DEFAULTS

    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise FedpalError(f"unknown setting '{unknown[0]}'; known settings: {', '.join(DEFAULTS)}")
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


@app.command("run")
def run_command(
    superlink: str = typer.Argument(None, help="SuperLink connection name from Flower's config (FLWR_HOME/config.toml); default: Flower's default connection."),
    rounds: int = typer.Option(None, help="Number of server rounds."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last checkpoint in the run folder."),
    run_dir: Path = typer.Option(None, help="Folder for metrics.jsonl, the checkpoint and the global adapter."),
    setting: list[str] = typer.Option([], "--set", help="Any run-config setting as key=value (repeatable), e.g. --set noise-multiplier=1.2"),
    app_dir: Path = typer.Option(PROJECT_DIR, help="The fedpal project folder (holds pyproject.toml)."),
    stream: bool = typer.Option(True, help="Stream the run's logs until it ends."),
) -> None:
    """Submit the fedpal federation to a SuperLink with ``flwr run``."""
    if not (app_dir / "pyproject.toml").is_file():
        raise FedpalError(f"{app_dir} has no pyproject.toml: pass --app-dir pointing at the fedpal project")
    flwr = shutil.which("flwr")
    if flwr is None:
        raise FedpalError("the 'flwr' command is not installed (pip install 'flwr[simulation]')")
    values: dict[str, str] = {}
    for item in setting:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedpalError(f"--set wants key=value, got '{item}'")
        values[key.strip()] = value.strip()
    if rounds is not None:
        values["num-server-rounds"] = str(rounds)
    if resume:
        values["resume"] = "true"
    if run_dir is not None:
        values["run-dir"] = str(run_dir.expanduser().resolve())
    with tempfile.TemporaryDirectory(prefix="fedpal-app-") as folder:
        command = [flwr, "run", str(write_app_folder(Path(folder), app_dir))]
        if superlink:
            command.append(superlink)
        if values:
            command += ["--run-config", run_config_string(values)]
        if stream:
            command.append("--stream")
        code = subprocess.call(command)
    raise typer.Exit(code)


@app.command()
def status(run_dir: Path = typer.Argument(..., help="A run folder (holds metrics.jsonl).")) -> None:
    """Rounds done, privacy spent and traffic of a run, from its metrics file."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FedpalError(f"{run_dir} has no metrics.jsonl: not a fedpal run folder, or no round finished yet")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for line in lines:
        if "stopped" in line:
            typer.echo(f"stopped before round {line['round']}: {line['stopped']} (epsilon {line['epsilon']:.3f})")
            continue
        eps = f"epsilon {line['epsilon']:.3f}" if line.get("epsilon") is not None else "no DP"
        state = "ok" if line["aggregated"] else f"NOT AGGREGATED: {line.get('error', '')}"
        typer.echo(
            f"round {line['round']}: {state}; {line['clients_summed']} clients, {eps}, "
            f"{line['seconds']:.1f} s, up {line['bytes_up_per_client'] / 1e3:.1f} kB / down "
            f"{line['bytes_down_per_client'] / 1e3:.1f} kB per client"
        )
