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

app = typer.Typer(help="Run and inspect the federation (Flower ServerApp).", no_args_is_help=True, suggest_commands=False)

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
def status(
    run_dir: Path = typer.Argument(..., help="A run folder (holds metrics.jsonl; `fedpal server run --run-dir` names it)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"run_dir", "rounds": [metrics lines], "partial_last_line"}.'),
) -> None:
    """Rounds done, privacy spent and traffic of a run, from its metrics file."""
    rounds, partial = read_metrics(run_dir)
    if as_json:
        typer.echo(json.dumps({"run_dir": str(run_dir.resolve()), "rounds": rounds, "partial_last_line": partial}))
        return
    if not rounds:
        typer.echo("no round finished yet")
    for line in rounds:
        typer.echo(_round_summary(line))
    if partial:
        typer.echo("warning: the last line of metrics.jsonl is incomplete (a round being written, or the server "
                   "stopped while writing it); it was left out", err=True)


def read_metrics(run_dir: Path) -> tuple[list[dict], bool]:
    """The JSON lines of a run's ``metrics.jsonl``, and whether an unfinished last line was left out.

    The server appends one line per round, so a crash can leave the last one cut short:
    that is reported, not fatal. A damaged line anywhere else is an error naming it.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise FedpalError(f"{run_dir} is a file; give the run folder that holds metrics.jsonl")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FedpalError(f"{run_dir} has no metrics.jsonl: not a fedpal run folder, or no round finished yet")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FedpalError(f"{path} is not UTF-8 text (byte {err.start}): not a fedpal metrics file") from None
    lines = text.split("\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    rounds, partial = [], False
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as err:
            if index == last and not text.endswith("\n"):
                partial = True
                continue
            raise FedpalError(f"{path}:{index + 1}: not a JSON line ({err}); the metrics file is damaged") from None
        problem = _metrics_problem(line)
        if problem:
            raise FedpalError(f"{path}:{index + 1}: {problem}; the metrics file is damaged or not fedpal's")
        rounds.append(line)
    return rounds, partial


def _metrics_problem(line: object) -> str | None:
    """What keeps a metrics line from being shown (None: nothing)."""
    if not isinstance(line, dict):
        return f"expected a JSON object, got {type(line).__name__}"
    needed = {"round": int, "epsilon": (int, float, type(None))}
    if "stopped" not in line:
        needed.update({"aggregated": bool, "clients_summed": int, "seconds": (int, float),
                       "bytes_up_per_client": (int, float), "bytes_down_per_client": (int, float)})
    for key, kind in needed.items():
        if key not in line:
            return f"missing '{key}'"
        if isinstance(line[key], bool) and kind is not bool or not isinstance(line[key], kind):
            return f"'{key}' has the wrong type ({type(line[key]).__name__})"
    return None


def _round_summary(line: dict) -> str:
    eps = f"epsilon {line['epsilon']:.3f}" if line.get("epsilon") is not None else "no DP"
    if "stopped" in line:
        return f"stopped before round {line['round']}: {line['stopped']} ({eps})"
    state = "ok" if line["aggregated"] else f"NOT AGGREGATED: {line.get('error', '')}"
    return (
        f"round {line['round']}: {state}; {line['clients_summed']} clients, {eps}, "
        f"{line['seconds']:.1f} s, up {line['bytes_up_per_client'] / 1e3:.1f} kB / down "
        f"{line['bytes_down_per_client'] / 1e3:.1f} kB per client"
    )
