"""Flower strategies by name: what the run-config setting ``strategy`` picks from.

A registry rather than an if-chain, so a researcher adds a strategy without editing
fedpal: register a factory that builds the Flower strategy from fedpal's settings and the
arguments every strategy shares (sampling fractions, initial parameters, ...), then import
that module wherever the ServerApp runs::

    from fedpal.common.strategies import flower_strategy

    @flower_strategy("fedmedian")
    def fedmedian(settings, common):
        from flwr.server.strategy import FedMedian
        return FedMedian(**common)

It lives in ``common`` because the settings check names against it on clients and servers
alike; the factories import Flower's strategies only when called. fedpal wraps whatever
is built (``fedpal.server.strategy.FedpalStrategy``): update checks, noise calibrated to
the clients summed, SecAgg+.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedpal.common.settings import FederationSettings

StrategyFactory = Callable[["FederationSettings", dict[str, Any]], Any]
STRATEGIES: dict[str, StrategyFactory] = {}
"""Strategy factories by name; ``strategy = NAME`` in the run config picks one."""


def flower_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Register a strategy factory under ``name`` (a decorator)."""

    def register(factory: StrategyFactory) -> StrategyFactory:
        STRATEGIES[name] = factory
        return factory

    return register


@flower_strategy("fedavg")
def _fedavg(settings: FederationSettings, common: dict[str, Any]) -> Any:
    """McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data."""
    from flwr.server.strategy import FedAvg

    return FedAvg(**common)


@flower_strategy("fedprox")
def _fedprox(settings: FederationSettings, common: dict[str, Any]) -> Any:
    """Li et al. 2020, Federated Optimization in Heterogeneous Networks (``proximal-mu``)."""
    from flwr.server.strategy import FedProx

    return FedProx(**common, proximal_mu=settings.proximal_mu)


@flower_strategy("fedadam")
def _fedadam(settings: FederationSettings, common: dict[str, Any]) -> Any:
    """Reddi et al. 2021, Adaptive Federated Optimization (``server-learning-rate``)."""
    from flwr.server.strategy import FedAdam

    return FedAdam(**common, eta=settings.server_learning_rate)


@flower_strategy("fedyogi")
def _fedyogi(settings: FederationSettings, common: dict[str, Any]) -> Any:
    """Reddi et al. 2021, Adaptive Federated Optimization (``server-learning-rate``)."""
    from flwr.server.strategy import FedYogi

    return FedYogi(**common, eta=settings.server_learning_rate)


@flower_strategy("fedavgm")
def _fedavgm(settings: FederationSettings, common: dict[str, Any]) -> Any:
    """Hsu et al. 2019, Measuring the Effects of Non-Identical Data Distribution (``server-momentum``)."""
    from flwr.server.strategy import FedAvgM

    return FedAvgM(**common, server_learning_rate=1.0, server_momentum=settings.server_momentum)
