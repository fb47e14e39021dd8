"""The fedpal ServerApp: rounds of private aggregation of the shared LoRA adapter.

The round loop is written here instead of using Flower's ``DefaultWorkflow`` because
that one always starts at round 1 and cannot stop on a privacy budget; each round still
runs Flower's own fit workflow (plain or ``SecAggPlusWorkflow``) on Flower's
``LegacyContext``. Every round ends with a JSON line in ``metrics.jsonl`` and a
checkpoint; with ``resume = true`` a restarted server continues after the last
checkpointed round, privacy ledger included. Each round's train config tells the clients
the epsilon spent so far, and after the last round every connected node receives the
final global adapter (``final-adapter``).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.server.client_manager import SimpleClientManager
from flwr.serverapp import Grid, ServerApp

from fedpal.common.config import fedpal_home
from fedpal.common.errors import FedpalError
from fedpal.common.privacy import PrivacySpent
from fedpal.common.settings import FederationSettings
from fedpal.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpal.server.strategy import (
    FedpalStrategy,
    Observer,
    restore_strategy_state,
    sample_size,
    secagg_shares,
    settings_summary,
    strategy_state,
)
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
            self.down[msg.metadata.group_id][msg.metadata.dst_node_id] += _payload_bytes(msg)
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        for msg in replies:
            self.up[msg.metadata.group_id][msg.metadata.src_node_id] += _payload_bytes(msg)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            self.down[msg.metadata.group_id][msg.metadata.dst_node_id] += _payload_bytes(msg)
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            self.up[msg.metadata.group_id][msg.metadata.src_node_id] += _payload_bytes(msg)
        return replies


class OrderedClientManager(SimpleClientManager):
    """Flower's client manager, sampling from the node ids in sorted order.

    ``random.sample`` over registration order would draw different nodes for the same
    seed after a restart; over sorted ids, a seeded round draws the same ones. A
    simulation, whose node ids are drawn afresh each run, passes ``node_order`` (node id
    to its partition id) so that a seed draws the same *users* in every run.
    """

    def __init__(self, node_order: Callable[[int], int] | None = None) -> None:
        super().__init__()
        self.node_order = node_order

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: Any = None) -> list:
        with self._cv:
            key = (lambda item: self.node_order(int(item[0]))) if self.node_order else None
            self.clients = dict(sorted(self.clients.items(), key=key))
        return super().sample(num_clients, min_num_clients, criterion)


def _payload_bytes(msg: Message) -> int:
    """Serialized size of the message content (what goes on the wire, minus metadata).

    Measured on the protobuf rather than with ``Record.count_bytes()``, which in Flower
    1.41 raises on an empty list value (SecAgg+ sends those).
    """
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0


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
    from flwr.app import ConfigRecord
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_fit_workflow

    from fedpal.common.privacy import Accountant, PrivacyBudget

    folder = run_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(folder / CHECKPOINT_DIR) if settings["resume"] else None
    if settings["resume"] and checkpoint is None:
        log.warning("resume asked for but %s has no checkpoint: starting at round 1", folder / CHECKPOINT_DIR)
    if checkpoint is None and (folder / METRICS_FILE).exists():
        (folder / METRICS_FILE).unlink()
    if checkpoint is not None:
        changed = {
            k: (checkpoint.run_settings.get(k), v)
            for k, v in settings.locked().items()
            if checkpoint.run_settings.get(k) != v
        }
        if changed:
            key, (old, new) = next(iter(changed.items()))
            raise FedpalError(f"cannot resume: {key} was {old!r} in the checkpointed run and is {new!r} now")

    named = initial_adapter(settings)
    max_norm = settings["clipping-norm"] * 1.01 if settings["dp"] else settings["max-update-norm"]
    spec = UpdateSpec.of(named, max_norm=max_norm)
    initial = checkpoint.global_arrays if checkpoint is not None else list(named.values())
    strategy = FedpalStrategy(settings, spec, initial, observers)
    if checkpoint is not None:
        restore_strategy_state(strategy.inner, checkpoint.strategy_state)

    counting = CountingGrid(grid)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=settings["num-server-rounds"]),
        strategy=strategy,
        client_manager=OrderedClientManager(node_order),
    )
    thread, stop, registered = start_update_client_manager_thread(counting, legacy.client_manager)
    try:
        registered.wait()
        if not legacy.client_manager.wait_for(settings["min-clients"], timeout=600):
            raise FedpalError(f"fewer than {settings['min-clients']} clients connected within 10 minutes")
        population = settings["population-size"] or legacy.client_manager.num_available()
        if checkpoint is not None and checkpoint.accountant_state:
            population = int(checkpoint.accountant_state["config"]["population_size"])
        per_round = sample_size(settings, population)
        accountant = None
        if settings["dp"]:
            accountant = Accountant(
                PrivacyBudget(
                    noise_multiplier=settings["noise-multiplier"],
                    clipping_norm=settings["clipping-norm"],
                    target_delta=settings["delta"],
                    population_size=population,
                    sample_size=min(per_round, population),
                    sampling=settings["sampling"],
                    max_epsilon=settings["max-epsilon"] or None,
                )
            )
            if checkpoint is not None and checkpoint.accountant_state:
                accountant.load_state_dict(checkpoint.accountant_state)
        if settings["secagg"]:
            timeout = settings["secagg-timeout"] or None
            fit_workflow: Any = SecAggPlusWorkflow(
                num_shares=secagg_shares(settings, per_round),
                reconstruction_threshold=settings["secagg-threshold"],
                max_weight=1.0 if settings["dp"] else 1000.0,
                clipping_range=settings["secagg-clipping-range"],
                timeout=timeout,
            )
        else:
            fit_workflow = default_fit_workflow

        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(strategy.global_arrays), keep_input=True
        )
        cfg = ConfigRecord()
        cfg[Key.START_TIME] = time.time()
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        secret = round_secret(settings, checkpoint)
        start = checkpoint.round + 1 if checkpoint is not None else 1
        skipped = checkpoint.rounds_skipped if checkpoint is not None else 0
        last = start - 1
        log.info(
            "fedpal federation: %s; population %d, %d per round; rounds %d..%d",
            settings_summary(settings),
            population,
            per_round,
            start,
            settings["num-server-rounds"],
        )
        for server_round in range(start, settings["num-server-rounds"] + 1):
            if accountant is not None and not accountant.next_round_allowed():
                line = {
                    "round": server_round,
                    "stopped": "privacy budget",
                    "epsilon": accountant.epsilon(),
                    "epsilon_if_run": accountant.epsilon_after_next(),
                    "max_epsilon": settings["max-epsilon"],
                }
                log.warning(
                    "stopping before round %d: it would take epsilon from %.3f to %.3f, over max-epsilon %.3f",
                    server_round,
                    line["epsilon"],
                    line["epsilon_if_run"],
                    settings["max-epsilon"],
                )
                _append_metrics(folder, line)
                break
            seed_round(secret, server_round)
            cfg[Key.CURRENT_ROUND] = server_round
            strategy.spent = PrivacySpent(accountant.epsilon(), settings["delta"]) if accountant is not None else None
            started = time.perf_counter()
            fit_workflow(counting, legacy)
            elapsed = time.perf_counter() - started
            report = strategy.report if strategy.report.round == server_round else None
            aggregated = report is not None and report.aggregated
            epsilon = None
            if accountant is not None and aggregated:
                epsilon = accountant.record_round()
            elif accountant is not None:
                epsilon = accountant.epsilon()
            if not aggregated:
                skipped += 1
                reason = _why_not_aggregated(report, settings)
                log.error("round %d produced no new global adapter: %s", server_round, reason)
            line = _metrics_line(server_round, elapsed, report, counting, settings, epsilon, aggregated)
            if not aggregated:
                line["error"] = reason
            _append_metrics(folder, line)
            save_checkpoint(
                folder / CHECKPOINT_DIR,
                Checkpoint(
                    round=server_round,
                    global_arrays=strategy.global_arrays,
                    strategy_state=strategy_state(strategy.inner),
                    accountant_state=accountant.state_dict() if accountant is not None else None,
                    run_settings=settings.locked(),
                    rounds_skipped=skipped,
                    round_secret=secret,
                    global_names=tuple(named),
                ),
            )
            last = server_round
            if after_round is not None:
                after_round(server_round, strategy.global_arrays)
        if settings["final-adapter"] and last > 0:
            spent = PrivacySpent(accountant.epsilon(), settings["delta"]) if accountant is not None else None
            send_final_adapter(counting, settings, strategy.global_arrays, last, spent)
    finally:
        stop.set()
        thread.join()
    return folder


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
    grid: Grid, nodes: Sequence[int], arrays: list[np.ndarray], config: dict, group: str, timeout: float
) -> list[Message]:
    """An adapter and ``config`` to each of ``nodes`` in Flower's "evaluate" message; the replies
    that came back within ``timeout`` seconds (a node that failed answers with an error)."""
    from flwr.common import EvaluateIns, MessageType, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(arrays), config), keep_input=True)
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id=group) for node in nodes
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


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


def make_server_app(overrides: dict | None = None, observers: Sequence[Observer] = ()) -> ServerApp:
    """A ServerApp whose run config is ``overrides`` over the run's own (for Python-API runs);
    ``observers`` see each round's replies as the server receives them."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = FederationSettings.from_run_config({**dict(context.run_config), **(overrides or {})})
        run_federation(grid, context, settings, observers)

    return server_app


app = make_server_app()
