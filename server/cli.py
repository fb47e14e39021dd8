"""``fedpal server``: submit the federation to a SuperLink, read a run's progress, and run a
deployment (``init``, ``start``, ``add-client``, ``remove-client``; ``fedpal.server.deployment``).

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

app = typer.Typer(
    help="Run and inspect the federation (Flower ServerApp).", no_args_is_help=True, suggest_commands=False
)

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
    from fedpal.common.settings import DEFAULTS

    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise FedpalError(f"unknown setting '{unknown[0]}'; known settings: {', '.join(DEFAULTS)}")
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


@app.command("run")
def run_command(
    superlink: str = typer.Argument(
        None,
        help="SuperLink connection name from Flower's config (FLWR_HOME/config.toml); default: Flower's default "
        "connection.",
    ),
    rounds: int = typer.Option(None, help="Number of server rounds."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last checkpoint in the run folder."),
    run_dir: Path = typer.Option(None, help="Folder for metrics.jsonl, the checkpoint and the global adapter."),
    setting: list[str] = typer.Option(
        [], "--set", help="Any run-config setting as key=value (repeatable), e.g. --set noise-multiplier=1.2"
    ),
    app_dir: Path = typer.Option(PROJECT_DIR, help="The fedpal project folder (holds pyproject.toml)."),
    stream: bool = typer.Option(True, help="Stream the run's logs until it ends."),
) -> None:
    """Submit the fedpal federation to a SuperLink with ``flwr run``."""
    if not (app_dir / "pyproject.toml").is_file():
        raise FedpalError(f"{app_dir} has no pyproject.toml: pass --app-dir pointing at the fedpal project")
    flwr = shutil.which("flwr")
    if flwr is None:
        raise FedpalError("the 'flwr' command is not installed (pip install 'flwr[simulation]')")
    values = _settings(setting)
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
    folder: Path = typer.Argument(
        ...,
        help="A deployment folder (`fedpal server init` made it) or a run folder (holds metrics.jsonl; `fedpal "
        "server run --run-dir` names it).",
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help='Print one JSON document: for a run folder {"run_dir", "rounds": [metrics lines], '
        '"partial_last_line"}; for a deployment also "superlink_running", "clients", "clients_seen", "epsilon".',
    ),
) -> None:
    """Rounds done, privacy spent and traffic of a run; for a deployment also its clients."""
    from fedpal.server.deployment import CONFIG_FILE, Deployment
    from fedpal.server.deployment import status as deployment_status

    if (folder / CONFIG_FILE).is_file():
        state = deployment_status(Deployment.load(folder))
        rounds, partial = state["rounds"], state["partial_last_line"]
        if as_json:
            typer.echo(json.dumps(state))
            return
        eps = (
            f"epsilon {state['epsilon']:.3f} at delta {state['delta']:g}"
            if state["epsilon"] is not None
            else "no epsilon spent yet"
        )
        typer.echo(
            f"deployment {state['deployment']}: clients dial {state['address']}; SuperLink "
            f"{'running' if state['superlink_running'] else 'not running'}"
        )
        typer.echo(
            f"rounds {state['rounds_done']} of {state['rounds_planned']}; {eps}; "
            f"{state['clients_seen']} of {len(state['clients'])} added clients seen"
        )
        for client in state["clients"]:
            typer.echo(
                f"  client {client['name'] or '-'} node {client['node_id']} {client['fingerprint']}: "
                f"{client['status']}, asked in {client['rounds_asked']} round(s)"
            )
    else:
        rounds, partial = read_metrics(folder)
        if as_json:
            typer.echo(json.dumps({"run_dir": str(folder.resolve()), "rounds": rounds, "partial_last_line": partial}))
            return
    if not rounds:
        typer.echo("no round finished yet")
    for line in rounds:
        typer.echo(_round_summary(line))
    if partial:
        typer.echo(
            "warning: the last line of metrics.jsonl is incomplete (a round being written, or the server "
            "stopped while writing it); it was left out",
            err=True,
        )


@app.command("settings")
def settings_command(
    as_json: bool = typer.Option(False, "--json", help='Print {"key": {"default", "help"}} instead of the table.'),
) -> None:
    """Every federation setting (`--set key=value`, `--run-config`): its default and what it does."""
    from dataclasses import fields

    from fedpal.common.settings import DEFAULTS, FederationSettings, key_of

    rows = {
        key_of(f.name): {"default": DEFAULTS[key_of(f.name)], "help": f.metadata["help"]}
        for f in fields(FederationSettings)
    }
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedpal federation settings (fedpal.common.settings.FederationSettings)")
    for column in ("key", "default", "what it does"):
        table.add_column(column)
    for key, row in rows.items():
        table.add_row(key, json.dumps(row["default"]), row["help"])
    Console().print(table)


@app.command("init")
def init_command(
    folder: Path = typer.Argument(..., help="The deployment folder to create (must not exist, or be empty)."),
    address: str = typer.Option(
        ..., "--address", help="HOST:PORT that clients dial; HOST goes into the TLS certificate."
    ),
    listen: str = typer.Option("0.0.0.0", help="Interface the SuperLink listens on (0.0.0.0: all)."),
    name: list[str] = typer.Option(
        [], "--name", help="Another host name or IP the certificate must hold (repeatable)."
    ),
    rounds: int = typer.Option(3, help="num-server-rounds of the federation."),
    min_clients: int = typer.Option(3, help="Clients a round waits for (SecAgg+ needs at least 3)."),
    setting: list[str] = typer.Option(
        [], "--set", help="Any other federation setting as key=value (repeatable), e.g. --set model=tiny"
    ),
) -> None:
    """Create a deployment folder: a CA, the SuperLink's TLS certificate and key, a config, and a README of the
    next commands."""
    from fedpal.server.deployment import init_deployment

    values: dict[str, object] = {"num-server-rounds": rounds, "min-clients": min_clients}
    for key, value in _settings(setting).items():
        values[key] = _typed(value)
    deployment = init_deployment(folder, address, listen, tuple(name), values)
    typer.echo(
        f"created the deployment {deployment.root}; clients dial {deployment.address} and need {deployment.ca_cert}"
    )
    typer.echo(f"next: fedpal server start {deployment.root}   (see {deployment.root / 'README.md'})")


@app.command("start")
def start_command(
    folder: Path = typer.Argument(..., help="The deployment folder (`fedpal server init` made it)."),
) -> None:
    """Run the SuperLink (TLS, node authentication) and the fedpal federation on it until its rounds are done."""
    from fedpal.server.deployment import Deployment, serve

    code = serve(Deployment.load(folder), lambda line: typer.echo(line, err=True))
    raise typer.Exit(code)


@app.command("add-client")
def add_client_command(
    folder: Path = typer.Argument(..., help="The deployment folder; its SuperLink must be running."),
    public_key: str = typer.Argument(
        ..., help="The user's node public key: the line `fedpal client init` printed, or a file holding it."
    ),
    name: str = typer.Option(None, help="A name for this client, shown by `fedpal server status`."),
) -> None:
    """Admit a user's node: register its public key with the SuperLink (flwr supernode register)."""
    from fedpal.server.deployment import Deployment, add_client

    added = add_client(Deployment.load(folder), public_key, name)
    typer.echo(
        f"added node {added['node_id']} (key {added['fingerprint']}{', ' + added['name'] if added['name'] else ''})"
    )


@app.command("remove-client")
def remove_client_command(
    folder: Path = typer.Argument(..., help="The deployment folder; its SuperLink must be running."),
    public_key: str = typer.Argument(..., help="The node public key to revoke (the line, or a file holding it)."),
) -> None:
    """Revoke a user's node: unregister its key (flwr supernode unregister); it is refused from now on."""
    from fedpal.server.deployment import Deployment, remove_client

    removed = remove_client(Deployment.load(folder), public_key)
    typer.echo(f"removed node {removed['node_id']} (key {removed['fingerprint']})")


def _settings(items: list[str]) -> dict[str, str]:
    """``--set key=value`` items as a dict (a malformed one is a one-line error)."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedpalError(f"--set wants key=value, got '{item}'")
        values[key.strip()] = value.strip()
    return values


def _typed(raw: str) -> object:
    """A ``--set`` value as the type TOML would read it: booleans, integers, floats, else the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


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
        needed.update(
            {
                "aggregated": bool,
                "clients_summed": int,
                "seconds": (int, float),
                "bytes_up_per_client": (int, float),
                "bytes_down_per_client": (int, float),
            }
        )
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
