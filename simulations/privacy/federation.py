"""One federation an audit attacks: fedpal's real ServerApp and ClientApp on Flower's
Simulation Engine, with the attacker's instruments attached from outside.

- **Canary clients** (the one-run audit): extra nodes whose client, every round, sends
  the global adapter it received plus a fixed random direction at the clipping norm
  (``canary_norm`` in runs without DP). Each candidate canary joins with probability
  1/2; the run never learns which ones did, the auditor does. They go through the same mods (clipping, SecAgg+) as
  users.
- **An honest-but-curious server**: an observer on fedpal's strategy records each
  round's replies exactly as the server receives them (one update per node without
  SecAgg+, the unmasked aggregate with it).
- **A wiretap on every node**: an outermost client mod keeps every message a node sends,
  serialized, for the plaintext scan.

Users' homes hold real encrypted memories; nothing of the federation is mocked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.client import NumPyClient

from fedpal.client.memory import PASSPHRASE_ENV
from fedpal.common.types import PreferencePair
from fedpal.simulations.privacy.config import AuditConfig
from fedpal.simulations.privacy.population import AuditPopulation

CAPTURES = "captures"


@dataclass(frozen=True)
class RunPlan:
    """One federation of the audit: its protection and whether canary clients join."""

    name: str
    dp: bool
    secagg: bool
    noise_multiplier: float
    canaries: bool

    @classmethod
    def protection(cls, name: str, config: AuditConfig) -> "RunPlan":
        return cls(name, "dp" in name, "secagg" in name, config.noise_multiplier if "dp" in name else 0.0, True)

    @classmethod
    def sweep_point(cls, noise_multiplier: float | None) -> "RunPlan":
        """A budget-vs-utility run: DP at ``noise_multiplier`` (None: no DP), no canaries to disturb utility."""
        if noise_multiplier is None:
            return cls("utility, no DP", False, False, 0.0, False)
        return cls(f"utility, z={noise_multiplier:g}", True, False, noise_multiplier, False)

    @property
    def folder_name(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name).strip("-")


@dataclass(frozen=True)
class FederatedRun:
    """What one run left for the attacks."""

    plan: RunPlan
    folder: Path
    homes: tuple[Path, ...]
    initial: dict[str, np.ndarray]
    final: dict[str, np.ndarray]
    observed: dict[int, dict[str, list[np.ndarray]]]
    """Round -> node id -> tensors, as the server received them."""
    partitions: dict[str, int]
    """Node id -> partition id (users are 0..users-1, canary nodes after them)."""
    included: np.ndarray
    """Which candidate canaries joined (empty without canaries)."""
    epsilon: float | None
    metrics: list[dict[str, Any]]

    @property
    def captures(self) -> Path:
        return self.folder / CAPTURES


def canary_direction(shapes: dict[str, tuple[int, ...]], index: int, seed: int) -> dict[str, np.ndarray]:
    """Candidate canary ``index``'s direction: regenerated from the seed by the client and the auditor."""
    from fedpal.simulations.privacy.audit import canary_directions

    return canary_directions(shapes, 1, seed * 1_000_003 + index)[0]


class CanaryClient(NumPyClient):
    """A node that sends ``received + norm * direction`` every round, and trains nothing.

    It claims as many examples as a user's shared update counts (each pair and its chosen
    reply), so without DP's uniform weights FedAvg weighs it as one user.
    """

    def __init__(
        self, shapes: dict[str, tuple[int, ...]], index: int, seed: int, norm: float, examples: int, partition: int
    ) -> None:
        self.shapes, self.index, self.seed, self.norm = shapes, index, seed, norm
        self.examples, self.partition = examples, partition

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        from fedpal.common.adapters import FINGERPRINT_KEY, adapter_fingerprint
        from fedpal.simulations.privacy.audit import canary_update

        received = dict(zip(self.shapes, parameters))
        sent = canary_update(received, canary_direction(self.shapes, self.index, self.seed), self.norm)
        if config.get("deterministic"):  # SecAgg+ rounds with numpy's global generator (see client_app)
            np.random.seed([int(config["seed"]), int(config["round"]), self.partition])
        metrics = {
            "examples": self.examples,
            "payload_bytes": int(sum(a.nbytes for a in sent.values())),
            FINGERPRINT_KEY: adapter_fingerprint(sent),
        }
        return list(sent.values()), 1 if config["uniform-weights"] else self.examples, metrics


def make_capture_mod(folder: Path) -> Callable:
    """An outermost client mod writing every message the node sends, serialized, into ``folder``
    as ``<partition>-<node id>-<count>-<type>.bin``."""

    def capture(msg: Any, ctxt: Any, call_next: Callable) -> Any:
        from fedpal.common.flower_internals import payload

        out = call_next(msg, ctxt)
        prefix = f"{ctxt.node_config['partition-id']}-{ctxt.node_id}-"
        count = len(list(folder.glob(f"{prefix}*.bin")))
        (folder / f"{prefix}{count:04d}-{out.metadata.message_type}.bin").write_bytes(payload(out))
        return out

    return capture


def write_memories(population: AuditPopulation, homes: Sequence[Path], planted: Sequence[PreferencePair]) -> None:
    """Fresh encrypted memories: each user's stored pairs and stated preference; ``planted``
    (the Secret Sharer canaries) go into user 0's."""
    from fedpal.client.memory import PreferenceMemory

    for index, (user, home) in enumerate(zip(population.users, homes)):
        shutil.rmtree(home, ignore_errors=True)
        with PreferenceMemory.open(home) as memory:
            for pair in [*user.members, *(planted if index == 0 else ())]:
                memory.add_pair(pair.prompt, pair.chosen, pair.rejected, tags=("audit",))
            if user.stated:
                memory.add_stated(user.stated, tags=("audit",))


def overrides(config: AuditConfig, plan: RunPlan, folder: Path, nodes: int) -> dict[str, Any]:
    """fedpal's run config for one audited federation of ``nodes`` nodes (users and canaries).

    The personal guard is off: with it on, a client holds some of its pairs out of
    training, and they would be counted as members that were never trained on. Every
    node trains every round (fraction 1), so the accountant's epsilon has no sampling
    amplification to lean on.
    """
    return {
        "model": config.model,
        "num-server-rounds": config.rounds,
        "final-adapter": False,
        "run-dir": str(folder / "federation"),
        "home-base": str(folder / "users"),
        "fraction-train": 1.0,
        "min-clients": nodes,
        "population-size": nodes,
        "seed": config.seed,
        "deterministic": True,
        "lora-rank": config.lora_rank,
        "lora-alpha": config.lora_alpha,
        "ffa-lora": config.ffa_lora,
        "objective": config.objective,
        "local-steps": config.local_steps,
        "personal-steps": config.personal_steps,
        "personal-guard": False,
        "learning-rate": config.learning_rate,
        "dpo-beta": config.dpo_beta,
        "batch-size": config.batch_size,
        "max-length": config.max_length,
        "train-with-preferences": False,
        "dp": plan.dp,
        "noise-multiplier": plan.noise_multiplier if plan.dp else 1.0,
        "clipping-norm": config.clipping_norm,
        "delta": config.delta,
        "secagg": plan.secagg,
        "secagg-timeout": 300.0,
    }


def run_federation(
    config: AuditConfig,
    plan: RunPlan,
    population: AuditPopulation,
    folder: Path,
    initial: dict[str, np.ndarray],
    planted: Sequence[PreferencePair],
) -> FederatedRun:
    """Run ``plan``'s federation in ``folder`` and collect what the attacks need."""
    from flwr.simulation import run_simulation

    from fedpal.client.client_app import fedpal_client, make_client_app
    from fedpal.server.federation import load_global_adapter
    from fedpal.server.server_app import make_server_app

    shutil.rmtree(folder, ignore_errors=True)
    homes = tuple(folder / "users" / str(i) for i in range(config.users))
    write_memories(population, homes, planted)
    captures = folder / CAPTURES
    captures.mkdir(parents=True)
    rng = np.random.default_rng([config.seed, 11])
    included = rng.random(config.canary_clients) < 0.5 if plan.canaries else np.zeros(0, dtype=bool)
    joined = [int(i) for i in np.flatnonzero(included)]
    shapes = {name: tuple(array.shape) for name, array in initial.items()}
    examples = 2 * config.pairs_per_user
    norm = config.clipping_norm if plan.dp or not config.canary_norm else config.canary_norm
    canaries = {config.users + j: index for j, index in enumerate(joined)}

    def client_fn(context: Any) -> Any:
        partition = int(context.node_config["partition-id"])
        if partition not in canaries:
            return fedpal_client(context)
        return CanaryClient(shapes, canaries[partition], config.seed, norm, examples, partition).to_client()

    observed: dict[int, dict[str, list[np.ndarray]]] = {}

    def observe(server_round: int, replies: dict[str, list[np.ndarray]]) -> None:
        observed[server_round] = {node: [np.array(a) for a in arrays] for node, arrays in replies.items()}

    nodes = config.users + len(joined)
    settings = overrides(config, plan, folder, nodes)
    with quiet_flower():
        run_simulation(
            server_app=make_server_app(settings, observers=[observe]),
            client_app=make_client_app([make_capture_mod(captures)], client_fn=client_fn),
            num_supernodes=nodes,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"log_to_driver": False, "logging_level": logging.WARNING},
            },
        )
    run_dir = Path(settings["run-dir"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    done = [m for m in metrics if m.get("aggregated")]
    if len(done) < config.rounds:
        raise RuntimeError(
            f"the '{plan.name}' federation aggregated {len(done)} of {config.rounds} rounds; "
            f"see {run_dir / 'metrics.jsonl'}"
        )
    partitions = {}
    for path in captures.glob("*.bin"):
        partition, node, _ = path.name.split("-", 2)
        partitions[node] = int(partition)
    final = load_global_adapter(run_dir)
    return FederatedRun(
        plan,
        folder,
        homes,
        dict(initial),
        {k: final[k] for k in initial},
        observed,
        partitions,
        included,
        done[-1].get("epsilon"),
        metrics,
    )


@contextlib.contextmanager
def passphrase(seed: int) -> Iterator[None]:
    """The simulated users' memory passphrase, set for the run (the ClientApp reads it from the environment)."""
    old = os.environ.get(PASSPHRASE_ENV)
    os.environ[PASSPHRASE_ENV] = f"fedpal-audit-{seed}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PASSPHRASE_ENV, None)
        else:
            os.environ[PASSPHRASE_ENV] = old


def _not_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    """Flower 1.41 deprecates ``run_simulation`` in favour of the ``flwr run`` CLI; the audit
    keeps it because its attacks watch every round from inside the process. Flower would
    say so every round."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower logs every message exchange at INFO; the audit shows its own progress bars."""
    loggers = [logging.getLogger(name) for name in ("flwr", "ray")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    loggers[0].addFilter(_not_run_simulation_deprecation)
    try:
        yield
    finally:
        loggers[0].removeFilter(_not_run_simulation_deprecation)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
