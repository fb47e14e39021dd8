"""Deployment path: a real SuperLink and two SuperNodes over TLS on localhost.

Certificates are made here with ``cryptography`` and thrown away with the test folder.
``flwr run`` gets the app folder ``fedpal server run`` uses (the project's pyproject
without the sections flwr would rewrite or install) and the SuperLink runs with runtime
dependency installation off.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedpal.common.privacy import independent_epsilon
from fedpal.server.cli import write_app_folder

PASSPHRASE = "deployment-test-passphrase"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_certificates(folder: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpal throwaway test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 15
    for proc in started:
        try:
            proc.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _start(processes: list, command: list[str], log: Path, env: dict) -> subprocess.Popen:
    handle = log.open("w")
    proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    processes.append(proc)
    return proc


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"SuperLink exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"SuperLink did not listen on {port}:\n{log.read_text()[-3000:]}")


def test_tls_deployment_survives_a_server_kill_and_resumes(tmp_path, processes):
    """``fedpal server run`` on a TLS SuperLink with two SuperNodes; the ServerApp is
    SIGKILLed after round 1 and ``--resume`` finishes the run without losing a round."""
    from fedpal.client.memory import PreferenceMemory

    certs = _make_certificates(tmp_path)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FEDPAL_PASSPHRASE": PASSPHRASE}
    link_port = _free_port()
    link_log = tmp_path / "superlink.log"
    link = _start(
        processes,
        [
            "flower-superlink",
            "--ssl-ca-certfile",
            str(certs["ca"]),
            "--ssl-certfile",
            str(certs["cert"]),
            "--ssl-keyfile",
            str(certs["key"]),
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--disable-runtime-dependency-installation",
        ],
        link_log,
        env,
    )
    _wait_for_port(link_port, link, link_log)

    homes = []
    for i in range(2):
        home = tmp_path / f"node{i}"
        memory = PreferenceMemory.open(home, passphrase=PASSPHRASE)
        memory.add_pair(f"node {i}: how should replies look?", "short and warm", "long, cold and formal")
        homes.append(home)
        _start(
            processes,
            [
                "flower-supernode",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--root-certificates",
                str(certs["ca"]),
                "--port",
                str(_free_port()),
                "--node-config",
                f"home='{home}'",
            ],
            tmp_path / f"supernode{i}.log",
            env,
        )

    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{certs["ca"]}"\n'
    )
    run_dir = tmp_path / "run"
    command = [
        "fedpal",
        "server",
        "run",
        "test",
        "--rounds",
        "2",
        "--run-dir",
        str(run_dir),
        "--set",
        "secagg=false",
        "--set",
        "min-clients=2",
        "--set",
        "local-steps=2",
        "--set",
        "personal-steps=1",
        "--set",
        "final-adapter=false",
    ]  # the final adapter is test_deploy's
    submitted = subprocess.run([*command, "--no-stream"], env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert time.time() < deadline, link_log.read_text()[-3000:]
        time.sleep(0.2)
    # the server dies in the middle of the run (SIGKILL: no chance to clean up)
    killed = _kill_serverapps(link.pid)
    assert killed, "no flwr-serverapp process found under the SuperLink"
    done_before = len(metrics.read_text().splitlines())
    # what an operator does after a crash: mark the dead run stopped (the SuperLink would
    # otherwise wait for its heartbeat to time out before starting the next ServerApp)
    run_id = re.search(r"run (\d+)", submitted.stdout).group(1)
    subprocess.run(["flwr", "stop", run_id, "test"], env=env, capture_output=True, text=True, timeout=60)

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    logs = resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert resumed.returncode == 0, logs
    assert "Uvicorn running on https://" in link_log.read_text()
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2], (done_before, logs)
    assert all(line["aggregated"] and line["clients_summed"] == 2 for line in lines)
    # the privacy ledger went on from the checkpoint: two rounds' worth, not one
    assert lines[-1]["epsilon"] == pytest.approx(independent_epsilon(1.0, 2, 1e-5, 2, 2), rel=0.05)
    for home in homes:
        assert (home / "adapters" / "personal" / "adapter_model.safetensors").is_file()


def _kill_serverapps(superlink_pid: int) -> list[int]:
    import psutil

    victims = [
        p for p in psutil.Process(superlink_pid).children(recursive=True) if "flwr-serverapp" in " ".join(p.cmdline())
    ]
    for proc in victims:
        proc.kill()
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]


@pytest.mark.slow
def test_flwr_run_on_a_simulation_superlink(tmp_path, processes):
    """``flwr run`` against a SuperLink in simulation mode: Flower's own simulation path,
    with the federation's defaults (DP and SecAgg+ on).

    Slow (suite time): the default suite runs fedpal's app through ``flwr run`` on real
    SuperLinks in the deployment tests, and a simulation SuperLink in test_population."""
    from fedpal.client.memory import PreferenceMemory

    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FEDPAL_PASSPHRASE": PASSPHRASE}
    nodes = tmp_path / "nodes"
    for i in range(3):
        PreferenceMemory.open(nodes / str(i), passphrase=PASSPHRASE).add_pair(
            f"user {i}: a question", "a short answer", "a long rambling answer"
        )
    port = _free_port()
    log = tmp_path / "superlink.log"
    link = _start(
        processes,
        [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        log,
        env,
    )
    _wait_for_port(port, link, log)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        "options.num-supernodes = 3\n"
        "options.backend.client-resources.num-cpus = 1\n"
        "options.backend.init-args.num-cpus = 2\n"
    )
    run_dir = tmp_path / "run"
    settings = (
        f"num-server-rounds=2 local-steps=2 personal-steps=1 final-adapter=false run-dir='{run_dir}' "
        f"home-base='{nodes}'"
    )
    result = subprocess.run(
        ["flwr", "run", str(write_app_folder(tmp_path / "app")), "sim", "--run-config", settings, "--stream"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, logs
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2], logs
    assert all(line["aggregated"] and line["secagg"] and line["dp"] and line["clients_summed"] == 3 for line in lines)
