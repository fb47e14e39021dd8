"""Strategy wiring: which Flower strategy, DP, SecAgg+, and the checks around aggregation.

Everything is Flower's compatibility stack (``flwr.server.strategy`` + workflows),
because in Flower 1.41 SecAgg+ exists only there. The pieces:

- the selected strategy (FedAvg, FedProx, FedAdam, FedYogi, FedAvgM) samples clients
  and, for the adaptive ones, applies the server optimizer;
- user-level DP: ``fixedclipping_mod`` clips on the client,
  ``DifferentialPrivacyClientSideFixedClipping`` adds N(0, (z*C)^2) to the sum;
- ``SecAggPlusWorkflow`` + ``secaggplus_mod`` so the server only learns the sum.

``FedpalStrategy`` is the hand-written part, for what none of those do: it rejects bad
updates (by node id) and goes on, calibrates the noise to the clients actually summed
(Flower's wrapper assumes the sampled count and drops a whole round on any failure,
which would make every SecAgg+ dropout a lost round), and puts the noise on the plain
average *before* a server optimizer: Flower's wrapper noises the optimizer's output,
whose sensitivity is not C/n once Adam rescales it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from fedpal.common.adapters import FINGERPRINT_KEY
from fedpal.common.errors import first_line
from fedpal.common.privacy import PrivacySpent
from fedpal.common.settings import FederationSettings
from fedpal.common.strategies import STRATEGIES
from fedpal.server.validation import UpdateSpec, check_aggregate, check_update, update_norm

log = logging.getLogger("fedpal.server")


def secagg_shares(settings: FederationSettings, per_round: int) -> int | float:
    """SecAgg+'s ``num_shares`` for rounds of ``per_round`` clients: a fraction as Flower reads it
    (1.0: every client shares with every other), or a fixed number of neighbours, which keeps
    each client's cost constant as rounds grow (Bell et al. 2020: O(log n) neighbours suffice);
    a number at or above the round's size means everyone."""
    shares = settings["secagg-shares"]
    if shares <= 1:
        return shares
    return int(shares) if int(shares) < per_round else 1.0


def sample_size(settings: FederationSettings, population: int) -> int:
    """How many clients Flower's FedAvg samples from ``population`` (its own formula)."""
    return max(int(population * settings["fraction-train"]), settings["min-clients"])


def _no_metrics(metrics: list) -> dict:
    """Client metrics go to fedpal's metrics file per node, not through Flower's aggregation."""
    return {}


def build_server_strategy(settings: FederationSettings, initial: list[np.ndarray]) -> Any:
    """The selected Flower strategy; it samples clients and applies any server optimizer."""
    from flwr.common import ndarrays_to_parameters

    common = {
        "fraction_fit": settings["fraction-train"],
        "fraction_evaluate": 0.0,
        "min_fit_clients": settings["min-clients"],
        "min_available_clients": settings["min-clients"],
        "min_evaluate_clients": 0,
        "initial_parameters": ndarrays_to_parameters(initial),
        "accept_failures": True,
        "fit_metrics_aggregation_fn": _no_metrics,
    }
    return STRATEGIES[settings.strategy](settings, common)


@dataclass
class RoundReport:
    """What happened to the updates of one round (goes into the metrics line)."""

    round: int
    results: int = 0
    failures: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    clients: dict[str, dict] = field(default_factory=dict)
    aggregated: bool = False
    aggregate_error: str | None = None
    clients_summed: int = 0
    noise_stddev_on_mean: float = 0.0
    global_change_norm: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


Observer = Callable[[int, dict[str, list[np.ndarray]]], None]
"""Sees each round's replies as the server receives them: ``(round, {node id: tensors})``,
before any check (with SecAgg+ every entry is the unmasked aggregate). Privacy audits
play an honest-but-curious server with one; the federation itself needs none."""


class FedpalStrategy(Strategy):
    """A Flower ``Strategy`` wrapping the selected one: update validation, DP noise placement,
    a per-round report."""

    def __init__(
        self,
        settings: FederationSettings,
        spec: UpdateSpec,
        initial: list[np.ndarray],
        observers: Sequence[Observer] = (),
    ) -> None:
        from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

        self.settings = settings
        self.observers = tuple(observers)
        self.spec = spec
        self.inner = build_server_strategy(settings, initial)
        self.global_arrays = [np.asarray(a, dtype=np.float32) for a in initial]
        self.secagg = bool(settings["secagg"])
        self.dp = bool(settings["dp"])
        # configure_fit goes through Flower's DP wrapper (it tells clients the clipping
        # norm for fixedclipping_mod); the noisy average comes from a second wrapper
        # around a plain FedAvg, so noise lands before any server optimizer.
        if self.dp:
            z, c = settings["noise-multiplier"], settings["clipping-norm"]
            self.front: Any = DifferentialPrivacyClientSideFixedClipping(self.inner, z, c, 1)
            self.noiser: Any = DifferentialPrivacyClientSideFixedClipping(
                FedAvg(fit_metrics_aggregation_fn=_no_metrics), z, c, 1
            )
        else:
            self.front, self.noiser = self.inner, None
        self.report = RoundReport(round=0)
        self.spent: PrivacySpent | None = None
        """The run's privacy spent before this round (the run loop sets it); sent to clients
        with the global adapter, which that much privacy went into."""

    def __repr__(self) -> str:
        return f"FedpalStrategy({self.settings['strategy']}, dp={self.dp}, secagg={self.secagg})"

    def initialize_parameters(self, client_manager: Any) -> Any:
        from flwr.common import ndarrays_to_parameters

        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        self.report = RoundReport(round=server_round)
        instructions = self.front.configure_fit(server_round, parameters, client_manager)
        for _, fit_ins in instructions:
            fit_ins.config.update(self.settings.train_config(server_round))
            if self.spent is not None:
                fit_ins.config.update(self.spent.to_config())
        return instructions

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
        """Check, average (with noise), then let the server optimizer step."""
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

        report = self.report
        report.round, report.results = server_round, len(results)
        for failure in failures:
            if isinstance(failure, BaseException):
                text = first_line(failure)[:300]
            else:
                text = f"node {failure[0].node_id}: status {failure[1].status.message}"
            if text not in report.failures:  # SecAgg+'s collect stage lists each failed reply twice
                report.failures.append(text)
        if self.observers:
            seen = {str(proxy.node_id): parameters_to_ndarrays(fit_res.parameters) for proxy, fit_res in results}
            for observe in self.observers:
                observe(server_round, seen)
        accepted = []
        for proxy, fit_res in results:
            metrics = {k: v for k, v in fit_res.metrics.items() if isinstance(v, (int, float, str))}
            report.clients[str(proxy.node_id)] = metrics
            arrays = parameters_to_ndarrays(fit_res.parameters)
            if self.secagg:
                # every result carries the same unmasked sum; it is checked once below
                accepted.append((proxy, arrays))
                continue
            reason = check_update(self.spec, self.global_arrays, arrays, fit_res.metrics.get(FINGERPRINT_KEY))
            if reason is not None:
                log.warning("round %d: rejected the update of node %s: %s", server_round, proxy.node_id, reason)
                report.rejected.append({"node": str(proxy.node_id), "reason": reason})
                continue
            weight = 1 if self.dp else max(int(fit_res.num_examples), 1)
            accepted.append((proxy, arrays, weight))
        if not accepted:
            log.error("round %d: no acceptable update; the global adapter stays as it was", server_round)
            return None, {}
        if self.secagg:
            summed = [np.asarray(a, dtype=np.float32) for a in accepted[0][1]]
            reason = check_aggregate(self.spec, summed)
            if reason is not None:
                log.error("round %d: secure aggregate rejected: %s", server_round, reason)
                report.aggregate_error = reason
                return None, {}
            # every result carries the mean; passing them all keeps Flower's count check quiet
            to_average = [(proxy, summed, 1) for proxy, _ in accepted]
            report.clients_summed = len(accepted)
        else:
            to_average = [(p, [np.asarray(a, dtype=np.float32) for a in arrays], w) for p, arrays, w in accepted]
            report.clients_summed = len(to_average)

        def fit_res(arrays: list[np.ndarray], weight: int) -> Any:
            return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, {})

        averaging = [(p, fit_res(arrays, w)) for p, arrays, w in to_average]
        if self.noiser is not None:
            # noise N(0, (zC/k)^2) on the mean of the k summed updates = N(0, (zC)^2) on the sum
            self.noiser.num_sampled_clients = report.clients_summed
            mean_params, _ = self.noiser.aggregate_fit(server_round, averaging, [])
            report.noise_stddev_on_mean = (
                self.settings["noise-multiplier"] * self.settings["clipping-norm"] / report.clients_summed
            )
            averaging = [(to_average[0][0], fit_res(parameters_to_ndarrays(mean_params), 1))]
        new_params, _ = self.inner.aggregate_fit(server_round, averaging, [])
        if new_params is None:
            return None, {}
        new_arrays = [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(new_params)]
        report.global_change_norm = update_norm(new_arrays, self.global_arrays)
        self.global_arrays = new_arrays
        report.aggregated = True
        return ndarrays_to_parameters(new_arrays), {}


def settings_summary(settings: FederationSettings) -> str:
    """One line for the log: what protects this run."""
    v = settings
    dp = f"DP z={v.noise_multiplier} C={v.clipping_norm} delta={v.delta}" if v.dp else "no DP"
    sa = "SecAgg+" if v.secagg else "no SecAgg+"
    lora = "FFA-LoRA (B only)" if v.ffa_lora else "LoRA A+B"
    return f"{v.strategy}, {dp}, {sa}, {lora}, {v.num_server_rounds} rounds"
