"""Small pieces both sides of a deployment use: addresses, node-key fingerprints, Flower commands.

The server's deployment folder (``fedpal.server.deployment``) and the client agent
(``fedpal.client.agent``) both take ``HOST:PORT`` addresses, name node keys by their
fingerprint in messages, and start Flower's commands.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from pathlib import Path

from fedpal.common.errors import FedpalError

DEFAULT_PORT = 9093


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port), or a one-line error."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s/]+):(\d+)", text.strip())
    if not match:
        raise FedpalError(f"'{text}' is not an address: write HOST:PORT, e.g. fedpal.example.org:{DEFAULT_PORT}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise FedpalError(f"port {port} in '{text}' is out of range (1-65535)")
    return host, port


def join_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def key_fingerprint(public_key_line: str) -> str:
    """``SHA256:...`` of an OpenSSH public key line, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def flower_command(name: str) -> str:
    """The path of Flower's ``name`` command (flwr, flower-superlink, flower-supernode), or a one-line error.

    The one installed next to this Python comes first: a systemd user service or a cron
    job runs with a short PATH that misses a virtual environment's or pyenv's bin folder.
    """
    import shutil
    import sys

    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedpalError(f"the '{name}' command is not installed (pip install 'flwr[simulation]')")
    return found


def stop_process_tree(proc: subprocess.Popen) -> None:
    """Stop a process and everything it started (a SuperLink's SuperExec, ServerApp and simulation,
    which would otherwise outlive it): SIGTERM, then SIGKILL after 8 s."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=8)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
