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
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedpal.common.errors import FedpalError
from fedpal.common.generation import PLACEMENTS
from fedpal.common.adapters import FINGERPRINT_KEY
from fedpal.common.privacy import PrivacySpent
from fedpal.server.validation import UpdateSpec, check_aggregate, check_update, update_norm

log = logging.getLogger("fedpal.server")

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")

# The run configuration and its defaults. pyproject's [tool.flwr.app.config] lists the
# same keys (Flower only lets --run-config override keys declared there); a test keeps
# the two identical.
DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "num-server-rounds": 3,
    "strategy": "fedavg",
    "fraction-train": 1.0,
    "min-clients": 3,
    "population-size": 0,
    "seed": 0,
    "deterministic": False,
    "lora-rank": 8,
    "lora-alpha": 16.0,
    "lora-targets": "q_proj,k_proj,v_proj,o_proj",
    "lora-top-layers": 0,
    "ffa-lora": True,
    "fp16-updates": False,
    "objective": "both",
    "local-steps": 10,
    "personal-steps": 10,
    "learning-rate": 5e-4,
    "dpo-beta": 0.1,
    "batch-size": 4,
    "max-length": 128,
    "train-with-preferences": False,
    "preferences-in": "prompt",
    "personal-guard": True,
    "proximal-mu": 0.01,
    "server-learning-rate": 0.01,
    "server-momentum": 0.9,
    "client-threads": 1,
    "dp": True,
    "noise-multiplier": 1.0,
    "clipping-norm": 0.5,
    "delta": 1e-5,
    "max-epsilon": 0.0,
    "sampling": "without-replacement",
    "max-update-norm": 100.0,
    "secagg": True,
    "secagg-shares": 1.0,
    "secagg-threshold": 0.8,
    "secagg-clipping-range": 8.0,
    "secagg-timeout": 600.0,
    "final-adapter": True,
    "run-dir": "",
    "resume": False,
    "home-base": "",
}

# Settings a resumed run must share with the run it continues: changing any of them
# mid-run would make the checkpoint's adapter or privacy ledger mean something else.
RESUME_LOCKED = (
    "model", "strategy", "lora-rank", "lora-alpha", "lora-targets", "lora-top-layers", "ffa-lora", "dp",
    "noise-multiplier", "clipping-norm", "delta", "sampling", "seed", "deterministic",
)


@dataclass(frozen=True)
class FederationSettings:
    """The run configuration, typed and checked (one clear line for a bad value)."""

    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederationSettings":
        unknown = sorted(set(run_config) - set(DEFAULTS))
        if unknown:
            raise FedpalError(f"unknown run-config key '{unknown[0]}'; known keys: {', '.join(DEFAULTS)}")
        merged: dict[str, Any] = {}
        for key, default in DEFAULTS.items():
            value = run_config.get(key, default)
            merged[key] = _coerce(key, value, default)
        settings = cls(merged)
        settings.check()
        return settings

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def check(self) -> None:
        v = self.values
        if v["strategy"] not in STRATEGIES:
            raise FedpalError(f"strategy must be one of {', '.join(STRATEGIES)}, not '{v['strategy']}'")
        if v["num-server-rounds"] < 1:
            raise FedpalError("num-server-rounds must be at least 1")
        if not 0 < v["fraction-train"] <= 1:
            raise FedpalError(f"fraction-train must be in (0, 1], not {v['fraction-train']}")
        if v["min-clients"] < 1:
            raise FedpalError("min-clients must be at least 1")
        if v["secagg"] and v["min-clients"] < 3:
            raise FedpalError("SecAgg+ needs at least 3 clients per round: set min-clients >= 3 or secagg = false")
        if v["lora-rank"] < 1:
            raise FedpalError("lora-rank must be at least 1")
        if v["preferences-in"] not in PLACEMENTS:
            raise FedpalError(f"preferences-in must be one of {', '.join(PLACEMENTS)}, not '{v['preferences-in']}'")
        if v["lora-top-layers"] < 0:
            raise FedpalError("lora-top-layers must be 0 (all layers) or a positive number of last layers")
        if v["dp"] and not (v["noise-multiplier"] > 0 and v["clipping-norm"] > 0):
            raise FedpalError("with dp on, noise-multiplier and clipping-norm must be positive")
        shares = v["secagg-shares"]
        if not (0 < shares <= 1 or (shares >= 3 and shares == int(shares))):
            raise FedpalError(f"secagg-shares must be a fraction of the round's clients in (0, 1] or a whole number "
                              f"of shares, at least 3; not {shares}")
        if v["secagg"] and v["clipping-norm"] > v["secagg-clipping-range"]:
            raise FedpalError("clipping-norm must not exceed secagg-clipping-range")

    def train_config(self, server_round: int) -> dict[str, Any]:
        """What each client needs to train this round (sent inside FitIns.config)."""
        v = self.values
        return {
            "round": server_round,
            "model": v["model"],
            "seed": v["seed"],
            "deterministic": v["deterministic"],
            "lora-rank": v["lora-rank"],
            "lora-alpha": v["lora-alpha"],
            "lora-targets": v["lora-targets"],
            "lora-top-layers": v["lora-top-layers"],
            "ffa-lora": v["ffa-lora"],
            "fp16-updates": v["fp16-updates"] and not v["secagg"],
            "uniform-weights": v["dp"],
            "objective": v["objective"],
            "local-steps": v["local-steps"],
            "personal-steps": v["personal-steps"],
            "learning-rate": v["learning-rate"],
            "dpo-beta": v["dpo-beta"],
            "batch-size": v["batch-size"],
            "max-length": v["max-length"],
            "train-with-preferences": v["train-with-preferences"],
            "preferences-in": v["preferences-in"],
            "personal-guard": v["personal-guard"],
            "client-threads": v["client-threads"],
            "home-base": v["home-base"],
        }

    def locked(self) -> dict[str, Any]:
        return {k: self.values[k] for k in RESUME_LOCKED}


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(value, str):
        return value
    raise FedpalError(f"run-config {key} = {value!r} must be a {type(default).__name__}")


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
    from flwr.server import strategy as fl

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
    name = settings["strategy"]
    if name == "fedavg":
        return fl.FedAvg(**common)
    if name == "fedprox":
        return fl.FedProx(**common, proximal_mu=settings["proximal-mu"])
    if name == "fedadam":
        return fl.FedAdam(**common, eta=settings["server-learning-rate"])
    if name == "fedyogi":
        return fl.FedYogi(**common, eta=settings["server-learning-rate"])
    return fl.FedAvgM(**common, server_learning_rate=1.0, server_momentum=settings["server-momentum"])


# Attributes in which Flower's strategies keep state between rounds.
_STATE_ATTRS = ("current_weights", "m_t", "v_t", "momentum_vector")


def strategy_state(strategy: Any) -> dict[str, list[np.ndarray]]:
    """The server optimizer's state (FedAdam/FedYogi moments, FedAvgM momentum) for a checkpoint."""
    from flwr.common import parameters_to_ndarrays

    state = {a: [np.asarray(x) for x in getattr(strategy, a)] for a in _STATE_ATTRS if getattr(strategy, a, None) is not None}
    if type(strategy).__name__ == "FedAvgM" and strategy.initial_parameters is not None:
        state["initial_parameters"] = parameters_to_ndarrays(strategy.initial_parameters)
    return state


def restore_strategy_state(strategy: Any, state: Mapping[str, list[np.ndarray]]) -> None:
    """Put a checkpoint's optimizer state back into a freshly built strategy."""
    from flwr.common import ndarrays_to_parameters

    for key, arrays in state.items():
        if key == "initial_parameters":
            strategy.initial_parameters = ndarrays_to_parameters(list(arrays))
        elif key in _STATE_ATTRS:
            setattr(strategy, key, [np.array(a) for a in arrays])


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


class FedpalStrategy:
    """Wraps the selected strategy: validation, DP noise placement, per-round report.

    Duck-types ``flwr.server.strategy.Strategy`` (the workflows call only its methods).
    """

    def __init__(self, settings: FederationSettings, spec: UpdateSpec, initial: list[np.ndarray],
                 observers: Sequence[Observer] = ()) -> None:
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
            self.noiser: Any = DifferentialPrivacyClientSideFixedClipping(FedAvg(fit_metrics_aggregation_fn=_no_metrics), z, c, 1)
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
                text = str(failure).splitlines()[0][:300] if str(failure) else type(failure).__name__
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
            report.noise_stddev_on_mean = self.settings["noise-multiplier"] * self.settings["clipping-norm"] / report.clients_summed
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
    v = settings.values
    dp = f"DP z={v['noise-multiplier']} C={v['clipping-norm']} delta={v['delta']}" if v["dp"] else "no DP"
    sa = "SecAgg+" if v["secagg"] else "no SecAgg+"
    lora = "FFA-LoRA (B only)" if v["ffa-lora"] else "LoRA A+B"
    return f"{v['strategy']}, {dp}, {sa}, {lora}, {v['num-server-rounds']} rounds"
