"""Scoring personalized replies with the simulated users' exact utilities.

Everything here is numpy over utility tables, so the runner can score any baseline the
same way and tests can check the arithmetic on hand-made matrices:

- a *utility table* has shape ``(n_users, n_prompts)``: user ``i``'s utility of the reply
  their model gave to held-out prompt ``p``;
- *win rate vs base* is the fraction of prompts where a user's reply beats the base
  model's reply to the same prompt *for that user* (ties count one half), the
  deterministic counterpart of asking the user which one they prefer;
- the *cross-user matrix* ``M[i, j]`` is user ``i``'s mean utility of the replies produced
  with user ``j``'s adapters. Personalization works when each row peaks on its diagonal;
- *intervals* are percentile bootstraps over held-out prompts (every user keeps their
  row; prompts are resampled with replacement), the standard error is the bootstrap's
  standard deviation: a prompt is the unit that varies between runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fedpal.simulations.attributes import attribute_matrix
from fedpal.simulations.users import SimulatedUser

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class BaselineResult:
    """How one method (base, retrieval-only, local-only, shared-only, fedpal) served users.

    ``minority_utility`` is ``None`` when the population has no minority users.
    """

    name: str
    mean_utility: float
    win_rate_vs_base: float
    worst_user_utility: float
    minority_utility: float | None
    per_user_utility: tuple[float, ...]
    per_user_win_rate: tuple[float, ...]
    win_rate_ci: tuple[float, float] = (math.nan, math.nan)
    win_rate_se: float = math.nan
    mean_utility_ci: tuple[float, float] = (math.nan, math.nan)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for ``results.json`` (tuples become lists)."""
        data = asdict(self)
        for key in ("per_user_utility", "per_user_win_rate", "win_rate_ci", "mean_utility_ci"):
            data[key] = list(getattr(self, key))
        return data


def utility_table(users: Sequence[SimulatedUser], replies_per_user: Sequence[Sequence[str]]) -> np.ndarray:
    """Shape ``(n_users, n_prompts)``: user ``i``'s utility of ``replies_per_user[i][p]``."""
    if len(users) != len(replies_per_user):
        raise ValueError("need one list of replies per user")
    lengths = {len(r) for r in replies_per_user}
    if len(lengths) > 1:
        raise ValueError("every user must have replies to the same number of prompts")
    return np.stack([u.utilities(r) for u, r in zip(users, replies_per_user)])


def shared_reply_table(users: Sequence[SimulatedUser], replies: Sequence[str]) -> np.ndarray:
    """Utility table for replies every user receives alike (the base model's), measured once."""
    attributes = attribute_matrix(replies)
    return np.stack([u.utility_of_attributes(attributes) for u in users])


def win_rates(utilities: np.ndarray, base_utilities: np.ndarray) -> np.ndarray:
    """Per-user fraction of prompts where the reply beats base (ties count 0.5)."""
    utilities = np.asarray(utilities, dtype=np.float64)
    base_utilities = np.asarray(base_utilities, dtype=np.float64)
    if utilities.shape != base_utilities.shape or utilities.ndim != 2:
        raise ValueError("utility tables must have the same (n_users, n_prompts) shape")
    wins = (utilities > base_utilities).astype(np.float64)
    ties = np.isclose(utilities, base_utilities, rtol=0.0, atol=1e-12)
    return np.where(ties, 0.5, wins).mean(axis=1)


def bootstrap(
    utilities: np.ndarray, base_utilities: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, np.ndarray]:
    """Win rate and mean utility over ``samples`` resamplings of the prompts (columns)."""
    utilities = np.asarray(utilities, dtype=np.float64)
    wins = np.where(
        np.isclose(utilities, base_utilities, rtol=0.0, atol=1e-12), 0.5, (utilities > base_utilities) * 1.0
    )
    columns = np.random.default_rng(seed).integers(0, utilities.shape[1], size=(samples, utilities.shape[1]))
    return {"win_rate": wins[:, columns].mean(axis=(0, 2)), "mean_utility": utilities[:, columns].mean(axis=(0, 2))}


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values``."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def summarize_baseline(
    name: str,
    utilities: np.ndarray,
    base_utilities: np.ndarray,
    minority_mask: Sequence[bool] | np.ndarray,
) -> BaselineResult:
    """Reduce a method's utility table to the numbers reported for it.

    The mean utility averages users (each user's prompts first) so a user with more
    prompts does not count more; the worst user is the lowest per-user mean. Intervals
    and the standard error come from :func:`bootstrap`.
    """
    per_user = np.asarray(utilities, dtype=np.float64).mean(axis=1)
    per_user_wins = win_rates(utilities, base_utilities)
    resampled = bootstrap(utilities, base_utilities)
    minority = np.asarray(minority_mask, dtype=bool)
    if minority.shape != per_user.shape:
        raise ValueError("minority_mask needs one entry per user")
    return BaselineResult(
        name=name,
        mean_utility=float(per_user.mean()),
        win_rate_vs_base=float(per_user_wins.mean()),
        worst_user_utility=float(per_user.min()),
        minority_utility=float(per_user[minority].mean()) if minority.any() else None,
        per_user_utility=tuple(float(x) for x in per_user),
        per_user_win_rate=tuple(float(x) for x in per_user_wins),
        win_rate_ci=interval(resampled["win_rate"]),
        win_rate_se=float(resampled["win_rate"].std()),
        mean_utility_ci=interval(resampled["mean_utility"]),
    )


def evaluate_baseline(
    name: str,
    users: Sequence[SimulatedUser],
    replies_per_user: Sequence[Sequence[str]],
    base_replies: Sequence[str],
) -> BaselineResult:
    """Score one method's per-user replies on held-out prompts against the base replies."""
    utilities = utility_table(users, replies_per_user)
    base = shared_reply_table(users, base_replies)
    if base.shape != utilities.shape:
        raise ValueError("base replies must cover the same prompts as the users' replies")
    return summarize_baseline(name, utilities, base, [u.is_minority for u in users])


def cross_user_matrix(users: Sequence[SimulatedUser], replies_by_adapter: Sequence[Sequence[str]]) -> np.ndarray:
    """``M[i, j]``: user ``i``'s mean utility of the replies from user ``j``'s adapters.

    Attributes of each adapter's replies are measured once and scored by every user.
    """
    attributes = [attribute_matrix(replies) for replies in replies_by_adapter]
    return np.array([[float(u.utility_of_attributes(a).mean()) for a in attributes] for u in users])


def _check_square(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError("the cross-user matrix must be square with at least two users")
    return m


def diagonal_best(matrix: np.ndarray) -> np.ndarray:
    """Per user: is their own adapter strictly better for them than every other user's?

    Strict, so identical adapters (all rows flat) count as not personalized.
    """
    m = _check_square(matrix)
    off = np.where(np.eye(len(m), dtype=bool), -np.inf, m)
    return np.diag(m) > off.max(axis=1)


def diagonal_best_fraction(matrix: np.ndarray) -> float:
    """Fraction of users whose own adapter serves them best (see :func:`diagonal_best`)."""
    return float(diagonal_best(matrix).mean())


def diagonal_margin(matrix: np.ndarray) -> np.ndarray:
    """Per user: own-adapter utility minus the mean utility of the other users' adapters.

    The size of the personalization gain, where :func:`diagonal_best` gives only its sign.
    """
    m = _check_square(matrix)
    n = len(m)
    off_mean = (m.sum(axis=1) - np.diag(m)) / (n - 1)
    return np.diag(m) - off_mean


def candidate_headroom(
    users: Sequence[SimulatedUser], candidates: Sequence[Sequence[str]], styles: Sequence[str], plain: str = "plain"
) -> dict[str, object] | None:
    """What the training candidates allow, scored like the baselines (``None`` without a plain style).

    ``candidates[p][s]`` is the base model's reply to prompt ``p`` in style ``s``; the plain
    one is its unprompted reply, i.e. the base baseline on that prompt. Two references:
    every reply in the user's best style (best mean utility: what a perfect "answer in my
    style" adapter could reach) and the best candidate per prompt (an oracle).
    """
    if plain not in styles:
        return None
    table = np.stack([np.array([u.utilities(row) for row in candidates]) for u in users])  # users x prompts x styles
    base = table[:, :, list(styles).index(plain)]
    best_style = table.mean(axis=1).argmax(axis=1)
    in_best_style = table[np.arange(len(users)), :, best_style]
    oracle = table.max(axis=2)
    return {
        "prompts": len(candidates),
        "best_style_per_user": [styles[i] for i in best_style],
        "best_style_win_rate_vs_base": float(win_rates(in_best_style, base).mean()),
        "best_style_mean_utility": float(in_best_style.mean()),
        "best_candidate_win_rate_vs_base": float(win_rates(oracle, base).mean()),
        "best_candidate_mean_utility": float(oracle.mean()),
        "base_mean_utility": float(base.mean()),
    }
