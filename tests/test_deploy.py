"""Issue 14: a deployment folder for the operator, a client agent per user.

The fast tests check what ``server init`` and ``client init`` write (certificates that
verify, a private key nobody else can read, a key Flower itself accepts) and how they
refuse bad input (one ``error:`` line, nothing written). The federation test runs the
real thing on localhost: ``fedpal server start`` (a TLS SuperLink with node
authentication), agents started with ``fedpal client start``, one round and the final
adapter it sends to every agent with the epsilon spent on it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import PASSPHRASE, fedpal, ok, snapshot, user_error
from test_federation_deployment import _free_port, _start, processes  # noqa: F401  (processes is a fixture)

from fedpal.client.agent import AgentConfig, Policy, init_agent, on_battery
from fedpal.server.deployment import Deployment, run_settings

SECRETS = ["purple-giraffe-umbrella", "zanzibar-teapot-quartz", "mellow-kestrel-fjord"]
"""Memory text of the three users; no log may ever hold it."""


def _server_init(folder: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    return fedpal(
        "server",
        "init",
        str(folder),
        "--address",
        f"localhost:{port}",
        "--listen",
        "127.0.0.1",
        "--rounds",
        "1",
        "--set",
        "model=tiny",
        "--set",
        "local-steps=2",
        "--set",
        "personal-steps=1",
        *extra,
    )


def _client_init(
    home: Path, port: int, ca: Path, *extra: str, passphrase: str | None = PASSPHRASE
) -> subprocess.CompletedProcess:
    return fedpal(
        "client",
        "init",
        "--home",
        str(home),
        "--server",
        f"localhost:{port}",
        "--ca",
        str(ca),
        "--max-load",
        "0",
        *extra,
        passphrase=passphrase,
    )


# ----------------------------------------------------------------------------- init


def test_server_init_makes_a_ca_a_server_certificate_and_the_next_commands(tmp_path):
    from cryptography import x509

    folder = tmp_path / "deploy"
    result = ok(_server_init(folder, 9555, "--name", "10.1.2.3", "--name", "fedpal.lan"))
    assert f"fedpal server start {folder}" in result.stdout
    tls = folder / "tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tls / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "fedpal.lan"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    for key in ("ca.key", "server.key"):
        assert (tls / key).stat().st_mode & 0o777 == 0o600
    config = (folder / "deployment.toml").read_text()
    assert 'address = "localhost:9555"' in config and 'model = "tiny"' in config and "num-server-rounds = 1" in config
    readme = (folder / "README.md").read_text()
    for command in (
        "fedpal server start",
        "fedpal client init",
        "fedpal server add-client",
        "fedpal client start",
        "fedpal server remove-client",
        "fedpal server status",
    ):
        assert command in readme
    status = json.loads(ok(fedpal("server", "status", str(folder), "--json")).stdout)
    assert status["rounds_done"] == 0 and status["clients"] == [] and not status["superlink_running"]
    # `server start` resumes a run whose checkpoint is there (a crash or a stop mid-run)
    deployment = Deployment.load(folder)
    assert run_settings(deployment)["run-dir"] == str(folder.resolve() / "run")
    assert "resume" not in run_settings(deployment)
    (folder / "run" / "checkpoint").mkdir()
    assert run_settings(deployment)["resume"] == "true"


def test_server_init_refuses_bad_input_and_writes_nothing(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    user_error(_server_init(taken, 9555), str(taken), "not an empty folder")
    assert snapshot(taken) == {"notes.txt": snapshot(taken)["notes.txt"]}
    new = tmp_path / "new"
    user_error(fedpal("server", "init", str(new), "--address", "no-port-here"), "HOST:PORT")
    user_error(fedpal("server", "init", str(new), "--address", "h:70000"), "out of range")
    user_error(_server_init(new, 9555, "--min-clients", "2"), "SecAgg+ needs at least 3 clients")
    user_error(_server_init(new, 9555, "--set", "no-such-setting=1"), "no-such-setting")
    assert not new.exists() and list(tmp_path.iterdir()) == [taken]


def test_client_init_keeps_the_private_key_private_and_prints_a_key_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    deploy = tmp_path / "deploy"
    ok(_server_init(deploy, 9555))
    home = tmp_path / "me"
    result = ok(_client_init(home, 9555, deploy / "tls" / "ca.crt", "--window", "22:00-07:00"))
    agent = home / "agent"
    line = result.stdout.strip()
    assert line.startswith("ecdsa-sha2-nistp384 ") and (agent / "node.pub").read_text().strip() == line
    assert (agent / "node.key").stat().st_mode & 0o777 == 0o600
    assert try_load_public_key(agent / "node.pub")  # Flower's own reader of `flwr supernode register`
    assert (home / "memory.sqlite").is_file()
    device = json.loads((agent / "device.json").read_text())
    assert device["cpu_cores"] == os.cpu_count() and device["device"] in ("cpu", "cuda")
    config = AgentConfig.load(home.resolve())
    assert config.server == "localhost:9555" and config.policy == Policy(0.0, True, "22:00-07:00")
    assert (agent / "ca.crt").read_bytes() == (deploy / "tls" / "ca.crt").read_bytes()
    # the operator can admit it only while the server runs; the key itself is accepted
    user_error(fedpal("server", "add-client", str(deploy), str(agent / "node.pub")), "is not running", "server start")


def test_client_init_refuses_a_wrong_ca_or_address_and_writes_nothing(tmp_path):
    deploy = tmp_path / "deploy"
    ok(_server_init(deploy, 9555))
    home = tmp_path / "me"
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    cases = [
        (tmp_path / "missing.crt", "does not exist"),
        (garbage, "is not a PEM certificate"),
        (deploy / "tls" / "server.crt", "is not a CA certificate"),
        (deploy / "tls", "is a folder"),
    ]
    for ca, needle in cases:
        user_error(_client_init(home, 9555, ca), str(ca), needle)
    user_error(
        fedpal("client", "init", "--home", str(home), "--server", "localhost", "--ca", str(deploy / "tls" / "ca.crt")),
        "HOST:PORT",
    )
    user_error(_client_init(home, 9555, deploy / "tls" / "ca.crt", "--window", "25:00-07:00"), "HH:MM-HH:MM")
    user_error(_client_init(home, 9555, deploy / "tls" / "ca.crt", passphrase=None), "needs a passphrase")
    assert not home.exists()
    ok(_client_init(home, 9555, deploy / "tls" / "ca.crt"))
    before = snapshot(home)
    user_error(_client_init(home, 9555, deploy / "tls" / "ca.crt"), "already has a client agent")
    assert snapshot(home) == before


def test_client_start_refuses_a_key_others_can_read(tmp_path):
    deploy = tmp_path / "deploy"
    ok(_server_init(deploy, 9555))
    home = tmp_path / "me"
    ok(_client_init(home, 9555, deploy / "tls" / "ca.crt"))
    user_error(fedpal("client", "start", "--home", str(home), passphrase="not the passphrase"), "passphrase")
    key = home / "agent" / "node.key"
    key.chmod(0o644)
    user_error(fedpal("client", "start", "--home", str(home)), str(key), "chmod 600")
    key.unlink()
    user_error(fedpal("client", "start", "--home", str(home)), str(key), "is missing")
    user_error(
        fedpal("client", "start", "--home", str(tmp_path / "nobody")), "has no client agent", "fedpal client init"
    )


# ----------------------------------------------------------------------------- policy, service


def test_policy_window_load_and_battery(tmp_path):
    at = datetime.datetime(2026, 12, 1, 23, 30)
    assert Policy(0, False, "22:00-07:00").busy_reason(at) is None  # wraps midnight
    assert (
        Policy(0, False, "22:00-07:00").busy_reason(at.replace(hour=12))
        == "outside the training window 22:00-07:00 (now 12:30)"
    )
    assert Policy(0, False, "09:00-17:00").busy_reason(at.replace(hour=9, minute=0)) is None
    assert Policy(0, False, "").busy_reason(at) is None
    load = os.getloadavg()[0] / os.cpu_count()
    assert load > 0  # this suite keeps the machine busy
    assert "is at or over max-load" in Policy(load / 4, False).busy_reason()
    assert Policy(load + 100, False).busy_reason() is None
    # power supplies as Linux shows them in /sys/class/power_supply
    supply = tmp_path / "power_supply"
    for name, kind, online in (("BAT0", "Battery", None), ("AC", "Mains", "0")):
        (supply / name).mkdir(parents=True)
        (supply / name / "type").write_text(kind + "\n")
        if online is not None:
            (supply / name / "online").write_text(online + "\n")
    assert on_battery(supply)
    (supply / "AC" / "online").write_text("1\n")
    assert not on_battery(supply)
    (supply / "BAT0" / "type").write_text("UPS\n")
    (supply / "AC" / "online").write_text("0\n")
    assert not on_battery(supply)  # no battery in the machine: a desktop counts as on AC
    assert not on_battery(tmp_path / "no-such-folder")


def test_install_service_writes_a_user_unit_and_says_how_to_enable_it(tmp_path):
    deploy = tmp_path / "deploy"
    ok(_server_init(deploy, 9555))
    home = tmp_path / "my home"
    ok(_client_init(home, 9555, deploy / "tls" / "ca.crt"))
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o600)
    units = tmp_path / "units"
    result = ok(
        fedpal(
            "client", "install-service", "--home", str(home), "--passphrase-file", str(secret), "--unit-dir", str(units)
        )
    )
    [unit] = list(units.iterdir())
    text = unit.read_text()
    assert f'--home "{home.resolve()}"' in text and f"--passphrase-file {secret.resolve()}" in text
    assert re.search(r"^ExecStart=\S*python\S* -m fedpal.common.cli client start ", text, re.M)
    assert "RestartPreventExitStatus=2" in text and "WantedBy=default.target" in text
    assert f"systemctl --user enable --now {unit.name}" in result.stdout and "loginctl enable-linger" in result.stdout
    user_error(
        fedpal(
            "client", "install-service", "--home", str(home), "--passphrase-file", str(secret), "--unit-dir", str(units)
        ),
        "exists",
        "--force",
    )
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    user_error(
        fedpal(
            "client",
            "install-service",
            "--home",
            str(home),
            "--passphrase-file",
            str(wrong),
            "--unit-dir",
            str(tmp_path / "other"),
            "--force",
        ),
        "passphrase",
    )
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- real processes


def test_an_unreachable_server_is_retried_with_backoff_and_said_once(tmp_path, processes):  # noqa: F811
    deploy = tmp_path / "deploy"
    port = _free_port()  # nothing listens there
    ok(_server_init(deploy, port))
    home = tmp_path / "me"
    result = ok(_client_init(home, port, deploy / "tls" / "ca.crt"))
    assert "does not answer now" in result.stderr
    log = tmp_path / "agent.log"
    env = {**os.environ, "FEDPAL_PASSPHRASE": PASSPHRASE}
    agent = _start(processes, _fedpal_command("client", "start", "--home", str(home)), log, env)
    records = home / "agent" / "logs" / "agent.jsonl"
    _wait(
        lambda: records.is_file() and records.read_text().count("Connection attempt failed") >= 3,
        90,
        "three connection attempts",
        [log, records],
    )
    agent.terminate()
    assert agent.wait(timeout=30) == 0
    assert log.read_text().count("cannot reach the server") == 1, log.read_text()
    assert not (home / "agent" / "agent.pid").exists()
    assert [json.loads(raw)["message"] for raw in records.read_text().splitlines()][-1] == "agent stopped"


def _wait(predicate, seconds: float, what: str, logs: list[Path]) -> None:
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-2500:]}" for log in logs if log.exists())
            pytest.fail(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.5)


def _recent_rounds(home: Path) -> list[dict]:
    """The events a home's rounds.json holds, oldest first."""
    return json.loads((home / "agent" / "rounds.json").read_text())["recent"]


def _fedpal_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedpal.common.cli", *args]


def test_keys_policy_and_a_round_on_a_real_deployment(tmp_path, processes):  # noqa: F811
    """``server start``; an unregistered key and a removed key are refused; three agents join,
    one whose policy says busy declines and the round completes from the other two; the final
    adapter and the epsilon spent on it reach all three; status on both sides; no log holds
    memory text."""
    import numpy as np
    from safetensors.numpy import load_file

    from fedpal.client.memory import PreferenceMemory
    from fedpal.server.federation import load_global_adapter

    port = _free_port()
    deploy = tmp_path / "deploy"
    ok(_server_init(deploy, port, "--set", "secagg=false", "--set", "personal-guard=false"))
    env = {**os.environ, "FEDPAL_PASSPHRASE": PASSPHRASE, "COLUMNS": "250"}
    server_log = tmp_path / "server.log"
    _start(processes, _fedpal_command("server", "start", str(deploy)), server_log, env)
    _wait(lambda: "SuperLink listening" in server_log.read_text(), 90, "the SuperLink", [server_log])

    ca = deploy / "tls" / "ca.crt"
    homes = {name: tmp_path / name for name in ("alice", "bob", "carol", "mallory", "eve")}
    for name, home in homes.items():  # `client init` itself is tested above; in-process here saves start-ups
        assert init_agent(home, f"localhost:{port}", ca, Policy(0.0, True, ""), "json", PASSPHRASE)[2]  # reachable
    for secret, name in zip(SECRETS, ("alice", "bob", "carol")):
        with PreferenceMemory.open(homes[name], passphrase=PASSPHRASE) as memory:
            memory.add_pair(f"{secret}: how should replies look?", f"short, {secret}", f"long and cold, {secret}")
    pub = {name: (home / "agent" / "node.pub") for name, home in homes.items()}

    # another deployment's CA, or a name the certificate does not hold ('127.1' reaches
    # 127.0.0.1): one line naming what is wrong, and no home written
    other = tmp_path / "other-deploy"
    ok(_server_init(other, port))
    stranger = tmp_path / "stranger"
    user_error(
        _client_init(stranger, port, other / "tls" / "ca.crt"), "not certified by the CA", str(other / "tls" / "ca.crt")
    )
    user_error(
        fedpal("client", "init", "--home", str(stranger), "--server", f"127.1:{port}", "--ca", str(ca)),
        "does not name '127.1'",
    )
    assert not stranger.exists()

    # never added: refused with one line naming the key
    started = time.time()
    refused = fedpal("client", "start", "--home", str(homes["mallory"]), timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert str(pub["mallory"]) in refused.stderr.splitlines()[-1] and "refused this node's key" in refused.stderr
    assert time.time() - started < 60

    # added, connected, removed: refused afterwards (and Flower admits a removed key never again)
    ok(fedpal("server", "add-client", str(deploy), pub["eve"].read_text().strip(), "--name", "eve"))
    eve_log = tmp_path / "eve.log"
    eve = _start(processes, _fedpal_command("client", "start", "--home", str(homes["eve"])), eve_log, env)
    _wait(lambda: "note: connected to" in eve_log.read_text(), 90, "eve's agent to connect", [eve_log])
    eve.terminate()
    assert eve.wait(timeout=30) == 0
    ok(fedpal("server", "remove-client", str(deploy), str(pub["eve"])))
    again = fedpal("client", "start", "--home", str(homes["eve"]), timeout=120)
    assert again.returncode == 2 and str(pub["eve"]) in again.stderr.splitlines()[-1], again.stderr
    user_error(fedpal("server", "add-client", str(deploy), str(pub["eve"])), "was removed", "new key")

    # three agents; carol's policy says busy (a training window that excludes now)
    now = datetime.datetime.now()
    closed = f"{(now + datetime.timedelta(hours=6)):%H:%M}-{(now + datetime.timedelta(hours=7)):%H:%M}"
    config = homes["carol"] / "agent" / "agent.toml"
    config.write_text(config.read_text().replace('window = ""', f'window = "{closed}"'))
    logs = [server_log]
    for name in ("alice", "bob", "carol"):
        ok(fedpal("server", "add-client", str(deploy), pub[name].read_text(), "--name", name))
        logs.append(tmp_path / f"{name}.log")
        _start(processes, _fedpal_command("client", "start", "--home", str(homes[name])), logs[-1], env)
    metrics = deploy / "run" / "metrics.jsonl"
    _wait(lambda: metrics.is_file() and metrics.read_text().endswith("\n"), 400, "round 1", logs)
    [line] = [json.loads(raw) for raw in metrics.read_text().splitlines()]
    assert line["aggregated"] and line["dp"] and line["clients_summed"] == 2, line
    assert line["epsilon"] is not None and line["epsilon"] > 0

    _wait(lambda: processes[0].poll() is not None, 120, "the server to send the final adapter and stop", [server_log])
    assert processes[0].returncode == 0, server_log.read_text()[-3000:]

    # carol declined the round (nothing trained), then saved the run's final adapter, as the others did
    carol = json.loads(ok(fedpal("client", "status", "--home", str(homes["carol"]), "--json")).stdout)
    assert (
        carol["rounds_declined"] >= 1 and carol["rounds_joined"] == 0 and "outside the training window" in carol["busy"]
    )
    assert set(carol["adapters"]) == {"shared"} and carol["last_global_final"]
    alice = json.loads(ok(fedpal("client", "status", "--home", str(homes["alice"]), "--json")).stdout)
    assert alice["rounds_joined"] == 1 and alice["last_global_round"] == 1 and alice["busy"] is None
    assert alice["last_global_final"] and alice["global_through"] == 1
    assert set(alice["adapters"]) == {"shared", "personal"} and alice["memory_bytes"] > 0
    assert alice["agent_pid"] is not None
    # the epsilon the server had spent on each adapter it sent: none before round 1, round 1's after it
    events = [(e["event"], e.get("epsilon")) for e in _recent_rounds(homes["alice"])]
    assert events == [("joined", 0.0), ("final", line["epsilon"])]
    assert alice["epsilon"] == line["epsilon"] and alice["delta"] == 1e-5
    text = ok(fedpal("client", "status", "--home", str(homes["alice"]))).stdout
    assert (
        "last global adapter: the final one, received after round 1" in text and "(aggregated through round 1)" in text
    )
    assert f"privacy: epsilon {line['epsilon']:.4g} at delta 1e-05 spent by the run" in text
    # the final adapter is the run's last aggregate, in every home
    final = load_global_adapter(deploy / "run")
    for name in ("alice", "bob", "carol"):
        shared = load_file(homes[name] / "adapters" / "shared" / "adapter_model.safetensors")
        for key, array in final.items():
            np.testing.assert_array_equal(shared[key], array)
    status = json.loads(ok(fedpal("server", "status", str(deploy), "--json")).stdout)
    assert status["rounds_done"] == 1 and status["epsilon"] == line["epsilon"] and not status["superlink_running"]
    by_name = {c["name"]: c for c in status["clients"]}
    assert by_name["eve"]["status"] == "removed"
    assert all(by_name[n]["rounds_asked"] == 1 for n in ("alice", "bob", "carol")) and status["clients_seen"] >= 3
    text = ok(fedpal("server", "status", str(deploy))).stdout
    assert "rounds 1 of 1" in text and "round 1: ok; 2 clients" in text

    # the agents' JSON-lines logs (and the server's) never hold memory text
    scanned = 0
    for log in [*tmp_path.rglob("*.jsonl"), *tmp_path.rglob("*.log")]:
        if log.name == "metrics.jsonl":
            continue
        body = log.read_text(errors="replace")
        scanned += 1
        assert not any(secret in body for secret in SECRETS), log
        if log.name == "agent.jsonl":
            assert all(json.loads(raw)["message"] is not None for raw in body.splitlines())
    assert scanned >= 8
    assert (
        "declining this round: outside the training window"
        in (homes["carol"] / "agent" / "logs" / "agent.jsonl").read_text()
    )
