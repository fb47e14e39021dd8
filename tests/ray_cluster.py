"""A two-node Ray cluster on this machine (``ray start --head`` plus ``ray start --address``),
and a watch on which raylet each ClientApp actor ran under, for the cluster tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil


class ActorParents:
    """The parent pids of Ray's ClientAppActor worker processes, sampled while a run goes on."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ActorParents":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            for process in psutil.process_iter(["cmdline", "ppid"]):
                if (process.info["cmdline"] or [""])[0].startswith("ray::ClientAppActor"):
                    self.seen.add(process.info["ppid"])


@contextlib.contextmanager
def two_node_cluster() -> Iterator[tuple[str, set[int]]]:
    """Start the cluster (one CPU per node); yields its address and the two raylets' pids; stops it."""
    from fedpal.simulations.engine import free_port

    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    address = f"127.0.0.1:{free_port()}"
    quiet = {"capture_output": True, "text": True, "timeout": 120}
    try:
        head = subprocess.run(
            [
                ray,
                "start",
                "--head",
                f"--port={address.rsplit(':', 1)[1]}",
                "--num-cpus=1",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            **quiet,
        )
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run(
            [ray, "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"], **quiet
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        nodes = subprocess.run(
            [
                sys.executable,
                "-c",
                "import ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))",
            ],
            **quiet,
        )
        assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]
        raylets = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"}
        assert len(raylets) == 2  # one per node
        yield address, raylets
    finally:
        subprocess.run([ray, "stop", "--force"], **quiet)
