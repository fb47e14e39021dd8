"""The federation's round loop: private aggregation of the shared LoRA adapter, round by round.

The loop is written here instead of using Flower's ``DefaultWorkflow`` because that one
always starts at round 1 and cannot stop on a privacy budget; each round still runs
Flower's own fit workflow (plain or ``SecAggPlusWorkflow``) on Flower's ``LegacyContext``
(``fedpal.common.flower_internals``). Every round ends with a JSON line in
``metrics.jsonl`` and a checkpoint; with ``resume = true`` a restarted server continues
after the last checkpointed round, privacy ledger included. Each round's train config
tells the clients the epsilon spent so far, and after the last round every connected node
receives the final global adapter (``final-adapter``).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid

from fedpal.common.config import fedpal_home
from fedpal.common.errors import FedpalError
from fedpal.common.privacy import Accountant, PrivacyBudget, PrivacySpent
from fedpal.common.settings import FederationSettings
from fedpal.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpal.common.flower_internals import (
    fit_workflow,
    legacy_rounds,
    payload_bytes,
    restore_strategy_state,
    start_rounds,
    strategy_state,
)
from fedpal.server.strategy import FedpalStrategy, Observer, sample_size, secagg_shares, settings_summary
from fedpal.server.validation import UpdateSpec

log = logging.getLogger("fedpal.server")

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
FINAL_GROUP = "final"
"""The group id of the messages that carry the final global adapter (rounds use their number)."""
FINAL_ADAPTER_TIMEOUT = 300.0
"""Seconds the server waits for nodes to save the final global adapter (a node loads its base model first)."""


class CountingGrid(Grid):
    """A Grid that counts payload bytes per node and round as messages go out and come back.

    Counting at the Grid sees every SecAgg+ stage too, which a count inside the
    ClientApp's reply could not report about itself.
    """

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self.down: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.up: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))

    def set_run(self, run: Any) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        return self._inner.run

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            self.down[msg.metadata.group_id][msg.metadata.dst_node_id] += payload_bytes(msg)
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        for msg in replies:
            self.up[msg.metadata.group_id][msg.metadata.src_node_id] += payload_bytes(msg)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            self.down[msg.metadata.group_id][msg.metadata.dst_node_id] += payload_bytes(msg)
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            self.up[msg.metadata.group_id][msg.metadata.src_node_id] += payload_bytes(msg)
        return replies


def initial_adapter(settings: FederationSettings) -> dict[str, np.ndarray]:
    """The shared adapter every client starts from: the same seeded A, zero B."""
    from fedpal.common.adapters import SHARED, AdapterConfig, adapter_to_arrays, attach_adapters
    from fedpal.common.models import load_base_model

    base = load_base_model(settings["model"], device="cpu")
    peft = attach_adapters(base.model, AdapterConfig.from_settings(settings))
    return adapter_to_arrays(peft, SHARED, parts="B" if settings["ffa-lora"] else "AB", dtype=np.float32)


def run_dir(settings: FederationSettings) -> Path:
    """Where a run keeps metrics, checkpoint and global adapter (``run-dir``, else under FEDPAL_HOME)."""
    return Path(settings["run-dir"]).expanduser() if settings["run-dir"] else fedpal_home() / "runs" / "default"


def run_federation(
    grid: Grid,
    context: Context,
    settings: FederationSettings,
    observers: Sequence[Observer] = (),
    node_order: Callable[[int], int] | None = None,
    after_round: Callable[[int, list[np.ndarray]], None] | None = None,
) -> Path:
    """Run (or resume) the federation described by ``settings``; returns the run folder.

    ``observers`` see every round's replies as the server receives them (privacy audits);
    ``node_order`` orders nodes for sampling (see ``OrderedClientManager``);
    ``after_round(round, global_arrays)`` runs after each round's checkpoint, while the
    nodes are still connected (a simulation's users act between rounds there)."""
    folder = run_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = _resumed_checkpoint(folder, settings)
    named = initial_adapter(settings)
    max_norm = settings.clipping_norm * 1.01 if settings.dp else settings.max_update_norm
    spec = UpdateSpec.of(named, max_norm=max_norm)
    initial = checkpoint.global_arrays if checkpoint is not None else list(named.values())
    strategy = FedpalStrategy(settings, spec, initial, observers)
    if checkpoint is not None:
        restore_strategy_state(strategy.inner, checkpoint.strategy_state)
    counting = CountingGrid(grid)
    with legacy_rounds(counting, context, strategy, settings.num_server_rounds, node_order) as legacy:
        if not legacy.client_manager.wait_for(settings.min_clients, timeout=600):
            raise FedpalError(f"fewer than {settings.min_clients} clients connected within 10 minutes")
        population = settings.population_size or legacy.client_manager.num_available()
        if checkpoint is not None and checkpoint.accountant_state:
            population = int(checkpoint.accountant_state["config"]["population_size"])
        per_round = sample_size(settings, population)
        rounds = Rounds(
            settings,
            folder,
            strategy,
            counting,
            legacy,
            _accountant(settings, population, per_round, checkpoint),
            _fit_workflow(settings, per_round),
            tuple(named),
            checkpoint,
        )
        log.info(
            "fedpal federation: %s; population %d, %d per round; rounds %d..%d",
            settings_summary(settings),
            population,
            per_round,
            rounds.last + 1,
            settings.num_server_rounds,
        )
        for server_round in range(rounds.last + 1, settings.num_server_rounds + 1):
            if not rounds.run(server_round):
                break
            if after_round is not None:
                after_round(server_round, strategy.global_arrays)
        if settings.final_adapter and rounds.last > 0:
            send_final_adapter(counting, settings, strategy.global_arrays, rounds.last, rounds.spent())
    return folder


def _resumed_checkpoint(folder: Path, settings: FederationSettings) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (None: a fresh run, whose old metrics go)."""
    checkpoint = load_checkpoint(folder / CHECKPOINT_DIR) if settings.resume else None
    if settings.resume and checkpoint is None:
        log.warning("resume asked for but %s has no checkpoint: starting at round 1", folder / CHECKPOINT_DIR)
    if checkpoint is None:
        (folder / METRICS_FILE).unlink(missing_ok=True)
        return None
    changed = {
        k: (checkpoint.run_settings.get(k), v)
        for k, v in settings.locked().items()
        if checkpoint.run_settings.get(k) != v
    }
    if changed:
        key, (old, new) = next(iter(changed.items()))
        raise FedpalError(f"cannot resume: {key} was {old!r} in the checkpointed run and is {new!r} now")
    return checkpoint


def _accountant(
    settings: FederationSettings, population: int, per_round: int, checkpoint: Checkpoint | None
) -> Accountant | None:
    """The privacy ledger (with DP on), continued from the checkpoint's."""
    if not settings.dp:
        return None
    accountant = Accountant(
        PrivacyBudget(
            noise_multiplier=settings.noise_multiplier,
            clipping_norm=settings.clipping_norm,
            target_delta=settings.delta,
            population_size=population,
            sample_size=min(per_round, population),
            sampling=settings.sampling,
            max_epsilon=settings.max_epsilon or None,
        )
    )
    if checkpoint is not None and checkpoint.accountant_state:
        accountant.load_state_dict(checkpoint.accountant_state)
    return accountant


def _fit_workflow(settings: FederationSettings, per_round: int) -> Callable[[Grid, Any], None]:
    if not settings.secagg:
        return fit_workflow(None)
    return fit_workflow(
        {
            "num_shares": secagg_shares(settings, per_round),
            "reconstruction_threshold": settings.secagg_threshold,
            "max_weight": 1.0 if settings.dp else 1000.0,
            "clipping_range": settings.secagg_clipping_range,
            "timeout": settings.secagg_timeout or None,
        }
    )


@dataclass
class Rounds:
    """The state the round loop carries from one round to the next, and one round's work."""

    settings: FederationSettings
    folder: Path
    strategy: FedpalStrategy
    grid: CountingGrid
    legacy: Any
    accountant: Accountant | None
    workflow: Callable[[Grid, Any], None]
    names: tuple[str, ...]
    checkpoint: Checkpoint | None
    last: int = 0
    skipped: int = 0
    secret: int = 0
    set_round: Callable[[int], None] = field(init=False)

    def __post_init__(self) -> None:
        self.secret = round_secret(self.settings, self.checkpoint)
        if self.checkpoint is not None:
            self.last, self.skipped = self.checkpoint.round, self.checkpoint.rounds_skipped
        self.set_round = start_rounds(self.legacy, self.strategy.global_arrays)

    def spent(self) -> PrivacySpent | None:
        return PrivacySpent(self.accountant.epsilon(), self.settings.delta) if self.accountant is not None else None

    def run(self, server_round: int) -> bool:
        """Round ``server_round``: aggregate, account, log, checkpoint; False when the budget stops the run."""
        settings, accountant = self.settings, self.accountant
        if accountant is not None and not accountant.next_round_allowed():
            line = {
                "round": server_round,
                "stopped": "privacy budget",
                "epsilon": accountant.epsilon(),
                "epsilon_if_run": accountant.epsilon_after_next(),
                "max_epsilon": settings.max_epsilon,
            }
            log.warning(
                "stopping before round %d: it would take epsilon from %.3f to %.3f, over max-epsilon %.3f",
                server_round,
                line["epsilon"],
                line["epsilon_if_run"],
                settings.max_epsilon,
            )
            _append_metrics(self.folder, line)
            return False
        seed_round(self.secret, server_round)
        self.set_round(server_round)
        self.strategy.spent = self.spent()
        started = time.perf_counter()
        self.workflow(self.grid, self.legacy)
        elapsed = time.perf_counter() - started
        report = self.strategy.report if self.strategy.report.round == server_round else None
        aggregated = report is not None and report.aggregated
        epsilon = None
        if accountant is not None:
            epsilon = accountant.record_round() if aggregated else accountant.epsilon()
        line = _metrics_line(server_round, elapsed, report, self.grid, settings, epsilon, aggregated)
        if not aggregated:
            self.skipped += 1
            line["error"] = _why_not_aggregated(report, settings)
            log.error("round %d produced no new global adapter: %s", server_round, line["error"])
        _append_metrics(self.folder, line)
        save_checkpoint(
            self.folder / CHECKPOINT_DIR,
            Checkpoint(
                round=server_round,
                global_arrays=self.strategy.global_arrays,
                strategy_state=strategy_state(self.strategy.inner),
                accountant_state=accountant.state_dict() if accountant is not None else None,
                run_settings=settings.locked(),
                rounds_skipped=self.skipped,
                round_secret=self.secret,
                global_names=self.names,
            ),
        )
        self.last = server_round
        return True


def send_final_adapter(
    grid: Grid, settings: FederationSettings, arrays: list[np.ndarray], last_round: int, spent: PrivacySpent | None
) -> int:
    """Send the run's final global adapter to every connected node; returns how many saved it.

    Each round's train message carries the global adapter of the round before, so without
    this a client would keep the second-to-last aggregate after the run. The message is
    Flower's "evaluate" type, which the ClientApp answers by saving the adapter as its
    shared adapter, without training; the train config goes along so the node builds the
    same adapter layout. A node that does not answer within ``FINAL_ADAPTER_TIMEOUT`` keeps
    its adapter of the last round it joined.
    """
    nodes = sorted(grid.get_node_ids())
    if not nodes:
        log.warning("no node is connected to receive the final global adapter (round %d)", last_round)
        return 0
    config = {**settings.train_config(last_round), "final": True, **(spent.to_config() if spent is not None else {})}
    replies = send_adapter(grid, nodes, arrays, config, FINAL_GROUP, FINAL_ADAPTER_TIMEOUT)
    saved = sum(1 for reply in replies if not reply.has_error())
    if saved < len(nodes):
        log.warning(
            "the final global adapter (through round %d) reached %d of %d nodes; the others keep the one of "
            "the last round they joined",
            last_round,
            saved,
            len(nodes),
        )
    else:
        log.info("the final global adapter (through round %d) reached all %d nodes", last_round, saved)
    return saved


def send_adapter(
    grid: Grid,
    nodes: Sequence[int],
    arrays: list[np.ndarray],
    config: dict,
    group: str,
    timeout: float,
    on_reply: Callable[[Message], None] | None = None,
) -> list[Message]:
    """An adapter and ``config`` to each of ``nodes`` in Flower's "evaluate" message; the replies
    that came back within ``timeout`` seconds (a node that failed answers with an error).
    ``on_reply`` sees each reply as it arrives (progress; it may raise to stop waiting)."""
    from flwr.common import EvaluateIns, MessageType, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(arrays), config), keep_input=True)
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id=group) for node in nodes
    ]
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(waiting):
            waiting.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        if waiting:
            time.sleep(1.0)
    return replies


def _why_not_aggregated(report: Any, settings: FederationSettings) -> str:
    if report is None:
        return "no clients could be sampled"
    if settings["secagg"] and report.results == 0:
        return (
            "SecAgg+ aborted the round: too few clients stayed to reconstruct the masks "
            f"(reconstruction threshold {settings['secagg-threshold']} of the shares); see the SecAgg+ log above"
        )
    if report.aggregate_error:
        return report.aggregate_error
    if report.rejected and not report.results - len(report.rejected):
        return f"all {len(report.rejected)} updates were rejected"
    return f"no usable results ({len(report.failures)} failures)"


def round_secret(settings: FederationSettings, checkpoint: Checkpoint | None) -> int:
    """The base of each round's seed: secret unless the run asked to be deterministic.

    The DP noise (Flower's wrapper draws it from numpy's global generator) and the client
    sample must be unpredictable, or anyone who knows the seed can subtract the noise and
    the reported epsilon protects nothing. A fresh 128-bit secret is kept in the server's
    own checkpoint, so a resumed round draws the same clients and noise as the interrupted
    one would have. ``deterministic`` (simulations, tests) uses the public ``seed`` instead.
    """
    if checkpoint is not None and checkpoint.round_secret is not None:
        return checkpoint.round_secret
    if settings["deterministic"]:
        if settings["dp"]:
            log.warning("deterministic = true: the DP noise follows the public seed; use this for simulations only")
        return int(settings["seed"])
    return secrets.randbits(128)


def seed_round(secret: int, server_round: int) -> None:
    """Seed Python's and numpy's global generators for one round from the run's secret (all 128 bits)."""
    random.seed(secret * 100_003 + server_round)
    np.random.seed([(secret >> shift) & 0xFFFFFFFF for shift in (0, 32, 64, 96)] + [server_round])


def _metrics_line(
    server_round: int,
    elapsed: float,
    report: Any,
    counting: CountingGrid,
    settings: FederationSettings,
    epsilon: float | None,
    aggregated: bool,
) -> dict:
    group = str(server_round)
    up, down = dict(counting.up.get(group, {})), dict(counting.down.get(group, {}))
    clients = report.clients if report is not None else {}
    train_s = [float(m.get("train_seconds", 0.0)) for m in clients.values()]
    losses = [float(m["loss_first"]) for m in clients.values() if "loss_first" in m]
    losses_last = [float(m["loss_last"]) for m in clients.values() if "loss_last" in m]
    return {
        "round": server_round,
        "aggregated": aggregated,
        "seconds": round(elapsed, 3),
        "slowest_client_train_s": round(max(train_s), 3) if train_s else None,
        "overhead_s": round(elapsed - max(train_s), 3) if train_s else None,
        "clients_replied": report.results if report is not None else 0,
        "clients_summed": report.clients_summed if report is not None else 0,
        "failures": report.failures if report is not None else [],
        "rejected": report.rejected if report is not None else [],
        "loss_before_mean": float(np.mean(losses)) if losses else None,
        "loss_after_mean": float(np.mean(losses_last)) if losses_last else None,
        "examples": int(sum(int(m.get("examples", 0)) for m in clients.values())),
        "global_change_norm": report.global_change_norm if report is not None else 0.0,
        "noise_stddev_on_mean": report.noise_stddev_on_mean if report is not None else 0.0,
        "epsilon": epsilon,
        "delta": settings["delta"] if settings["dp"] else None,
        "bytes_up": {str(k): v for k, v in up.items()},
        "bytes_down": {str(k): v for k, v in down.items()},
        "bytes_up_per_client": float(np.mean(list(up.values()))) if up else 0.0,
        "bytes_down_per_client": float(np.mean(list(down.values()))) if down else 0.0,
        "clients": clients,
        "dp": settings["dp"],
        "secagg": settings["secagg"],
        "ffa_lora": settings["ffa-lora"],
        "fp16_updates": settings["fp16-updates"],
    }


def _append_metrics(folder: Path, line: dict) -> None:
    with (folder / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def load_global_adapter(folder: Path | str) -> dict[str, np.ndarray]:
    """The global shared adapter a run folder holds (its last checkpoint's), tensors by name."""
    checkpoint = load_checkpoint(Path(folder) / CHECKPOINT_DIR)
    if checkpoint is None:
        raise FedpalError(f"{folder} holds no global adapter yet (no checkpoint)")
    return checkpoint.global_adapter()
