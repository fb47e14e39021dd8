"""The README's "Deploy on real machines" walk-through, run as written (issue 14's end-to-end
must-show): ``server init`` + ``server start``, three ``client init`` + ``client start``,
one federated round with DP and SecAgg+ whose aggregate reaches the clients as the run's
final adapter, ``generate`` and ``chat`` on one client with it, and every process gone
afterwards.

Only the port line is changed, to a free port. Slow: a round of three real SuperNodes
plus an ONNX export take a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from test_federation_deployment import _free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def _walkthrough() -> str:
    section = README.read_text().split("## Deploy on real machines", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    script = blocks[-1]
    assert "fedpal server start demo" in script and "port=9093" in script
    return script


def test_the_readme_block_is_the_one_this_test_runs():
    script = _walkthrough()
    for command in (
        "fedpal server init",
        "fedpal server start",
        "fedpal client init",
        "fedpal server add-client",
        "fedpal client start",
        "fedpal server status",
        "fedpal client status",
        "fedpal chat",
    ):
        assert command in script


@pytest.mark.slow
def test_readme_deployment_walkthrough(tmp_path):
    from safetensors.numpy import load_file

    from fedpal.server.federation import load_global_adapter

    script = _walkthrough().replace("port=9093", f"port={_free_port()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDPAL_")}
    env["COLUMNS"] = "250"
    env["FEDPAL_WALKTHROUGH_MARK"] = str(tmp_path)  # every process the script starts inherits it
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in tmp_path.glob("*.log"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs

    lines = [json.loads(raw) for raw in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1], logs
    assert all(line["aggregated"] and line["dp"] and line["secagg"] and line["clients_summed"] == 3 for line in lines)
    assert "rounds 1 of 1" in done.stdout and "3 of 3 added clients seen" in done.stdout

    reply = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"text"')))
    assert set(reply["adapters"]) == {"shared", "personal"}, reply
    # ann's shared adapter is round 1's aggregate, the run's final one (FFA-LoRA: B starts at zero)
    shared = load_file(tmp_path / "ann" / "adapters" / "shared" / "adapter_model.safetensors")
    final = load_global_adapter(tmp_path / "demo" / "run")
    assert final and all(abs(array).max() > 0 and (shared[name] == array).all() for name, array in final.items())
    status = done.stdout[done.stdout.index("agent for ") :]
    assert "rounds joined 1, declined 0; last global adapter: the final one, received after round 1" in status
    assert "(aggregated through round 1)" in status
    assert f"privacy: epsilon {lines[0]['epsilon']:.4g} at delta 1e-05 spent by the run on that adapter" in status
    assert "fedpal chat" in done.stdout  # chat answered and its /rate went into the memory (exit status 0)

    # every process the walk-through started is gone: SuperLink, SuperNodes, SuperExecs, the apps
    assert _marked(str(tmp_path)) == []


def _marked(mark: str) -> list[str]:
    """Live processes whose environment carries ``mark``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get("FEDPAL_WALKTHROUGH_MARK") == mark:
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])}")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            pass
    return found
