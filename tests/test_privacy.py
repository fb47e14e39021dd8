"""Privacy accounting: fedpal's epsilon against dp-accounting computed independently."""

from __future__ import annotations

import pytest

from fedpal.common.errors import FedpalError
from fedpal.common.privacy import Accountant, PrivacyBudget, independent_epsilon

CASES = [
    # (population, sample, z, rounds, delta, sampling)
    (4, 4, 1.0, 3, 1e-5, "without-replacement"),
    (1000, 50, 0.8, 4, 1e-6, "without-replacement"),
    (100, 10, 1.1, 4, 1e-5, "poisson"),
    (10, 10, 2.0, 4, 1e-5, "none"),
]


@pytest.mark.parametrize("population,sample,z,rounds,delta,sampling", CASES)
def test_epsilon_matches_dp_accounting(population, sample, z, rounds, delta, sampling):
    accountant = Accountant(PrivacyBudget(z, 1.0, delta, population, sample, sampling))
    for _ in range(rounds):
        ours = accountant.record_round()
    theirs = independent_epsilon(z, rounds, delta, population, sample, sampling)
    assert ours == pytest.approx(theirs, rel=0.05)
    assert accountant.rounds == rounds


def test_rdp_is_an_upper_bound_of_pld():
    """A second, differently computed opinion: PLD is tighter, so RDP must not be below it."""
    rdp = independent_epsilon(1.0, 30, 1e-5, 100, 10, "poisson", method="rdp")
    pld = independent_epsilon(1.0, 30, 1e-5, 100, 10, "poisson", method="pld")
    assert pld <= rdp < 2 * pld


def test_more_noise_less_epsilon_and_epsilon_grows_with_rounds():
    low = Accountant(PrivacyBudget(0.8, 1.0, 1e-5, 10, 10, "none"))
    high = Accountant(PrivacyBudget(1.6, 1.0, 1e-5, 10, 10, "none"))
    eps_low = [low.record_round() for _ in range(3)]
    eps_high = [high.record_round() for _ in range(3)]
    assert all(a > b for a, b in zip(eps_low, eps_high))
    assert eps_low == sorted(eps_low) and len(set(eps_low)) == 3


def test_budget_stops_before_the_round_that_would_exceed_it():
    budget = PrivacyBudget(1.0, 1.0, 1e-5, 4, 4, max_epsilon=7.5)
    accountant = Accountant(budget)
    done = 0
    while accountant.next_round_allowed():
        accountant.record_round()
        done += 1
    # rounds give 4.73, 7.08, 9.01: the third would pass 7.5
    assert done == 2
    assert accountant.epsilon() <= 7.5 < accountant.epsilon_after_next()


def test_ledger_survives_a_restart_and_never_resets():
    budget = PrivacyBudget(1.0, 1.0, 1e-5, 20, 5, "poisson")
    first = Accountant(budget)
    for _ in range(3):
        first.record_round()
    restarted = Accountant(budget)
    assert restarted.epsilon() == 0.0
    restarted.load_state_dict(first.state_dict())
    assert restarted.epsilon() == pytest.approx(first.epsilon())
    assert restarted.record_round() == pytest.approx(first.record_round())


def test_ledger_from_other_settings_is_refused():
    first = Accountant(PrivacyBudget(1.0, 1.0, 1e-5, 20, 5, "none"))
    first.record_round()
    other = Accountant(PrivacyBudget(1.0, 1.0, 1e-5, 30, 5, "none"))
    with pytest.raises(FedpalError, match="cannot resume the privacy ledger"):
        other.load_state_dict(first.state_dict())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"noise_multiplier": 0.0}, "noise-multiplier"),
        ({"clipping_norm": -1.0}, "clipping-norm"),
        ({"target_delta": 1.5}, "delta"),
        ({"sample_size": 11}, "sample size"),
        ({"sampling": "shuffle"}, "sampling"),
        ({"max_epsilon": -2.0}, "max-epsilon"),
    ],
)
def test_bad_budget_is_one_clear_error(kwargs, message):
    values = {
        "noise_multiplier": 1.0,
        "clipping_norm": 1.0,
        "target_delta": 1e-5,
        "population_size": 10,
        "sample_size": 5,
    }
    with pytest.raises(FedpalError, match=message):
        PrivacyBudget(**{**values, **kwargs})


def test_a_resumed_run_may_change_its_budget_but_not_its_mechanism():
    first = Accountant(PrivacyBudget(1.0, 1.0, 1e-5, 10, 10, "none", max_epsilon=5.0))
    first.record_round()
    relaxed = Accountant(PrivacyBudget(1.0, 1.0, 1e-5, 10, 10, "none", max_epsilon=50.0))
    relaxed.load_state_dict(first.state_dict())
    assert relaxed.rounds == 1 and relaxed.next_round_allowed()
    other_delta = Accountant(PrivacyBudget(1.0, 1.0, 1e-6, 10, 10, "none"))
    with pytest.raises(FedpalError, match="cannot resume"):
        other_delta.load_state_dict(first.state_dict())
