"""The client agent: one user's machine taking part in a fedpal deployment.

``fedpal client init`` adds an ``agent/`` folder to the user's home (creating the home and
its encrypted memory if needed):

- ``agent.toml``: the server's address, the training policy, the log format;
- ``ca.crt``: the deployment's CA (a copy of the file the operator sent);
- ``node.key`` (mode 0600, never leaves) and ``node.pub``: the node's EC key pair in
  OpenSSH format, which Flower's SuperNode authentication uses; the operator registers
  the public key with ``fedpal server add-client``;
- ``device.json``: what the machine has (CPU cores, memory, GPU) when it joined;
- ``rounds.json``: rounds joined and declined, the saved global adapter's round and the
  privacy (epsilon, delta) the server reported as spent on it, written by the ClientApp;
- ``logs/``: the agent's rotated logs (JSON lines by default).

``fedpal client start`` runs Flower's ``flower-supernode`` with TLS and the node key; the
ClientApp reads the policy from here before each round and declines at once when the
machine is busy (load, battery, outside the time window), which the server counts as a
dropout. This module is imported inside the ClientApp, so it imports nothing heavy at
the top.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedpal.common.deploy import flower_command, join_address, key_fingerprint, parse_address
from fedpal.common.errors import FedpalError, first_line
from fedpal.common.files import write_atomic
from fedpal.common.privacy import PrivacySpent

AGENT_DIR = "agent"
LOG_FORMATS = ("json", "text")
LOG_BYTES = 5_000_000
LOG_BACKUPS = 5
KEPT_ROUNDS = 200
"""rounds.json keeps the newest this many joined and declined rounds (counts cover all)."""
_WINDOW = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ----------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    """When this machine may train: all conditions must hold at the start of a round.

    ``max_load``: the 1-minute load average per CPU core must be below it (0 turns the
    check off); ``require_ac``: not on battery (a machine without a battery counts as
    on AC power); ``window``: local time ``HH:MM-HH:MM`` (may wrap midnight; empty: any time).
    """

    max_load: float = 0.75
    require_ac: bool = True
    window: str = ""

    def check(self) -> None:
        if not (self.max_load >= 0):
            raise FedpalError(f"max-load must be a number >= 0 (load per core; 0 = no limit), not {self.max_load}")
        if self.window:
            match = _WINDOW.fullmatch(self.window)
            if not match or int(match[1]) > 23 or int(match[3]) > 23 or int(match[2]) > 59 or int(match[4]) > 59:
                raise FedpalError(f"window '{self.window}' is not HH:MM-HH:MM in 24-hour time, e.g. 22:00-07:00")

    def busy_reason(self, now: datetime.datetime | None = None) -> str | None:
        """Why training must wait now (None: it may run). Cheap: read at the start of every round."""
        if self.window:
            now = now or datetime.datetime.now()
            match = _WINDOW.fullmatch(self.window)
            assert match is not None
            start, end = int(match[1]) * 60 + int(match[2]), int(match[3]) * 60 + int(match[4])
            minute = now.hour * 60 + now.minute
            inside = start <= minute < end if start <= end else minute >= start or minute < end
            if not inside:
                return f"outside the training window {self.window} (now {now:%H:%M})"
        if self.max_load > 0:
            per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
            if per_core >= self.max_load:
                return f"CPU load {per_core:.2f} per core is at or over max-load {self.max_load:g}"
        if self.require_ac and on_battery():
            return "running on battery (require-ac-power = true)"
        return None


def on_battery(power_supply: Path = Path("/sys/class/power_supply")) -> bool:
    """True when the machine has a battery and no external power source is online."""
    if not power_supply.is_dir():
        return False
    has_battery, external_online = False, False
    for supply in power_supply.iterdir():
        try:
            kind = (supply / "type").read_text().strip()
        except OSError:
            continue
        if kind == "Battery":
            has_battery = True
        elif (supply / "online").is_file():
            try:
                external_online |= (supply / "online").read_text().strip() == "1"
            except OSError:
                pass
    return has_battery and not external_online


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AgentConfig:
    """``<home>/agent/agent.toml`` plus the paths of the agent's files."""

    home: Path
    server: str
    policy: Policy = field(default_factory=Policy)
    log_format: str = "json"

    @property
    def folder(self) -> Path:
        return self.home / AGENT_DIR

    @property
    def config_file(self) -> Path:
        return self.folder / "agent.toml"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def private_key(self) -> Path:
        return self.folder / "node.key"

    @property
    def public_key(self) -> Path:
        return self.folder / "node.pub"

    @property
    def rounds_file(self) -> Path:
        return self.folder / "rounds.json"

    @property
    def device_file(self) -> Path:
        return self.folder / "device.json"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def pid_file(self) -> Path:
        return self.folder / "agent.pid"

    def toml(self) -> str:
        return "\n".join(
            [
                "# fedpal client agent (fedpal client init); read by the agent and, each round, by the ClientApp",
                f"server = {json.dumps(self.server)}",
                "",
                "[policy]",
                "# train only while the 1-minute load average per core is below this (0: no limit)",
                f"max-load = {self.policy.max_load!r}",
                "# train only on AC power (a machine without a battery counts as on AC)",
                f"require-ac-power = {'true' if self.policy.require_ac else 'false'}",
                "# local time HH:MM-HH:MM when training may start (empty: any time)",
                f"window = {json.dumps(self.policy.window)}",
                "",
                "[logging]",
                f"format = {json.dumps(self.log_format)}",
                "",
            ]
        )

    @classmethod
    def load(cls, home: Path) -> "AgentConfig":
        """The agent of ``home``, or a one-line error saying how to make one."""
        path = home / AGENT_DIR / "agent.toml"
        if not path.is_file():
            raise FedpalError(
                f"{home} has no client agent; set one up with: fedpal client init --home {home} "
                "--server HOST:PORT --ca ca.crt"
            )
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            policy_data = data.get("policy", {})
            policy = Policy(
                max_load=float(policy_data.get("max-load", Policy.max_load)),
                require_ac=bool(policy_data.get("require-ac-power", Policy.require_ac)),
                window=str(policy_data.get("window", "")),
            )
            config = cls(home, str(data["server"]), policy, str(data.get("logging", {}).get("format", "json")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise FedpalError(f"{path} is not a valid agent config ({first_line(err)})") from None
        try:
            config.policy.check()
        except FedpalError as err:
            raise FedpalError(f"{path}: {err}") from None
        if config.log_format not in LOG_FORMATS:
            raise FedpalError(f"{path}: [logging] format must be one of {', '.join(LOG_FORMATS)}")
        return config


# ----------------------------------------------------------------------------- init


def check_ca_file(path: Path) -> bytes:
    """The PEM bytes of a CA certificate file, or a one-line error naming the file and what is wrong."""
    from cryptography import x509

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FedpalError(f"CA file {path} does not exist; use the ca.crt your server operator sent") from None
    except IsADirectoryError:
        raise FedpalError(f"CA file {path} is a folder; name the ca.crt file the operator sent") from None
    except OSError as err:
        raise FedpalError(f"cannot read the CA file {path}: {err.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise FedpalError(f"CA file {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise FedpalError(
            f"{path} is not a CA certificate (it is {cert.subject.rfc4514_string()}); "
            "use the deployment's ca.crt, not the server's certificate"
        )
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        raise FedpalError(f"the CA certificate in {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return data


def tls_problem(address: str, ca: Path, timeout: float = 5.0) -> tuple[str | None, bool]:
    """Why a TLS connection to ``address`` verified with ``ca`` fails (None: it works or cannot be
    tried), and whether the server answered at all. An unreachable server is no configuration
    mistake: the agent retries."""
    host, port = parse_address(address)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return None, True
    except ssl.SSLCertVerificationError as err:
        detail = err.verify_message or first_line(err)
        if "mismatch" in detail.lower():
            return (
                f"the server's certificate does not name '{host}' ({detail}): use the address the operator "
                "gave you (the deployment's README names it)"
            ), True
        return (
            f"the server at {address} is not certified by the CA in {ca} ({detail}): "
            "get the ca.crt of this deployment from the operator"
        ), True
    except ssl.SSLError:
        return None, True
    except OSError:
        return None, False


def device_summary() -> dict[str, Any]:
    """What the machine had when it joined (``client status`` shows it); the trainer's own device
    profile picks batch size and sequence length from what is free at each round."""
    import psutil

    summary: dict[str, Any] = {
        "cpu_cores": os.cpu_count(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            summary["gpu"] = {"name": props.name, "memory_bytes": int(props.total_memory)}
    except ImportError:
        pass
    summary["device"] = "cuda" if summary["gpu"] else "cpu"
    return summary


def init_agent(
    home: Path, server: str, ca_file: Path, policy: Policy, log_format: str, passphrase: str | None
) -> tuple[AgentConfig, str, bool]:
    """Set up the agent in ``home``; returns its config, the public key line to send to the operator,
    and whether the server answered (its certificate then verified with the CA).

    Everything is checked before anything is written (the address, the CA file, the
    policy, a TLS handshake with the server when it is up); the memory is created or
    unlocked next (a wrong or missing passphrase stops here, with nothing written), then
    the ``agent/`` folder appears in one rename.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PreferenceMemory
    from fedpal.common.files import staged_folder

    host, port = parse_address(server)
    server = join_address(host, port)
    planned = ClientHome.planned(home)
    if "'" in str(planned.root):
        raise FedpalError(
            f"the home path {planned.root} holds a single quote, which Flower's --node-config cannot carry"
        )
    config = AgentConfig(planned.root, server, policy, log_format)
    policy.check()
    if log_format not in LOG_FORMATS:
        raise FedpalError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    if config.folder.exists():
        raise FedpalError(
            f"{planned.root} already has a client agent ({config.folder}); its public key is in {config.public_key}"
        )
    ca_pem = check_ca_file(ca_file.expanduser().resolve())
    problem, reachable = tls_problem(server, ca_file.expanduser().resolve())
    if problem:
        raise FedpalError(problem)
    device = device_summary()
    PreferenceMemory.open(planned.root, passphrase=passphrase).close()
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with staged_folder(config.folder) as staging:
        write_atomic(staging / "node.key", private, 0o600)
        write_atomic(staging / "node.pub", (public + "\n").encode())
        write_atomic(staging / "ca.crt", ca_pem)
        write_atomic(staging / "device.json", (json.dumps(device, indent=2) + "\n").encode())
        write_atomic(staging / "agent.toml", config.toml().encode())
    os.chmod(config.folder, 0o700)
    return config, public, reachable


# ----------------------------------------------------------------------------- rounds


def read_rounds(config: AgentConfig) -> dict[str, Any]:
    """rounds.json (an empty record when no round was seen yet).

    ``last_global_round``: the round whose message brought the saved global adapter;
    ``global_through``: the last round aggregated into it (the round before, or that round
    itself for the run's final adapter, ``last_global_final``); ``epsilon``/``delta``: the
    privacy the run had spent on it, as the server reported (None: no DP).
    """
    empty = {
        "joined": 0,
        "declined": 0,
        "last_global_round": None,
        "last_global_at": None,
        "last_global_final": False,
        "global_through": None,
        "epsilon": None,
        "delta": None,
        "recent": [],
    }
    try:
        data = json.loads(config.rounds_file.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return empty
    return {**empty, **data} if isinstance(data, dict) else empty


def record_round(
    home: Path, event: str, server_round: int | None = None, reason: str = "", spent: PrivacySpent | None = None
) -> None:
    """Note a round joined (``event='joined'``, after the global adapter was saved), declined, or
    the run's final global adapter saved after round ``server_round`` (``event='final'``), with
    the privacy the server reported as spent on that adapter.

    Called by the ClientApp; homes without an agent (simulations) are left alone.
    """
    folder = home / AGENT_DIR
    if not (folder / "agent.toml").is_file():
        return
    config = AgentConfig(home, "")
    data = read_rounds(config)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if event in ("joined", "declined"):
        data[event] = int(data.get(event, 0)) + 1
    if event in ("joined", "final") and server_round is not None:
        final = event == "final"
        data.update(
            last_global_round=server_round,
            last_global_at=now,
            last_global_final=final,
            global_through=server_round if final else server_round - 1,
            epsilon=spent.epsilon if spent is not None else None,
            delta=spent.delta if spent is not None else None,
        )
    entry: dict[str, Any] = {"event": event, "round": server_round, "at": now}
    if reason:
        entry["reason"] = reason
    if spent is not None:
        entry["epsilon"] = spent.epsilon
    data["recent"] = [*data.get("recent", []), entry][-KEPT_ROUNDS:]
    write_atomic(config.rounds_file, (json.dumps(data, indent=2) + "\n").encode())


def policy_verdict(home: Path) -> str | None:
    """Why ``home``'s agent policy says busy now (None: train, or no agent in this home)."""
    if not (home / AGENT_DIR / "agent.toml").is_file():
        return None
    return AgentConfig.load(home).policy.busy_reason()


# ----------------------------------------------------------------------------- logs


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the SuperNode's own level)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        return json.dumps(line, ensure_ascii=False)


def agent_logger(config: AgentConfig) -> logging.Logger:
    """The agent's rotating log (``agent.jsonl`` or ``agent.log``), at most 6 x 5 MB."""
    config.logs.mkdir(parents=True, exist_ok=True)
    name = "agent.jsonl" if config.log_format == "json" else "agent.log"
    handler = logging.handlers.RotatingFileHandler(
        config.logs / name, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(
        JsonLines()
        if config.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logger = logging.getLogger(f"fedpal.agent.{config.home}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


# ----------------------------------------------------------------------------- start


def check_node_key(config: AgentConfig) -> None:
    """The node's private key must be there, private to this user, and a key Flower accepts."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = config.private_key
    if not path.is_file():
        raise FedpalError(
            f"the node key {path} is missing; this home cannot join (set up a new agent with fedpal client init)"
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise FedpalError(f"the node key {path} can be read by others (mode {mode:o}); run: chmod 600 {path}")
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise FedpalError(f"the node key {path} is not an OpenSSH private key ({first_line(err)})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedpalError(f"the node key {path} is not an EC key, which Flower's node authentication needs")


def running_pid(config: AgentConfig) -> int | None:
    """The pid of this home's running agent, if one runs (a stale pid file after a power loss is ignored)."""
    import psutil

    try:
        pid = int(config.pid_file.read_text().strip())
        return pid if "client" in " ".join(psutil.Process(pid).cmdline()) else None
    except (OSError, ValueError, psutil.Error):
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def supernode_command(config: AgentConfig) -> list[str]:
    """``flower-supernode`` with TLS (the deployment's CA), the node key, and this home as node config."""
    # the SuperNode's local Runtime API (its ClientApp talks to it): any free port, so that
    # several agents (users) can share a machine
    return [
        flower_command("flower-supernode"),
        "--superlink",
        config.server,
        "--root-certificates",
        str(config.ca),
        "--auth-supernode-private-key",
        str(config.private_key),
        "--node-config",
        f"home='{config.home}'",
        "--port",
        str(_free_port()),
    ]


@dataclass
class _Watch:
    """What the SuperNode's output said so far."""

    refused: bool = False
    unreachable_said: bool = False
    node_id: str | None = None
    lines: list[str] = field(default_factory=list)


def run_agent(config: AgentConfig, passphrase: str | None, say: Callable[[str], None]) -> int:
    """Run the SuperNode until it ends or this process is told to stop; returns the exit status.

    The SuperNode reconnects with backoff by itself; the agent says once that the server
    is unreachable, and once when it is connected. A refused key ends the agent with
    one error line naming the key. All the SuperNode's output goes to the agent's log.
    """
    from fedpal.client.memory import PreferenceMemory

    check_node_key(config)
    check_ca_file(config.ca)
    problem, _ = tls_problem(config.server, config.ca)
    if problem:
        raise FedpalError(problem)
    PreferenceMemory.open(config.home, passphrase=passphrase).close()
    if running_pid(config) is not None:
        raise FedpalError(f"an agent already runs for {config.home} (pid {running_pid(config)})")
    command = supernode_command(config)
    logger = agent_logger(config)
    # Flower keeps the apps it installs and its own state under FLWR_HOME: the agent's, in the home
    env = {**os.environ, "FLWR_HOME": str(config.folder / "flwr")}
    if passphrase is not None:
        env["FEDPAL_PASSPHRASE"] = passphrase
    fingerprint = key_fingerprint(config.public_key.read_text())
    logger.info("agent starting", extra={"fields": {"server": config.server, "key": fingerprint, "pid": os.getpid()}})
    say(f"note: agent for {config.home} joining {config.server}; log in {config.logs}")
    write_atomic(config.pid_file, f"{os.getpid()}\n".encode())
    # its own process group: the SuperNode starts a SuperExec (and ClientApps), which must
    # all end with it, also when the SuperNode itself exits first
    node = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(node, lines), daemon=True).start()
    stopping: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        _signal_group(node, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    watch = _Watch()
    ended_at: float | None = None
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break
            quiet = bool(stopping) or ended_at is not None
            _watch_line(_ANSI.sub("", line.rstrip("\n")), watch, config, logger, None if quiet else say)
            if ended_at is None and (watch.refused or node.poll() is not None):
                ended_at = time.monotonic()  # the SuperNode gave up: read its last words, then end the group
            if ended_at is not None and time.monotonic() - ended_at > 2:
                break
    finally:
        _signal_group(node, signal.SIGTERM)
        try:
            node.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(node, signal.SIGKILL)
            node.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        config.pid_file.unlink(missing_ok=True)
    code = node.returncode
    logger.info(
        "agent stopped", extra={"fields": {"supernode_exit": code, "signal": stopping[0] if stopping else None}}
    )
    if stopping:
        return 0
    if watch.refused:
        raise FedpalError(
            f"the server at {config.server} refused this node's key {config.public_key} ({fingerprint}): "
            "it was never added or has been removed; send that file to the operator "
            "(fedpal server add-client)"
        )
    if code != 0:
        tail = " | ".join(watch.lines[-3:])
        raise FedpalError(f"the SuperNode stopped with exit status {code} ({tail}); see {config.logs}")
    return 0


def _pump(node: subprocess.Popen, lines: queue.Queue) -> None:
    """Hand the SuperNode's output to the agent line by line; None marks its end."""
    assert node.stdout is not None
    for raw in node.stdout:
        lines.put(raw)
    lines.put(None)


def _signal_group(node: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the SuperNode and everything it started (a group already gone is fine)."""
    try:
        os.killpg(node.pid, sig)
    except ProcessLookupError:
        pass


def _watch_line(
    line: str, watch: _Watch, config: AgentConfig, logger: logging.Logger, say: Callable[[str], None] | None
) -> None:
    if not line.strip():
        return
    head, sep, rest = line.partition(":")
    if sep and head.strip() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        level, text = head.strip(), rest.strip()
    else:  # a traceback or other plain output
        level, text = "INFO", line.strip()
    logger.log(getattr(logging, level), text, extra={"fields": {"source": "supernode"}})
    watch.lines = [*watch.lines[-9:], text]
    if "[code: 2004]" in line:
        watch.refused = True
    elif say is None:
        return
    elif "Connection attempt failed" in line and not watch.unreachable_said:
        watch.unreachable_said = True
        say(f"note: cannot reach the server at {config.server}; retrying with backoff (chat works offline meanwhile)")
    elif (found := re.search(r"SuperNode ID: (\d+)", line)) and found[1] != watch.node_id:
        watch.node_id = found[1]
        watch.unreachable_said = False
        say(f"note: connected to {config.server} as node {found[1]}")


# ----------------------------------------------------------------------------- status, service


def agent_status(config: AgentConfig) -> dict[str, Any]:
    """What ``fedpal client status`` shows: rounds, the global adapter's round, adapter versions, memory size.

    ``last_global_round`` is the round in which the server last sent its global adapter,
    which holds the aggregate of the rounds before it (the round's own aggregate reaches
    clients with the next round, the last round's with the run's final message);
    ``global_through`` the last round aggregated into it; ``epsilon`` and ``delta`` the
    privacy the run had spent on it, as the server reported.
    """
    from fedpal.client.home import ClientHome

    home = ClientHome(config.home)
    rounds = read_rounds(config)
    adapters = {}
    for name in ("shared", "personal"):
        weights = home.adapter_dir(name) / "adapter_model.safetensors"
        if weights.is_file():
            stat = weights.stat()
            adapters[name] = {
                "saved": datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "bytes": stat.st_size,
            }
    kept = sorted(p.name for p in (home.root / "kept-aside").iterdir()) if (home.root / "kept-aside").is_dir() else []
    memory = home.memory_db
    return {
        "home": str(config.home),
        "server": config.server,
        "key": key_fingerprint(config.public_key.read_text()) if config.public_key.is_file() else None,
        "agent_pid": running_pid(config),
        "policy": asdict(config.policy),
        "busy": config.policy.busy_reason(),
        "rounds_joined": rounds["joined"],
        "rounds_declined": rounds["declined"],
        "last_global_round": rounds["last_global_round"],
        "last_global_at": rounds["last_global_at"],
        "last_global_final": rounds["last_global_final"],
        "global_through": rounds["global_through"],
        "epsilon": rounds["epsilon"],
        "delta": rounds["delta"],
        "adapters": adapters,
        "kept_aside": kept,
        "memory_bytes": memory.stat().st_size if memory.is_file() else 0,
        "device": _device(config),
    }


def _device(config: AgentConfig) -> dict[str, Any] | None:
    try:
        return json.loads(config.device_file.read_text())
    except (OSError, ValueError):
        return None


def service_unit(config: AgentConfig, passphrase_file: Path) -> tuple[str, str]:
    """A systemd user unit (name, text) that runs this home's agent and restarts it after a crash.

    Exit status 2 (a refused key, a wrong CA: nothing a restart fixes) does not restart it.
    """
    import hashlib

    name = f"fedpal-agent-{hashlib.sha256(str(config.home).encode()).hexdigest()[:8]}.service"
    start = [
        sys.executable,
        "-m",
        "fedpal.common.cli",
        "client",
        "start",
        "--home",
        str(config.home),
        "--passphrase-file",
        str(passphrase_file),
    ]
    text = "\n".join(
        [
            "[Unit]",
            f"Description=fedpal client agent for {config.home}",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            "ExecStart=" + " ".join(_systemd_quote(part) for part in start),
            "Restart=on-failure",
            "RestartSec=30",
            "RestartPreventExitStatus=2",
            "Nice=10",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )
    return name, text


def _systemd_quote(word: str) -> str:
    """A word for ExecStart: quoted when it holds spaces or quotes; % doubled (systemd's specifier)."""
    word = word.replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def install_service(config: AgentConfig, passphrase_file: Path, unit_dir: Path, force: bool) -> Path:
    """Write the unit file into ``unit_dir``; returns its path."""
    from fedpal.client.cli_common import read_passphrase
    from fedpal.client.memory import PreferenceMemory

    passphrase_file = passphrase_file.expanduser().resolve()
    PreferenceMemory.open(config.home, passphrase=read_passphrase(None, str(passphrase_file), ask=False)).close()
    name, text = service_unit(config, passphrase_file)
    path = unit_dir.expanduser() / name
    if path.exists() and not force:
        raise FedpalError(f"{path} exists; add --force to replace it")
    write_atomic(path, text.encode())
    return path
