"""One simulation as one ``flwr run``: a SuperLink in simulation mode, started and stopped here.

The SuperLink (``flower-superlink --simulation``) runs the ServerApp and Flower's
Simulation Engine in its own subprocesses; ``flwr run`` builds the app bundle from a
folder holding only a pyproject (fedpal is installed where it runs) and submits it with
the Simulation Engine's settings (``--federation-config``: virtual SuperNodes, each
node's CPUs and GPUs). With ``ray_address`` the engine joins an existing Ray cluster
(``ray start --head`` / ``ray start --address``) instead of starting Ray on this machine;
nothing else changes. Both simulation apps (``fedpal simulate`` and population studies)
run through :func:`flwr_run`.

While it runs, the caller's ``follow`` callback is polled (progress bars), and the
memory of every process the SuperLink started (Ray's workers included) is sampled for
the peak. Flower's and Ray's logs go to ``flwr-run.log``, or to the terminal with
``verbose``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpal.common.deploy import flower_command, stop_process_tree
from fedpal.common.errors import FedpalError
from fedpal.server.deployment import toml_value

CONNECTION = "fedpal-simulation"
START_TIMEOUT = 60.0

Progress = Callable[[str, int], Callable[[], None]]


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """One clear line when nothing answers at a Ray cluster's ``HOST:PORT`` (Ray itself would
    keep the run waiting for it)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FedpalError(
            f"--ray-address takes HOST:PORT of a Ray head node (ray start --head --port ...), not {address!r}"
        )
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as err:
        raise FedpalError(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
            "`ray start --head` or leave --ray-address out"
        ) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_app(folder: Path, name: str, components: dict[str, str], run_config: dict[str, Any]) -> Path:
    """The app folder ``flwr run`` bundles: a pyproject naming the ``serverapp``/``clientapp``
    components (fedpal is installed where they run) and this run's whole config."""
    lines = [
        "[build-system]",
        'requires = ["setuptools>=69"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "0.1.0"',
        f'description = "{name} (one simulation run)"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedpal"',
        "",
        "[tool.flwr.app.components]",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in components.items()]
    lines += ["", "[tool.flwr.app.config]"] + [f"{k} = {toml_value(v)}" for k, v in run_config.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def engine_config(users: int, node_cpus: int, node_gpus: float) -> dict[str, Any]:
    """The Simulation Engine's settings for ``flwr run --federation-config``: one virtual SuperNode
    per user, each with ``node_cpus`` CPUs and ``node_gpus`` GPUs (Flower's client resources)."""
    return {
        "num-supernodes": users,
        "backend": "ray",
        "client-resources-num-cpus": node_cpus,
        "client-resources-num-gpus": node_gpus,
    }


class SimulationSuperLink:
    """``flower-superlink --simulation`` on a free local port, with its own FLWR_HOME and database."""

    def __init__(self, folder: Path, ray_address: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.env = {**os.environ, "FLWR_HOME": str(folder / "flwr")}
        if ray_address:
            self.env["RAY_ADDRESS"] = ray_address
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "SimulationSuperLink":
        home = self.folder / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        log = self.folder / "superlink.log"
        command = [
            flower_command("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.folder / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        with log.open("w") as handle:
            self.process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-2:]
                raise FedpalError(
                    f"the simulation SuperLink did not start ({' | '.join(tail) or 'no output'}); see {log}"
                )
            time.sleep(0.3)
        return self

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_process_tree(self.process)
            self.process = None

    def peak_memory(self) -> "MemorySampler":
        if self.process is None:
            raise FedpalError("the SuperLink is not running")
        return MemorySampler(self.process.pid)


class MemorySampler:
    """Peak resident memory of a process and all it started (summed RSS, sampled every 0.5 s).

    Summed RSS counts pages shared between processes (Ray's object store, libraries) once
    per process, so it overstates what the machine needs; it is the same measure at every
    population size, which is what the scaling table compares.
    """

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every = pid, every
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for member in family:
            try:
                total += member.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.sample())
            self._stop.wait(self.every)


def flwr_run(
    app: Path,
    federation_config: dict[str, Any],
    out: Path,
    follow: Callable[[], None] = lambda: None,
    *,
    verbose: bool = False,
    ray_address: str | None = None,
) -> tuple[float, int]:
    """``flwr run app`` on a fresh simulation SuperLink under ``out``; returns (wall seconds, peak
    memory in bytes). ``follow`` is called every second while it runs; a failed run is one line.
    Callers check ``ray_address`` (:func:`check_ray_address`) before they write anything."""
    federation = " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())
    command = [flower_command("flwr"), "run", str(app), CONNECTION, "--federation-config", federation, "--stream"]
    started = time.perf_counter()
    with SimulationSuperLink(out / "superlink", ray_address) as link, link.peak_memory() as memory:
        log = out / "flwr-run.log"
        with log.open("w") as handle:
            output = None if verbose else handle
            submitted = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                stdin=subprocess.DEVNULL,
                env=link.env,
            )
            while submitted.poll() is None:
                time.sleep(1.0)
                follow()
        follow()
        if submitted.returncode != 0:
            raise FedpalError(
                f"flwr run failed (exit {submitted.returncode}); see {log} and {out / 'superlink' / 'superlink.log'}"
            )
    return time.perf_counter() - started, memory.peak_bytes


class ProgressLog:
    """Progress of a ServerApp's phases, as lines in a file the launching process follows.

    The ServerApp runs in a process of the SuperLink's, so it cannot draw the user's
    progress bars; it appends ``{"phase", "total", "at"}`` when a phase starts and ``{"phase",
    "done", "at"}`` as it advances (``at``: Unix time), and :meth:`follow` turns new lines into
    bar updates."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._read = 0
        self._bars: dict[str, Callable[[], None]] = {}
        self._done: dict[str, int] = {}

    def phase(self, name: str, total: int) -> Callable[[], None]:
        """Start phase ``name`` of ``total`` steps; returns its advance function (ServerApp side)."""
        self._append({"phase": name, "total": total})
        count = [0]

        def advance() -> None:
            count[0] += 1
            self._append({"phase": name, "done": count[0]})

        return advance

    def _append(self, line: dict[str, Any]) -> None:
        with self.path.open("a") as handle:  # with the time, so a run's phases can be timed afterwards
            handle.write(json.dumps({**line, "at": round(time.time(), 3)}) + "\n")

    def follow(self, progress: Progress) -> None:
        """Show the lines written since the last call through ``progress`` (launcher side)."""
        if not self.path.is_file():
            return
        text = self.path.read_text()
        complete = text[self._read :].rpartition("\n")[0]
        if not complete:
            return
        self._read += len(complete) + 1
        for raw in complete.splitlines():
            line = json.loads(raw)
            name = line["phase"]
            if "total" in line:
                self._bars[name] = progress(name, int(line["total"]))
                self._done[name] = 0
            elif name in self._bars:
                for _ in range(int(line["done"]) - self._done[name]):
                    self._bars[name]()
                self._done[name] = int(line["done"])
