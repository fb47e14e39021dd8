"""Benchmark: round overhead and bytes per client-round, plain LoRA vs FFA-LoRA vs fp16.

Each variant is a real federation on Flower's simulation engine. Round overhead is the
round's wall time minus the slowest client's local training time: what the federation
(messaging, SecAgg+ crypto, DP, aggregation, checkpointing) adds to the training itself.
Bytes are the serialized message contents per client and round, counted by the server.
Round 1 is left out of the averages: it includes loading the model in every worker.
All clients of a round train at the same time (one Ray slot each); "slowest client fit"
is the whole ClientApp call (memory decryption, adapter I/O, training).

    python -m fedpal.simulations.benchmarks.federation --out bench-federation
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "plain A/B fp32": {"ffa-lora": False, "fp16-updates": False, "secagg": False},
    "plain A/B fp16": {"ffa-lora": False, "fp16-updates": True, "secagg": False},
    "FFA-LoRA fp32": {"ffa-lora": True, "fp16-updates": False, "secagg": False},
    "FFA-LoRA fp16": {"ffa-lora": True, "fp16-updates": True, "secagg": False},
    "plain A/B + SecAgg+": {"ffa-lora": False, "fp16-updates": False, "secagg": True},
    "FFA-LoRA + SecAgg+": {"ffa-lora": True, "fp16-updates": False, "secagg": True},
}
PASSPHRASE = "benchmark-passphrase"


def _make_homes(nodes: Path, clients: int) -> None:
    from fedpal.client.memory import PreferenceMemory

    for i in range(clients):
        memory = PreferenceMemory.open(nodes / str(i), passphrase=PASSPHRASE)
        if len(memory) == 0:
            for j in range(6):
                memory.add_pair(
                    f"user {i} asks about plan {j}", f"a short warm answer {j}", f"a long formal answer {j} with detail"
                )


def run_variant(name: str, settings: dict, model: str, clients: int, rounds: int, work: Path) -> dict:
    """Run one federation and summarise its metrics (rounds 2.. only)."""
    from flwr.simulation import run_simulation

    from fedpal.client.client_app import make_client_app
    from fedpal.server.server_app import make_server_app

    run_dir = work / name.replace(" ", "_").replace("/", "").replace("+", "p")
    config = {
        "model": model,
        "run-dir": str(run_dir),
        "home-base": str(work / "nodes"),
        "num-server-rounds": rounds,
        "min-clients": clients,
        "local-steps": 3,
        "personal-steps": 0,
        "batch-size": 2,
        "max-length": 64,
        **settings,
    }
    # every client gets a slot at once, so the slowest local training is on the round's
    # critical path and the rest of the round time is the federation's own cost
    cpus = os.cpu_count() or 2
    backend = {
        "client_resources": {"num_cpus": cpus / clients},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }
    started = time.perf_counter()
    run_simulation(make_server_app(config), make_client_app(), num_supernodes=clients, backend_config=backend)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [line for line in lines if line["round"] > 1] or lines

    def mean(key: str) -> float:
        return sum(float(line[key]) for line in steady) / len(steady)

    payload = [c["payload_bytes"] for line in steady for c in line["clients"].values()]
    fits = [max(c["seconds"] for c in line["clients"].values()) for line in steady if line["clients"]]
    return {
        "variant": name,
        **settings,
        "rounds_aggregated": sum(1 for line in lines if line["aggregated"]),
        "round_s": mean("seconds"),
        "slowest_train_s": mean("slowest_client_train_s"),
        "overhead_s": mean("overhead_s"),
        "slowest_client_fit_s": sum(fits) / len(fits) if fits else 0.0,
        "bytes_up_per_client_round": mean("bytes_up_per_client"),
        "bytes_down_per_client_round": mean("bytes_down_per_client"),
        "fp32_update_bytes": sum(payload) / len(payload) if payload else 0,
        "simulation_wall_s": wall,
    }


def run_benchmark(
    model: str = "tiny", clients: int = 4, rounds: int = 3, variants: list[str] | None = None, work: Path | None = None
) -> list[dict]:
    """All variants on the same users, one after another."""
    work = work or Path(tempfile.mkdtemp(prefix="fedpal-bench-"))
    os.environ["FEDPAL_PASSPHRASE"] = PASSPHRASE
    _make_homes(work / "nodes", clients)
    return [run_variant(name, VARIANTS[name], model, clients, rounds, work) for name in (variants or list(VARIANTS))]


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| variant | round s | slowest local training s | overhead s | slowest client fit s | up kB/client-round | "
        "down kB/client-round |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['round_s']:.2f} | {r['slowest_train_s']:.2f} | {r['overhead_s']:.2f} | "
            f"{r['slowest_client_fit_s']:.2f} | "
            f"{r['bytes_up_per_client_round'] / 1e3:.1f} | {r['bytes_down_per_client_round'] / 1e3:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench-federation"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_benchmark(args.model, args.clients, args.rounds, args.variant, work=args.out / "work")
    header = (
        f"Federation benchmark: model {args.model}, {args.clients} clients, {args.rounds} rounds (round 1 excluded), "
        f"DP on, {platform.machine()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    (args.out / "federation.json").write_text(json.dumps(rows, indent=1))
    (args.out / "federation.md").write_text(to_markdown(rows, header))
    print(to_markdown(rows, header))


if __name__ == "__main__":
    main()
