"""A deployment folder: what one operator needs to run fedpal's server for a small team.

``fedpal server init DIR`` writes it once; every other ``fedpal server`` command on a
deployment reads it. It holds

- ``deployment.toml``: the address clients dial, where the SuperLink listens, and the
  federation's run config (fedpal's settings, as ``flwr run --run-config`` takes them);
- ``tls/``: a CA and the SuperLink's certificate and key, made here with ``cryptography``
  (private keys mode 0600). Users get ``tls/ca.crt``; the certificate names the address
  they dial, plus ``localhost``/``127.0.0.1`` for the operator's own ``flwr`` calls;
- ``clients.json``: the node keys the operator added, with the node id Flower gave each
  (Flower's ``flwr supernode unregister`` takes that id; its list does not show keys);
- ``flwr/`` (``FLWR_HOME`` for the ``flwr`` calls), ``state/superlink.db`` (the
  SuperLink's database: registered keys survive a restart), ``run/`` (metrics,
  checkpoint, global adapter), ``logs/``, and a README with the next commands.

The transport is Flower's Deployment Engine: ``flower-superlink`` with TLS and
``--enable-supernode-auth``, keys registered through its Control API with ``flwr supernode
register``, the ServerApp submitted with ``flwr run``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpal.common.deploy import flower_command, join_address, key_fingerprint, parse_address, stop_process_tree
from fedpal.common.errors import FedpalError, first_line
from fedpal.common.files import staged_folder, write_atomic

CONFIG_FILE = "deployment.toml"
CONNECTION = "fedpal"
"""The name of the SuperLink connection in the deployment's own ``flwr/config.toml``."""
CA_DAYS = 3650
SERVER_CERT_DAYS = 825
FEDERATION_DEFAULTS: dict[str, Any] = {
    "model": "default",
    "num-server-rounds": 3,
    "min-clients": 3,
    "dp": True,
    "secagg": True,
}
"""What ``server init`` writes into ``[federation]``; any of fedpal's settings may be added."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def read_public_key(value: str) -> str:
    """A node's public key, given as the one line ``fedpal client init`` printed or as a file holding it.

    Flower accepts NIST-curve EC keys in OpenSSH format; anything else is refused here,
    with the file named, before the SuperLink is asked.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    text, where = value.strip(), "the key given"
    if not text.startswith("ecdsa-"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise FedpalError(f"'{value}' is neither a public key line (ecdsa-sha2-...) nor a file")
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError) as err:
            raise FedpalError(f"cannot read the public key file {path}: {first_line(err)}") from None
        where = str(path)
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise FedpalError(
            f"{where} is not an OpenSSH public key ({first_line(err)}); send the line `fedpal client init` printed"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedpalError(f"{where} is not an EC key: Flower's node authentication takes NIST-curve EC keys")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@dataclass(frozen=True)
class Deployment:
    """A deployment folder as read from its ``deployment.toml`` (paths inside it are derived, not stored)."""

    root: Path
    address: str
    listen: str
    port: int
    federation: dict[str, Any] = field(default_factory=dict)

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def ca_cert(self) -> Path:
        return self.root / "tls" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "tls" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "tls" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "tls" / "server.key"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def database(self) -> Path:
        return self.root / "state" / "superlink.db"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def clients_file(self) -> Path:
        return self.root / "clients.json"

    @property
    def control_address(self) -> str:
        """Where this machine's ``flwr`` reaches the SuperLink (a name the certificate holds)."""
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "::", "127.0.0.1") else self.listen
        return join_address(host, self.port)

    @classmethod
    def load(cls, root: Path | str) -> "Deployment":
        """The deployment at ``root``, checked: its config parses and its TLS files are there."""
        path = Path(root).expanduser().resolve()
        config = path / CONFIG_FILE
        if not path.is_dir():
            raise FedpalError(
                f"no deployment folder at {path}; create one with: fedpal server init {path} --address HOST:PORT"
            )
        if not config.is_file():
            raise FedpalError(
                f"{path} is not a fedpal deployment (no {CONFIG_FILE}); create one with: fedpal server init DIR "
                "--address HOST:PORT"
            )
        try:
            data = tomllib.loads(config.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise FedpalError(f"{config} is not valid TOML ({first_line(err)})") from None
        server = data.get("server")
        if not isinstance(server, dict) or not all(k in server for k in ("address", "listen", "port")):
            raise FedpalError(f"{config} needs a [server] table with address, listen and port")
        federation = data.get("federation", {})
        if not isinstance(federation, dict):
            raise FedpalError(f"{config}: [federation] must be a table of fedpal settings")
        parse_address(str(server["address"]))
        port = server["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise FedpalError(f"{config}: port must be a number in 1-65535, not {port!r}")
        deployment = cls(path, str(server["address"]), str(server["listen"]), port, dict(federation))
        deployment.check_federation()
        for needed in (deployment.ca_cert, deployment.server_cert, deployment.server_key):
            if not needed.is_file():
                raise FedpalError(
                    f"{needed} is missing: the deployment is incomplete (make a new one with fedpal server init)"
                )
        return deployment

    def check_federation(self) -> None:
        """fedpal's own check of the run config, so a bad value is refused here and not in the ServerApp."""
        from fedpal.common.settings import FederationSettings

        try:
            FederationSettings.from_run_config(self.federation)
        except FedpalError as err:
            raise FedpalError(f"{self.config_file} [federation]: {err}") from None

    def write_flwr_config(self) -> Path:
        """Flower's connection file for this deployment (rewritten each time: the folder may have moved)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        text = (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(self.control_address)}\nroot-certificates = {json.dumps(str(self.ca_cert))}\n"
        )
        write_atomic(self.flwr_home / "config.toml", text.encode())
        return self.flwr_home

    def flwr_env(self) -> dict[str, str]:
        """The environment for ``flwr`` calls on this deployment."""
        self.write_flwr_config()
        return {**os.environ, "FLWR_HOME": str(self.flwr_home)}


def toml_value(value: Any) -> str:
    """One TOML value for the flat tables fedpal writes (strings, numbers, booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _certificates(names: list[str]) -> dict[str, bytes]:
    """A CA and a server certificate for ``names`` signed by it, all as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedpal deployment CA ({names[0]})")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    private = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": ca_key.private_bytes(*private),
        "server.crt": cert.public_bytes(serialization.Encoding.PEM),
        "server.key": key.private_bytes(*private),
    }


def init_deployment(
    root: Path | str,
    address: str,
    listen: str = "0.0.0.0",
    names: tuple[str, ...] = (),
    federation: dict[str, Any] | None = None,
) -> Deployment:
    """Create the deployment folder at ``root`` (which must not exist or be empty); returns it.

    Everything is checked first and the folder appears in one rename, so a refused or
    interrupted init leaves nothing behind.
    """
    path = Path(root).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FedpalError(f"{path} exists and is not an empty folder; a deployment is created in a new folder")
    host, port = parse_address(address)
    if not listen.strip() or any(c.isspace() for c in listen):
        raise FedpalError(f"--listen '{listen}' is not an interface address (e.g. 0.0.0.0 for all)")
    for name in names:
        if not name.strip() or any(c.isspace() or c in "/:" for c in name) and not _is_ip(name):
            raise FedpalError(f"--name '{name}' is not a host name or IP address")
    all_names = list(
        dict.fromkeys([host, *names, "localhost", "127.0.0.1", *([listen] if listen not in ("0.0.0.0", "::") else [])])
    )
    settings = {**FEDERATION_DEFAULTS, **(federation or {})}
    deployment = Deployment(path, join_address(host, port), listen, port, settings)
    deployment.check_federation()
    with staged_folder(path) as staging:
        (staging / "tls").mkdir()
        for name, data in _certificates(all_names).items():
            write_atomic(staging / "tls" / name, data, 0o600 if name.endswith(".key") else 0o644)
        lines = [
            "# fedpal deployment (fedpal server init); edit [federation] between runs",
            "[server]",
            f"# clients dial this; the TLS certificate names: {', '.join(all_names)}",
            f"address = {toml_value(deployment.address)}",
            "# the interface the SuperLink listens on",
            f"listen = {toml_value(listen)}",
            f"port = {port}",
            "",
            "# fedpal's run config (any key of [tool.flwr.app.config]); the run folder is run/",
            "[federation]",
        ]
        lines += [f"{k} = {toml_value(v)}" for k, v in settings.items()]
        write_atomic(staging / CONFIG_FILE, ("\n".join(lines) + "\n").encode())
        write_atomic(staging / "clients.json", b"{}\n")
        write_atomic(staging / "README.md", readme_text(deployment).encode())
        for sub in ("state", "run", "logs"):
            (staging / sub).mkdir()
    # staged_folder made the folder with mkdtemp's private mode; the deployment is an ordinary folder
    os.chmod(path, 0o755)
    return deployment


def readme_text(deployment: Deployment) -> str:
    """The next commands, written into the deployment folder for the operator."""
    root = deployment.root
    return f"""# fedpal deployment

Clients dial `{deployment.address}`. Send each user `tls/ca.crt` (public; `tls/*.key` never leave this folder).

1. Start the server (SuperLink with TLS and node authentication, then the federation's rounds):

       fedpal server start {root}

2. Each user, on their machine:

       fedpal client init --home ~/fedpal-me --server {deployment.address} --ca ca.crt

   prints a public key line (`ecdsa-sha2-nistp384 ...`) to send you.

3. Admit that user's node (while the server runs):

       fedpal server add-client {root} 'ecdsa-sha2-nistp384 AAAA...' --name alice

4. The user starts their agent (or `fedpal client install-service --home ~/fedpal-me ...`):

       fedpal client start --home ~/fedpal-me

5. Watch progress, and revoke a node:

       fedpal server status {root}
       fedpal server remove-client {root} 'ecdsa-sha2-nistp384 AAAA...'

Settings of the federation are in `deployment.toml` [federation]; a run that stopped is
resumed by the next `fedpal server start` from `run/checkpoint`. Raise
`num-server-rounds` there to train further.
"""


# ----------------------------------------------------------------------------- clients


def read_clients(deployment: Deployment) -> dict[str, dict[str, Any]]:
    """``clients.json``: fingerprint -> {public_key, name, node_id, added, removed}."""
    try:
        data = json.loads(deployment.clients_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as err:
        raise FedpalError(f"{deployment.clients_file} is damaged ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise FedpalError(f"{deployment.clients_file} is damaged (not a JSON object)")
    return data


def _write_clients(deployment: Deployment, clients: dict[str, dict[str, Any]]) -> None:
    write_atomic(deployment.clients_file, (json.dumps(clients, indent=2, sort_keys=True) + "\n").encode())


def _flwr(deployment: Deployment, *args: str, timeout: float = 60) -> dict[str, Any]:
    """``flwr ARGS fedpal --format json`` on this deployment's SuperLink; its JSON answer, or a one-line error."""
    flwr = flower_command("flwr")
    if not superlink_listening(deployment):
        raise FedpalError(
            f"the SuperLink of {deployment.root} is not running on port {deployment.port}; "
            f"start it with: fedpal server start {deployment.root}"
        )
    try:
        done = subprocess.run(
            [flwr, *args, CONNECTION, "--format", "json"],
            env=deployment.flwr_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise FedpalError(f"flwr {args[0]} {args[1]} got no answer from the SuperLink within {timeout:.0f} s") from None
    try:
        answer = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        answer = {
            "success": False,
            "error-message": (done.stderr or done.stdout).strip() or f"exit status {done.returncode}",
        }
    if not answer.get("success"):
        message = str(answer.get("error-message", "")).strip().splitlines()
        raise _FlwrRefused(message[-1] if message else "no reason given")
    return answer


class _FlwrRefused(FedpalError):
    """The SuperLink answered ``flwr`` with an error (its reason is the message)."""


def add_client(deployment: Deployment, public_key: str, name: str | None = None) -> dict[str, Any]:
    """Register a node key with the SuperLink (``flwr supernode register``) and remember its node id."""
    line = read_public_key(public_key)
    fingerprint = key_fingerprint(line)
    clients = read_clients(deployment)
    known = clients.get(fingerprint)
    if known and not known.get("removed"):
        raise FedpalError(
            f"key {fingerprint} is already admitted (node "
            f"{known['node_id']}{', ' + known['name'] if known.get('name') else ''})"
        )
    if known:
        raise FedpalError(
            f"key {fingerprint} was removed on {known['removed']} and Flower does not admit a removed key "
            "again; the user makes a new home with a new key (fedpal client init)"
        )
    keys = deployment.root / "state" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    key_file = keys / (fingerprint.split(":", 1)[1].replace("/", "_").replace("+", "-") + ".pub")
    write_atomic(key_file, (line + "\n").encode())
    args = ["supernode", "register", str(key_file)]
    if name:
        args += ["--name", name]
    try:
        answer = _flwr(deployment, *args)
    except _FlwrRefused as err:
        key_file.unlink(missing_ok=True)
        raise FedpalError(f"the SuperLink refused key {fingerprint}: {err}") from None
    entry = {
        "public_key": line,
        "name": name or "",
        "node_id": int(answer["node-id"]),
        "added": _now(),
        "removed": None,
    }
    clients[fingerprint] = entry
    _write_clients(deployment, clients)
    return {"fingerprint": fingerprint, **entry}


def remove_client(deployment: Deployment, public_key: str) -> dict[str, Any]:
    """Unregister a node key (``flwr supernode unregister``): that node is refused from now on."""
    fingerprint = key_fingerprint(read_public_key(public_key))
    clients = read_clients(deployment)
    known = clients.get(fingerprint)
    if known is None:
        raise FedpalError(
            f"key {fingerprint} was never added to {deployment.root} (see: fedpal server status {deployment.root})"
        )
    if known.get("removed"):
        raise FedpalError(f"key {fingerprint} was already removed on {known['removed']}")
    try:
        _flwr(deployment, "supernode", "unregister", str(known["node_id"]))
    except _FlwrRefused as err:
        raise FedpalError(
            f"the SuperLink refused to remove node {known['node_id']} (key {fingerprint}): {err}"
        ) from None
    known["removed"] = _now()
    _write_clients(deployment, clients)
    return {"fingerprint": fingerprint, **known}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- running


def superlink_listening(deployment: Deployment, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the deployment's port (on this machine)."""
    host = deployment.control_address.rsplit(":", 1)[0].strip("[]")
    try:
        with socket.create_connection((host, deployment.port), timeout=timeout):
            return True
    except OSError:
        return False


def superlink_command(deployment: Deployment) -> list[str]:
    """``flower-superlink`` with TLS, node authentication, a persistent database and rotated logs."""
    return [
        flower_command("flower-superlink"),
        "--ssl-ca-certfile",
        str(deployment.ca_cert),
        "--ssl-certfile",
        str(deployment.server_cert),
        "--ssl-keyfile",
        str(deployment.server_key),
        "--enable-supernode-auth",
        "--host",
        deployment.listen,
        "--port",
        str(deployment.port),
        "--database",
        str(deployment.database),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(deployment.logs / "superlink.log"),
        "--log-rotation-interval-hours",
        "24",
        "--log-rotation-backup-count",
        "7",
    ]


def run_settings(deployment: Deployment) -> dict[str, str]:
    """The run config ``server start`` submits: the [federation] table, the run folder, and
    ``resume`` when a checkpoint from an earlier start is there."""
    from fedpal.server.federation import CHECKPOINT_DIR

    # run_config_string quotes what is not a number or a boolean
    values = {k: str(v) if isinstance(v, str) else toml_value(v) for k, v in deployment.federation.items()}
    values["run-dir"] = str(deployment.run_dir)
    if (deployment.run_dir / CHECKPOINT_DIR).is_dir():
        values["resume"] = "true"
    return values


def status(deployment: Deployment) -> dict[str, Any]:
    """Rounds, clients (added, removed, what the SuperLink says of them when it runs, and in how
    many rounds the server asked them to train), epsilon spent. A client is *seen* once it
    connected or was asked to train."""
    from fedpal.server.cli import read_metrics
    from fedpal.server.federation import METRICS_FILE

    rounds: list[dict] = []
    partial = False
    if (deployment.run_dir / METRICS_FILE).is_file():
        rounds, partial = read_metrics(deployment.run_dir)
    clients = read_clients(deployment)
    running = superlink_listening(deployment)
    online: dict[int, str] = {}
    if running:
        try:
            answer = _flwr(deployment, "supernode", "list", timeout=30)
            online = {int(n["node-id"]): str(n["status"]) for n in answer.get("nodes", [])}
        except FedpalError:
            running = False
    rows = []
    for fingerprint, entry in sorted(clients.items(), key=lambda item: item[1].get("added") or ""):
        node = int(entry["node_id"])
        state = "removed" if entry.get("removed") else online.get(node, "unknown" if not running else "registered")
        asked = sum(1 for r in rounds if str(node) in r.get("bytes_down", {}))
        rows.append(
            {
                "fingerprint": fingerprint,
                "name": entry.get("name", ""),
                "node_id": node,
                "added": entry.get("added"),
                "removed": entry.get("removed"),
                "status": state,
                "rounds_asked": asked,
                "seen": state in ("online", "offline") or asked > 0,
            }
        )
    done = [r for r in rounds if "stopped" not in r]
    epsilon = next((r["epsilon"] for r in reversed(rounds) if r.get("epsilon") is not None), None)
    return {
        "deployment": str(deployment.root),
        "address": deployment.address,
        "superlink_running": running,
        "rounds_done": len(done),
        "rounds_planned": int(deployment.federation.get("num-server-rounds", 0)),
        "epsilon": epsilon,
        "delta": deployment.federation.get("delta", 1e-5),
        "clients": rows,
        "clients_seen": sum(1 for r in rows if r["seen"]),
        "rounds": rounds,
        "partial_last_line": partial,
    }


def serve(deployment: Deployment, say: Callable[[str], None]) -> int:
    """Run the SuperLink, submit the federation with ``flwr run --stream`` (its logs go to
    stdout), and stop the SuperLink when the run ends or this process is told to stop
    (SIGTERM, Ctrl-C); returns ``flwr run``'s exit status.

    The ServerApp waits for ``min-clients`` registered nodes to connect; a checkpoint in
    ``run/`` from an earlier start is resumed, privacy ledger included.
    """
    from fedpal.server.cli import run_config_string, write_app_folder

    flwr = flower_command("flwr")
    if superlink_listening(deployment):
        raise FedpalError(
            f"port {deployment.port} is already in use: is the server of {deployment.root} running already?"
        )
    command = superlink_command(deployment)
    settings = run_config_string(run_settings(deployment))
    env = deployment.flwr_env()
    deployment.logs.mkdir(parents=True, exist_ok=True)
    console = deployment.logs / "superlink.console.log"
    stopping: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    with console.open("w") as handle:
        link = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while not superlink_listening(deployment):
            if link.poll() is not None or time.monotonic() > deadline:
                tail = [line for line in console.read_text(errors="replace").splitlines() if line.strip()][-3:]
                raise FedpalError(f"the SuperLink did not start ({' | '.join(tail) or 'no output'}); see {console}")
            time.sleep(0.3)
        say(
            f"note: SuperLink listening on {deployment.listen}:{deployment.port} (TLS, node authentication on); "
            f"clients dial {deployment.address}"
        )
        with tempfile.TemporaryDirectory(prefix="fedpal-app-") as folder:
            run = [flwr, "run", str(write_app_folder(Path(folder))), CONNECTION, "--run-config", settings]
            code = subprocess.call([*run, "--stream"], env=env)
    except KeyboardInterrupt:
        if not stopping:
            raise
        code = 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_process_tree(link)
    return code
