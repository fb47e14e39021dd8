"""An audited epsilon from ONE federated run, measured with canary clients.

The accountant's epsilon is a proof about the mechanism fedpal means to run; an audit is
a measurement of the one it did run. A clipping bug, noise added to the wrong tensor or a
client that escapes the clip shows up as an audited epsilon above the accounted one,
which no amount of reading the accountant's code would reveal. Retraining hundreds of
times to audit the classic way is out of reach for a federation, so both methods here
need a single run:

* Canary clients (Andrew et al., ICLR 2024): each canary sends, every round, the global
  adapter it received plus a fixed random direction of norm C (the clipping norm), so its
  update is exactly that direction. Random directions in a space of many thousand
  coordinates are nearly orthogonal to each other and to the real updates, so the cosine
  between the run's total change and a canary's direction says whether it took part.
* Steinke, Nasr & Jagielski (NeurIPS 2023) turn "each canary was included with
  probability 1/2, and the auditor guessed this many of them right" into a statistically
  valid LOWER bound on epsilon (:func:`steinke_lower_bound`).
* Andrew et al.'s own number (:func:`one_shot_epsilon`) fits Gaussians to the cosines of
  inserted and never-inserted canaries and reports the epsilon of that pair: usually much
  closer to the accounted epsilon, but an estimate, not a bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fedpal.common.errors import FedpalError

SEARCH_STEPS = 60
MAX_EPSILON = 500.0
"""Searches for epsilon stop here: exp(500) still fits a float, and no audit gets near it."""


@dataclass(frozen=True)
class AuditResult:
    """An audited epsilon: a lower bound at ``confidence`` and how it was reached.

    ``canaries`` were audited, ``included`` of them took part in the run; the auditor
    guessed "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest
    (``guesses`` = their sum) and got ``correct`` right. ``one_shot_epsilon`` is Andrew et
    al.'s estimate (None when not computed), at the same ``delta``.
    """

    epsilon: float
    delta: float
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    one_shot_epsilon: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _flatten(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name in names])


def canary_directions(shapes: Mapping[str, tuple[int, ...]], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` independent uniformly random unit vectors over all tensors of ``shapes`` together.

    A standard normal vector divided by its norm is uniform on the sphere; the norm is
    taken over the concatenation of every tensor (float32 per tensor), so a canary update
    ``norm * direction`` has norm ``norm`` however the adapter is split into tensors.
    The same ``seed`` gives the same directions, so the auditor can regenerate them.
    """
    if count < 1:
        raise FedpalError(f"the number of canaries must be at least 1, not {count}")
    names = list(shapes)
    sizes = [int(np.prod(shapes[name], dtype=np.int64)) for name in names]
    rng = np.random.default_rng(seed)
    directions = []
    for _ in range(count):
        flat = rng.standard_normal(sum(sizes))
        flat /= np.linalg.norm(flat)
        pieces = np.split(flat, np.cumsum(sizes)[:-1])
        directions.append({name: piece.reshape(shapes[name]).astype(np.float32) for name, piece in zip(names, pieces)})
    return directions


def canary_update(
    received: Mapping[str, np.ndarray], direction: Mapping[str, np.ndarray], norm: float
) -> dict[str, np.ndarray]:
    """What a canary client sends: the adapter it ``received`` plus ``norm * direction``.

    The server computes each client's update as sent minus received, so the canary's
    update is ``norm * direction`` (up to the adapter dtype's rounding); with ``norm`` equal to the clipping norm the
    clip leaves it whole, the worst case the DP analysis must cover.
    """
    if set(received) != set(direction):
        raise FedpalError("the canary direction does not have the adapter's tensors")
    sent = {}
    for name, array in received.items():
        array = np.asarray(array)
        shifted = array.astype(np.float64) + norm * np.asarray(direction[name], dtype=np.float64)
        sent[name] = shifted.astype(array.dtype)
    return sent


def canary_scores(
    initial: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray], directions: Sequence[Mapping[str, np.ndarray]]
) -> np.ndarray:
    """Cosine between the run's total change ``final - initial`` and each canary direction.

    Tensors are flattened in ``initial``'s name order for all three. A canary that took
    part pushed the global adapter along its direction every round it was sampled, so its
    cosine is positive; one that never did has a cosine of about N(0, 1/d) in d dimensions.
    """
    names = list(initial)
    if set(final) != set(names):
        raise FedpalError("the initial and final global adapters have different tensors")
    change = _flatten(final, names) - _flatten(initial, names)
    length = np.linalg.norm(change)
    if length == 0:
        raise FedpalError("the global adapter did not change during the run: there is nothing to audit")
    scores = []
    for direction in directions:
        if set(direction) != set(names):
            raise FedpalError("a canary direction does not have the adapter's tensors")
        flat = _flatten(direction, names)
        scores.append(float(change @ flat) / (length * np.linalg.norm(flat)))
    return np.asarray(scores)


def _binomial_pmf(trials: int, p: float) -> np.ndarray:
    """P[Binomial(trials, p) = k] for k = 0..trials, from log-gamma (no scipy)."""
    k = np.arange(trials + 1)
    log_choose = np.array([math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) for i in k])
    with np.errstate(divide="ignore"):
        log_pmf = log_choose + k * np.log(p) + (trials - k) * np.log1p(-p)
    return np.exp(log_pmf)


def steinke_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``correct`` right guesses out of ``guesses`` under (epsilon, delta)-DP.

    Steinke, Nasr & Jagielski (NeurIPS 2023), the approximate-DP bound of their Section 5
    as computed by the code in their Appendix D (``p_value_DP_audit``; the same formula is
    ``_one_run_p_value`` in google-deepmind/jax_privacy ``auditing.py``). With
    q = e^eps / (1 + e^eps), the accuracy of eps-DP randomized response and m canaries::

        p = P[Binomial(r, q) >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i

    Parameters
    ----------
    canaries : m, each included independently with probability 1/2.
    guesses : r, the guesses made (abstentions excluded).
    correct : v, the right ones.
    epsilon, delta : the DP claim being tested.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise FedpalError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    pmf = _binomial_pmf(guesses, 1.0 / (1.0 + math.exp(-epsilon)))
    beta = float(pmf[correct:].sum())
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    below = np.cumsum(pmf[:correct][::-1])  # below[i - 1] = P[v - i <= Binomial < v]
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(beta + alpha * delta * 2 * canaries, 1.0)


def steinke_epsilon(canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest epsilon that ``correct`` of ``guesses`` right rules out at ``significance``.

    Bisection as in Steinke et al.'s Appendix D ``get_eps_audit``: the p-value grows with
    epsilon, so the bound is where it crosses ``significance`` (0 when even epsilon = 0
    explains the guesses).
    """
    if steinke_p_value(canaries, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while high < MAX_EPSILON and steinke_p_value(canaries, guesses, correct, high, delta) < significance:
        low, high = high, 2 * high
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        if steinke_p_value(canaries, guesses, correct, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def guess_counts(canaries: int) -> list[tuple[int, int]]:
    """The (k+, k-) pairs every audit tries, fixed before any score is seen.

    k doubles from 1 up to half the canaries (and half itself): one-sided guesses (k, 0),
    for attacks that only recognise some inserted canaries, and symmetric ones (k, k),
    for attacks that separate both sides.
    """
    half = canaries // 2
    sizes = sorted({*(2**i for i in range(max(half, 1).bit_length()) if 2**i <= half), half} - {0})
    return [(k, 0) for k in sizes] + [(k, k) for k in sizes]


def steinke_lower_bound(
    scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95
) -> AuditResult:
    """A lower bound on epsilon from one run (Steinke, Nasr & Jagielski, NeurIPS 2023).

    Every canary must have been included independently with probability 1/2 (the
    theorem's only assumption about the attack). The auditor guesses "in" for the k+
    highest ``scores``, "out" for the k- lowest and abstains on the rest; for each pair in
    :func:`guess_counts` the number of right guesses gives the largest epsilon under
    which that many would still be plausible (:func:`steinke_epsilon`), and the result is
    the best pair's. Trying several pairs is paid for with a union bound: each is tested
    at significance ``(1 - confidence) / len(guess_counts(m))``, so the reported bound
    holds with probability ``confidence`` whichever pair wins.

    Returns
    -------
    AuditResult
        With ``one_shot_epsilon`` None (:func:`audit` fills it).
    """
    scores_array = np.asarray(scores, dtype=np.float64)
    inside = np.asarray(included, dtype=bool)
    if scores_array.ndim != 1 or scores_array.shape != inside.shape or scores_array.size < 2:
        raise FedpalError("need one score and one inclusion flag per canary, for at least 2 canaries")
    if not 0 < confidence < 1 or not 0 <= delta < 1:
        raise FedpalError(f"confidence must be in (0, 1) and delta in [0, 1), not {confidence} and {delta}")
    m = scores_array.size
    order = np.argsort(-scores_array, kind="stable")
    ranked = inside[order]
    candidates = guess_counts(m)
    significance = (1 - confidence) / len(candidates)
    best = None
    for k_plus, k_minus in candidates:
        correct = int(ranked[:k_plus].sum()) + int((~ranked[m - k_minus :]).sum() if k_minus else 0)
        epsilon = steinke_epsilon(m, k_plus + k_minus, correct, delta, significance)
        if best is None or epsilon > best[0]:
            best = (epsilon, k_plus, k_minus, correct)
    epsilon, k_plus, k_minus, correct = best
    return AuditResult(
        epsilon=epsilon,
        delta=delta,
        confidence=confidence,
        canaries=m,
        included=int(inside.sum()),
        guesses=k_plus + k_minus,
        correct=correct,
        k_plus=k_plus,
        k_minus=k_minus,
    )


def _mass(intervals: Sequence[tuple[float, float]], mean: float, std: float) -> float:
    """Probability of a union of disjoint intervals under N(mean, std^2), accurate in both tails."""
    total = 0.0
    for low, high in intervals:
        a, b = (low - mean) / std, (high - mean) / std
        if a > 0:  # upper tail: difference of survival functions
            total += 0.5 * (math.erfc(a / math.sqrt(2)) - math.erfc(b / math.sqrt(2)))
        else:
            total += 0.5 * (math.erfc(-b / math.sqrt(2)) - math.erfc(-a / math.sqrt(2)))
    return total


def _loss_above(epsilon: float, p: tuple[float, float], q: tuple[float, float]) -> list[tuple[float, float]]:
    """Where log(p(x) / q(x)) > epsilon for Gaussians p, q = (mean, std): a quadratic's positive set."""
    (mp, sp), (mq, sq) = p, q
    a = 0.5 / sq**2 - 0.5 / sp**2
    b = mp / sp**2 - mq / sq**2
    c = 0.5 * (mq / sq) ** 2 - 0.5 * (mp / sp) ** 2 + math.log(sq / sp) - epsilon
    if abs(a) <= 1e-12 * (sp**-2 + sq**-2):
        if b == 0:
            return [(-math.inf, math.inf)] if c > 0 else []
        root = -c / b
        return [(root, math.inf)] if b > 0 else [(-math.inf, root)]
    discriminant = b * b - 4 * a * c
    if discriminant <= 0:
        return [(-math.inf, math.inf)] if a > 0 else []
    half = -0.5 * (b + math.copysign(math.sqrt(discriminant), b))
    low, high = sorted((half / a, c / half))
    return [(-math.inf, low), (high, math.inf)] if a > 0 else [(low, high)]


def gaussian_pair_delta(epsilon: float, p: tuple[float, float], q: tuple[float, float]) -> float:
    """Hockey-stick divergence E_{e^eps}(P || Q) of two Gaussians given as (mean, std), exactly.

    sup_S P(S) - e^eps Q(S) is reached on S = {log p/q > eps}, an interval or the
    complement of one (the log-ratio of Gaussians is quadratic), the method of Andrew et
    al.'s reference code (``epsilon_two_gaussians``, after Steinke 2022, arXiv:2210.00597).
    """
    region = _loss_above(epsilon, p, q)
    return max(_mass(region, *p) - math.exp(epsilon) * _mass(region, *q), 0.0)


def one_shot_epsilon(scores_in: Sequence[float], scores_out: Sequence[float], delta: float) -> float:
    """Andrew et al.'s (ICLR 2024) one-shot epsilon: the epsilon at ``delta`` of two fitted Gaussians.

    A Gaussian is fitted to the cosines of the inserted canaries and one to those of the
    never-inserted ones; the result is the smallest epsilon with both hockey-stick
    divergences at most ``delta``, i.e. the epsilon of a mechanism whose output (the
    cosine) is distributed like that with and without a canary. For the Gaussian
    mechanism the cosines are close to Gaussian and this lands near the accounted
    epsilon; in general it is an ESTIMATE with no confidence attached, not a bound: use
    :func:`steinke_lower_bound` for a claim that holds with stated probability.
    """
    inside, outside = np.asarray(scores_in, dtype=np.float64), np.asarray(scores_out, dtype=np.float64)
    if inside.size < 2 or outside.size < 2:
        raise FedpalError("fitting a Gaussian needs at least 2 inserted and 2 never-inserted canaries")
    if not 0 < delta < 1:
        raise FedpalError(f"delta must be strictly between 0 and 1, not {delta}")
    p = (float(inside.mean()), float(inside.std(ddof=1)))
    q = (float(outside.mean()), float(outside.std(ddof=1)))
    if p[1] == 0 or q[1] == 0:
        raise FedpalError("the canary cosines have no spread: a Gaussian cannot be fitted")

    def worst(epsilon: float) -> float:
        return max(gaussian_pair_delta(epsilon, p, q), gaussian_pair_delta(epsilon, q, p))

    if worst(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while worst(high) > delta:
        if high >= MAX_EPSILON:
            return math.inf
        low, high = high, 2 * high
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if worst(middle) > delta else (low, middle)
    return high


def audit(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95) -> AuditResult:
    """Both numbers from one run's canary ``scores``: the Steinke et al. bound and Andrew et al.'s estimate."""
    bound = steinke_lower_bound(scores, included, delta, confidence)
    scores_array, inside = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    estimate = one_shot_epsilon(scores_array[inside], scores_array[~inside], delta)
    return AuditResult(**{**bound.to_dict(), "one_shot_epsilon": estimate})
