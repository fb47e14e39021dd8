"""Privacy math for user-level DP-FedAvg: budget settings, a sampler-matched accountant.

Accounting is Flower's own ``RdpAccountant`` (``flwr.serverapp``), so the number fedpal
reports is the number Flower's tooling would report. This module only adds what Flower
leaves to the app: choosing the sampling model that matches how the strategy really
samples, turning fedpal's settings into Flower's privacy events, and keeping the ledger
across server restarts. ``independent_epsilon`` recomputes epsilon straight from Google's
``dp-accounting`` without Flower's wrapper, as a cross-check.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from fedpal.common.errors import FedpalError

# Flower's legacy ClientManager.sample() draws a fixed number of distinct clients
# uniformly at random; the matching accounting model is "sampled without replacement"
# over "replace one" neighbours. Poisson is offered for samplers that flip a coin per
# client; "none" claims no amplification at all (always valid, pessimistic).
SAMPLING_METHODS = ("without-replacement", "poisson", "none")


@dataclass(frozen=True)
class PrivacyBudget:
    """User-level DP settings of one federation: clip C, noise multiplier z, delta, budget.

    ``population_size`` is the number of clients sampling draws from and ``sample_size``
    how many take part per round; the noise added to the sum of clipped updates is
    N(0, (z*C)^2).
    """

    noise_multiplier: float
    clipping_norm: float
    target_delta: float
    population_size: int
    sample_size: int
    sampling: str = "without-replacement"
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise FedpalError(f"noise-multiplier must be positive, not {self.noise_multiplier}")
        if not (self.clipping_norm > 0 and math.isfinite(self.clipping_norm)):
            raise FedpalError(f"clipping-norm must be positive, not {self.clipping_norm}")
        if not 0 < self.target_delta < 1:
            raise FedpalError(f"delta must be strictly between 0 and 1, not {self.target_delta}")
        if self.population_size < 1 or not 1 <= self.sample_size <= self.population_size:
            raise FedpalError(
                f"sample size {self.sample_size} must be between 1 and the population size {self.population_size}"
            )
        if self.sampling not in SAMPLING_METHODS:
            raise FedpalError(f"sampling must be one of {', '.join(SAMPLING_METHODS)}, not '{self.sampling}'")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise FedpalError(f"max-epsilon must be positive (or 0 for no budget), not {self.max_epsilon}")

    @property
    def sampling_rate(self) -> float:
        return self.sample_size / self.population_size

    @property
    def noise_stddev_on_sum(self) -> float:
        return self.noise_multiplier * self.clipping_norm


@dataclass(frozen=True)
class PrivacySpent:
    """The budget a run has spent so far, which the server sends with each global adapter.

    A user's agent keeps it next to the adapter, so the user can see what protects the
    adapter they hold (``fedpal client status``) without asking the operator.
    """

    epsilon: float
    delta: float

    def to_config(self) -> dict[str, float]:
        """The keys a train or final message's config carries."""
        return {"epsilon": float(self.epsilon), "delta": float(self.delta)}

    @classmethod
    def from_config(cls, config: Any) -> "PrivacySpent | None":
        """What a message's config reports (None: the run has no DP, or the server is older)."""
        if "epsilon" not in config or "delta" not in config:
            return None
        return cls(float(config["epsilon"]), float(config["delta"]))


class Accountant:
    """Flower's RDP accountant for one federation, with the budget check done before a round.

    The ledger (every composed round) is what gets checkpointed, so a restarted server
    continues from the epsilon already spent instead of from zero. The budget stays out
    of Flower's config (it is passed to each check), so a resumed run may raise or lower
    it without its ledger being refused.
    """

    def __init__(self, budget: PrivacyBudget) -> None:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

        method, relation = {
            "without-replacement": (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE),
            "poisson": (SamplingMethod.POISSON, NeighboringRelation.ADD_OR_REMOVE_ONE),
            "none": (SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE),
        }[budget.sampling]
        self.budget = budget
        self._flower = RdpAccountant(
            PrivacyConfig(
                target_delta=budget.target_delta,
                population_size=budget.population_size,
                neighboring_relation=relation,
                sampling_method=method,
            )
        )

    def _event(self) -> Any:
        from flwr.serverapp import GaussianPrivacyEvent

        return GaussianPrivacyEvent(
            noise_multiplier=self.budget.noise_multiplier,
            sample_size=self.budget.sample_size,
            population_size=self.budget.population_size,
        )

    def _accountant_after(self, rounds: int) -> Any:
        # Every round is the same event, so the ledger is one composition with a count:
        # Flower's accountant replays its ledger on every budget check, and a ledger of
        # one entry per round would make round r cost O(r) RDP computations.
        from flwr.serverapp import RdpAccountant

        accountant = RdpAccountant(self._flower.config)
        if rounds:
            accountant.compose(self._event(), count=rounds)
        return accountant

    @property
    def rounds(self) -> int:
        return self._flower.num_releases

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta (0 before the first round)."""
        return self._flower.get_epsilon(self.budget.target_delta) if self.rounds else 0.0

    def epsilon_after_next(self) -> float:
        """Epsilon the next round would bring the total to (nothing is committed)."""
        return self._accountant_after(self.rounds + 1).get_epsilon(self.budget.target_delta)

    def next_round_allowed(self) -> bool:
        """False when one more round would take epsilon past ``max_epsilon``."""
        if self.budget.max_epsilon is None:
            return True
        return not self._accountant_after(self.rounds).would_exceed(self._event(), self.budget.max_epsilon)

    def record_round(self) -> float:
        """Compose one round's Gaussian release and return the new total epsilon."""
        self._flower = self._accountant_after(self.rounds + 1)
        return self.epsilon()

    def state_dict(self) -> dict[str, object]:
        return self._flower.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a saved ledger; one made under other privacy settings is refused."""
        try:
            self._flower.load_state_dict(state)
        except ValueError as err:
            raise FedpalError(f"cannot resume the privacy ledger: {err}") from None


def epsilon_after(budget: PrivacyBudget, rounds: int) -> float:
    """Epsilon ``rounds`` rounds of ``budget`` spend, by the accountant the server keeps."""
    return Accountant(budget)._accountant_after(rounds).get_epsilon(budget.target_delta) if rounds else 0.0


@functools.lru_cache(maxsize=64)
def noise_for_epsilon(budget: PrivacyBudget, epsilon: float, rounds: int) -> float:
    """The smallest noise multiplier (to 0.5%) with which ``rounds`` rounds spend at most ``epsilon``.

    Studies that compare populations or budgets fix epsilon and let the noise follow;
    epsilon falls as the noise rises, so a bisection on the accountant finds it (a few
    seconds: each step asks the RDP accountant, so answers are remembered).
    """
    from dataclasses import replace

    if not epsilon > 0 or rounds < 1:
        raise FedpalError(f"a target epsilon must be positive and rounds at least 1, not {epsilon} and {rounds}")
    low, high = 0.05, 1.0
    while epsilon_after(replace(budget, noise_multiplier=high), rounds) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise FedpalError(f"no noise multiplier up to 1e4 keeps epsilon at {epsilon} in {rounds} rounds")
    while high - low > 5e-3 * high:
        middle = (low + high) / 2
        if epsilon_after(replace(budget, noise_multiplier=middle), rounds) > epsilon:
            low = middle
        else:
            high = middle
    return high


def independent_epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    population_size: int,
    sample_size: int,
    sampling: str = "without-replacement",
    method: str = "rdp",
) -> float:
    """Epsilon of ``rounds`` sampled Gaussian releases computed with ``dp-accounting`` directly.

    ``method="pld"`` uses privacy-loss distributions (tighter than RDP, Poisson or no
    sampling only), a second opinion that RDP's number is an upper bound.
    """
    from dp_accounting import dp_event, pld, rdp
    from dp_accounting.privacy_accountant import NeighboringRelation

    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling == "without-replacement":
        event = dp_event.SampledWithoutReplacementDpEvent(population_size, sample_size, gaussian)
        relation = NeighboringRelation.REPLACE_ONE
    elif sampling == "poisson":
        event = dp_event.PoissonSampledDpEvent(sample_size / population_size, gaussian)
        relation = NeighboringRelation.ADD_OR_REMOVE_ONE
    elif sampling == "none":
        event, relation = gaussian, NeighboringRelation.ADD_OR_REMOVE_ONE
    else:
        raise FedpalError(f"sampling must be one of {', '.join(SAMPLING_METHODS)}, not '{sampling}'")
    if method == "rdp":
        accountant = rdp.RdpAccountant(neighboring_relation=relation)
    elif method == "pld":
        accountant = pld.PLDAccountant(neighboring_relation=relation)
    else:
        raise FedpalError(f"method must be 'rdp' or 'pld', not '{method}'")
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))
