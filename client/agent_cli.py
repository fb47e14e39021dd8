"""``fedpal client``: the agent that joins a deployment from a user's machine (``fedpal.client.agent``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from fedpal.client.cli_common import PASSPHRASE_FILE, choices, home_option, plain, read_passphrase
from fedpal.common.errors import FedpalError

app = typer.Typer(
    help="Join a fedpal deployment from this machine (a Flower SuperNode per user).",
    no_args_is_help=True,
    suggest_commands=False,
)

LogFormat = choices("LogFormat", ("json", "text"))


def _home(home: str):
    from fedpal.client.agent import AgentConfig
    from fedpal.client.home import home_path

    return AgentConfig.load(home_path(home))


@app.command("init")
def init_command(
    home: str = home_option("The user's fedpal home (created if missing, with an encrypted memory)."),
    server: str = typer.Option(..., "--server", help="The server's HOST:PORT, as the operator gave it."),
    ca: Path = typer.Option(..., "--ca", help="The deployment's CA certificate (ca.crt from the operator)."),
    max_load: float = typer.Option(
        0.75, help="Train only while the 1-minute load average per CPU core is below this (0: no limit)."
    ),
    require_ac: bool = typer.Option(
        True,
        "--require-ac/--allow-battery",
        help="Train only on AC power (a machine without a battery counts as on AC).",
    ),
    window: str = typer.Option(
        "", help="Local time HH:MM-HH:MM when training may start, e.g. 22:00-07:00 (empty: any time)."
    ),
    log_format: LogFormat = typer.Option(
        "json", help="The agent's log: JSON lines or plain text (rotated, in <home>/agent/logs)."
    ),
    passphrase_file: str = PASSPHRASE_FILE,
) -> None:
    """Set up this machine's agent: a node key pair (private key mode 0600), the memory, a device profile.

    Prints the public key on stdout: send it to the server operator (fedpal server add-client).
    """
    from fedpal.client.agent import Policy, init_agent

    secret = read_passphrase(None, passphrase_file, ask=True, confirm=True)
    config, public, reachable = init_agent(
        Path(home), server, ca, Policy(max_load, require_ac, window), plain(log_format), secret
    )
    typer.echo(public)
    if not reachable:
        typer.echo(
            f"note: the server at {config.server} does not answer now, so the CA was not checked against it; "
            "the agent will keep trying",
            err=True,
        )
    typer.echo(
        f"note: agent set up in {config.folder}; send the public key above ({config.public_key}) to the "
        f"server operator, then run: fedpal client start --home {config.home}",
        err=True,
    )


@app.command("start")
def start_command(
    home: str = home_option("The user's fedpal home (set up with `fedpal client init`)."),
    passphrase_file: str = PASSPHRASE_FILE,
) -> None:
    """Run the agent: a Flower SuperNode with TLS and this home's node key, until stopped (Ctrl-C, SIGTERM)."""
    from fedpal.client.agent import run_agent

    config = _home(home)
    secret = read_passphrase(None, passphrase_file, ask=True)
    raise typer.Exit(run_agent(config, secret, lambda line: typer.echo(line, err=True)))


@app.command("status")
def status_command(
    home: str = home_option("The user's fedpal home."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Rounds joined and declined, the last global adapter, its round and the epsilon spent on it, adapter
    versions, memory size."""
    from fedpal.client.agent import agent_status

    state = agent_status(_home(home))
    if as_json:
        typer.echo(json.dumps(state))
        return
    running = f"running (pid {state['agent_pid']})" if state["agent_pid"] else "not running"
    typer.echo(f"agent for {state['home']}: {running}; server {state['server']}; key {state['key']}")
    typer.echo(f"policy: {'busy: ' + state['busy'] if state['busy'] else 'training allowed now'}")
    received, through = state["last_global_round"], state["global_through"]
    last = (
        "none yet"
        if received is None
        else (
            f"{'the final one, received after round' if state['last_global_final'] else 'received in round'} "
            f"{received} "
            f"at {state['last_global_at']} "
            f"({'the initial adapter' if through == 0 else f'aggregated through round {through}'})"
        )
    )
    typer.echo(
        f"rounds joined {state['rounds_joined']}, declined {state['rounds_declined']}; last global adapter: {last}"
    )
    if state["epsilon"] is not None:
        typer.echo(
            f"privacy: epsilon {state['epsilon']:.4g} at delta {state['delta']:.3g} spent by the run on that "
            "adapter, as the server reported"
        )
    elif received is not None:
        typer.echo("privacy: the server reported no epsilon with that adapter (a run without DP)")
    for name, info in state["adapters"].items():
        typer.echo(f"adapter {name}: saved {info['saved']}, {info['bytes'] / 1e6:.1f} MB")
    if state["kept_aside"]:
        typer.echo(f"kept aside (not serving): {', '.join(state['kept_aside'])}")
    typer.echo(f"memory: {state['memory_bytes'] / 1e3:.1f} kB")
    if state["device"]:
        device = state["device"]
        gpu = f", GPU {device['gpu']['name']}" if device.get("gpu") else ""
        typer.echo(f"device: {device['cpu_cores']} CPU cores, {device['memory_bytes'] / 2**30:.1f} GiB memory{gpu}")


@app.command("install-service")
def install_service_command(
    home: str = home_option("The user's fedpal home (set up with `fedpal client init`)."),
    passphrase_file: Path = typer.Option(
        ...,
        "--passphrase-file",
        help="File whose first line is the memory passphrase; the service reads it at start (keep it mode 0600).",
    ),
    unit_dir: Path = typer.Option(
        None, help="Where to write the unit (default: $XDG_CONFIG_HOME/systemd/user, else ~/.config/systemd/user)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing unit file."),
) -> None:
    """Write a systemd user unit that runs the agent, and print how to enable it (it then survives logout and
    reboot)."""
    from fedpal.client.agent import install_service

    config = _home(home)
    if unit_dir is None:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        unit_dir = Path(base) / "systemd" / "user"
    if not passphrase_file.expanduser().is_file():
        raise FedpalError(f"the passphrase file {passphrase_file} does not exist")
    path = install_service(config, passphrase_file, unit_dir, force)
    typer.echo(f"wrote {path}")
    typer.echo("enable it (and keep it running after logout and across reboots) with:")
    typer.echo(f"  systemctl --user daemon-reload && systemctl --user enable --now {path.name}")
    typer.echo(f"  loginctl enable-linger {os.environ.get('USER', '$USER')}")
