"""Simulated users with known preferences over reply attributes.

A user's utility of a reply is ``1 - sum_k w_k |a_k - t_k| / sum_k w_k`` over the
attributes ``a`` of :mod:`fedpal.simulations.attributes` (weights ``w >= 0``, targets
``t`` in ``[0, 1]``), so it lies in ``[0, 1]`` and 1 means a perfect match. Labels are
noisy the way human labels are: pairwise choices follow Bradley–Terry,
``P(a > b) = sigmoid((u(a) - u(b)) / temperature)``, and 1–5 ratings bin the utility plus
logistic noise of the same scale, so one temperature sets how noisy both kinds of label are.

A population mixes a shared component (what most users like — federated averaging should
learn it) with one individual archetype per user: opposed majority archetypes (concise
vs. detailed, warm vs. formal) and a minority archetype that the shared adapter will not
serve, so personal adapters have to. Everything is deterministic from the seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedpal.common.types import PreferencePair
from fedpal.simulations.attributes import ATTRIBUTE_NAMES, attribute_matrix

_INDEX = {name: i for i, name in enumerate(ATTRIBUTE_NAMES)}


@dataclass(frozen=True)
class Archetype:
    """A named preference profile: attribute targets, their weights and how users state them."""

    name: str
    targets: Mapping[str, float]
    weights: Mapping[str, float]
    statements: Mapping[str, str]
    """Per attribute, the sentence a user of this archetype would say about it."""


SHARED_COMPONENT = Archetype(
    name="shared",
    targets={"examples": 0.5, "reading_level": 0.45, "topic_safety": 0.34},
    weights={"examples": 0.8, "reading_level": 0.8, "topic_safety": 0.4},
    statements={
        "examples": "I like a concrete example in the answer.",
        "reading_level": "Keep the wording plain, no jargon.",
        "topic_safety": "Mention anything I should be careful about.",
    },
)
"""What most users like: a concrete example, plain wording, a note of caution."""

ARCHETYPES: dict[str, Archetype] = {
    "concise": Archetype(
        name="concise",
        targets={"length": 0.42, "structure": 0.0, "questions": 0.0, "warmth": 0.1},
        weights={"length": 4.0, "structure": 0.8, "questions": 0.6, "warmth": 0.4},
        statements={
            "length": "Keep answers short, one or two sentences.",
            "structure": "No bullet lists, just say it.",
            "questions": "Don't ask me questions back.",
            "warmth": "Skip the pleasantries.",
        },
    ),
    "detailed": Archetype(
        name="detailed",
        targets={"length": 0.85, "structure": 0.7, "examples": 1.0, "reading_level": 0.5},
        weights={"length": 2.0, "structure": 1.2, "examples": 0.6, "reading_level": 0.3},
        statements={
            "length": "I like thorough, detailed answers.",
            "structure": "Please organise answers as bullet points or numbered steps.",
            "examples": "Include examples.",
            "reading_level": "Explain it properly, not dumbed down.",
        },
    ),
    "warm": Archetype(
        name="warm",
        targets={"warmth": 0.9, "questions": 1.0, "formality": 0.15},
        weights={"warmth": 1.6, "questions": 1.2, "formality": 1.0},
        statements={
            "warmth": "Be warm and enthusiastic with me.",
            "questions": "Ask me a follow-up question so we can keep going.",
            "formality": "Talk to me casually, like a friend.",
        },
    ),
    "formal": Archetype(
        name="formal",
        targets={"formality": 0.9, "warmth": 0.0, "questions": 0.0},
        weights={"formality": 2.5, "warmth": 1.2, "questions": 0.8},
        statements={
            "formality": "Use a formal, professional tone.",
            "warmth": "No exclamation marks or cheerfulness, please.",
            "questions": "Do not ask me questions; just answer.",
        },
    ),
    "budget_plain": Archetype(
        name="budget_plain",
        targets={"topic_budget": 1.0, "reading_level": 0.15, "topic_time": 0.67},
        weights={"topic_budget": 2.0, "reading_level": 1.5, "topic_time": 0.8},
        statements={
            "topic_budget": "I'm on a tight budget, so always think about cost.",
            "reading_level": "Use very simple words and short sentences.",
            "topic_time": "Tell me how long things take.",
        },
    ),
}
"""Individual components. Opposed pairs: concise/detailed, warm/formal; ``budget_plain`` is
the default minority, wanting what the majority does not ask for."""

MAJORITY_ARCHETYPES: tuple[str, ...] = ("concise", "detailed", "warm", "formal")
MINORITY_ARCHETYPE = "budget_plain"


@dataclass(frozen=True)
class CandidateRating:
    """A user's 1–5 rating of one reply to one prompt (stored in preference memory)."""

    prompt: str
    reply: str
    rating: int


@dataclass(frozen=True)
class LabelledCandidates:
    """What one user's interaction with one prompt's candidates produces."""

    pairs: list[PreferencePair]
    ratings: list[CandidateRating]


@dataclass(frozen=True, eq=False)
class SimulatedUser:
    """A user whose preferences are an exact, known function of reply attributes.

    ``weights`` and ``targets`` are in :data:`ATTRIBUTE_NAMES` order. ``stated_preference``
    is what the user tells the assistant up front: possibly only part of what they want,
    or ``None`` when they state nothing.
    """

    user_id: str
    archetype: str
    weights: np.ndarray
    targets: np.ndarray
    temperature: float = 0.05
    stated_preference: str | None = None
    is_minority: bool = False
    stated_attributes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        k = len(ATTRIBUTE_NAMES)
        if self.weights.shape != (k,) or self.targets.shape != (k,):
            raise ValueError(f"weights and targets must have shape ({k},)")
        if np.any(self.weights < 0) or not np.any(self.weights > 0):
            raise ValueError("weights must be non-negative with at least one positive")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready profile (weights and targets keyed by attribute) for results files."""
        return {
            "user_id": self.user_id,
            "archetype": self.archetype,
            "is_minority": self.is_minority,
            "temperature": self.temperature,
            "weights": dict(zip(ATTRIBUTE_NAMES, self.weights.tolist())),
            "targets": dict(zip(ATTRIBUTE_NAMES, self.targets.tolist())),
            "stated_preference": self.stated_preference,
            "stated_attributes": list(self.stated_attributes),
        }

    def utility_of_attributes(self, attributes: np.ndarray) -> np.ndarray:
        """Utilities in ``[0, 1]`` for attribute rows of shape ``(n, k)`` (or one ``(k,)``)."""
        gaps = np.abs(np.asarray(attributes, dtype=np.float64) - self.targets)
        return 1.0 - gaps @ self.weights / self.weights.sum()

    def utilities(self, replies: Sequence[str]) -> np.ndarray:
        """Utilities of many replies, shape ``(len(replies),)``."""
        return self.utility_of_attributes(attribute_matrix(replies))

    def utility(self, reply: str) -> float:
        """Utility of one reply in ``[0, 1]``."""
        return float(self.utilities([reply])[0])

    def preference_probability(self, a: str, b: str) -> float:
        """Bradley–Terry probability that this user picks ``a`` over ``b``."""
        ua, ub = self.utilities([a, b])
        return _sigmoid((ua - ub) / self.temperature)

    def prefers(self, a: str, b: str, rng: np.random.Generator) -> bool:
        """One noisy pairwise choice: True when the user picks ``a`` over ``b``."""
        return bool(rng.random() < self.preference_probability(a, b))

    def rate(self, reply: str, rng: np.random.Generator) -> int:
        """One noisy 1–5 rating: utility plus logistic noise, cut into five equal bins."""
        return _rating(self.utility(reply), self.temperature, rng)


def _sigmoid(x: float) -> float:
    """Numerically safe logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _rating(utility: float, temperature: float, rng: np.random.Generator) -> int:
    """Bin ``utility + Logistic(0, temperature)`` into 1..5."""
    latent = utility + rng.logistic(0.0, temperature)
    return int(np.clip(np.floor(latent * 5.0), 0, 4)) + 1


def _profile(archetype: Archetype) -> tuple[np.ndarray, np.ndarray]:
    """An archetype's weights and targets as dense vectors (zero weight where silent)."""
    w = np.zeros(len(ATTRIBUTE_NAMES))
    t = np.full(len(ATTRIBUTE_NAMES), 0.5)
    for name, value in archetype.weights.items():
        w[_INDEX[name]] = value
    for name, value in archetype.targets.items():
        t[_INDEX[name]] = value
    return w, t


def _stated_text(
    archetype: Archetype, rng: np.random.Generator, stated_fraction: float
) -> tuple[str | None, tuple[str, ...]]:
    """A partial statement: each preference (individual first, then shared) is said with
    probability ``stated_fraction``; nothing said gives ``None``."""
    said: dict[str, str] = {}
    for source in (archetype, SHARED_COMPONENT):
        for name in sorted(source.statements, key=lambda n: -source.weights.get(n, 0.0)):
            if rng.random() < stated_fraction and name not in said:
                said[name] = source.statements[name]
    if not said:
        return None, ()
    return " ".join(said.values()), tuple(said)


def make_user(
    user_id: str,
    archetype: str,
    rng: np.random.Generator,
    *,
    shared_weight: float = 0.3,
    jitter: float = 0.05,
    temperature: float = 0.05,
    stated_fraction: float = 0.5,
    is_minority: bool = False,
) -> SimulatedUser:
    """One user: ``shared_weight`` of the shared component plus the rest from ``archetype``,
    with per-user jitter on targets (absolute) and weights (log-normal)."""
    if not 0.0 <= shared_weight <= 1.0:
        raise ValueError("shared_weight must be in [0, 1]")
    profile = ARCHETYPES[archetype]
    w_shared, t_shared = _profile(SHARED_COMPONENT)
    w_own, t_own = _profile(profile)
    w_shared = w_shared / w_shared.sum()
    w_own = w_own / w_own.sum()
    weights = shared_weight * w_shared + (1.0 - shared_weight) * w_own
    # Where the archetype cares about an attribute its target wins; elsewhere the shared one.
    targets = np.where(w_own > 0, t_own, t_shared)
    weights = weights * rng.lognormal(0.0, jitter * 2, size=weights.shape)
    targets = np.clip(targets + rng.normal(0.0, jitter, size=targets.shape), 0.0, 1.0)
    stated, stated_names = _stated_text(profile, rng, stated_fraction)
    return SimulatedUser(
        user_id=user_id,
        archetype=archetype,
        weights=weights,
        targets=targets,
        temperature=temperature,
        stated_preference=stated,
        is_minority=is_minority,
        stated_attributes=stated_names,
    )


def make_population(
    n_users: int,
    seed: int,
    *,
    minority_fraction: float = 0.2,
    shared_weight: float = 0.3,
    jitter: float = 0.05,
    temperature: float = 0.05,
    stated_fraction: float = 0.5,
    majority_archetypes: Sequence[str] = MAJORITY_ARCHETYPES,
    minority_archetype: str = MINORITY_ARCHETYPE,
) -> list[SimulatedUser]:
    """``n_users`` users, deterministic from ``seed``.

    ``round(minority_fraction * n_users)`` users (at least one when the fraction is positive
    and there are two or more users) get the minority archetype; the rest cycle through the
    majority archetypes so opposed pairs are balanced. Users are shuffled so ids carry no
    group information.
    """
    if n_users < 1:
        raise ValueError("n_users must be at least 1")
    if not 0.0 <= minority_fraction < 1.0:
        raise ValueError("minority_fraction must be in [0, 1)")
    unknown = {*majority_archetypes, minority_archetype} - ARCHETYPES.keys()
    if unknown:
        raise ValueError(f"unknown archetypes: {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    n_minority = round(minority_fraction * n_users)
    if minority_fraction > 0 and n_users >= 2:
        n_minority = max(1, n_minority)
    n_minority = min(n_minority, n_users - 1)
    groups = [majority_archetypes[i % len(majority_archetypes)] for i in range(n_users - n_minority)]
    groups += [minority_archetype] * n_minority
    minority_flags = [False] * (n_users - n_minority) + [True] * n_minority
    order = rng.permutation(n_users)
    return [
        make_user(
            f"user-{i:03d}",
            groups[j],
            rng,
            shared_weight=shared_weight,
            jitter=jitter,
            temperature=temperature,
            stated_fraction=stated_fraction,
            is_minority=minority_flags[j],
        )
        for i, j in enumerate(order)
    ]


def choose_favourite(
    user: SimulatedUser,
    prompt: str,
    candidates: Sequence[str],
    rng: np.random.Generator,
    *,
    max_pairs: int | None = None,
) -> LabelledCandidates:
    """The user sees all candidates and picks a favourite, as in a "which reply is best?" UI.

    The pick follows Luce's choice rule, ``P(i) = softmax(u / temperature)_i``, which for
    two candidates is exactly Bradley–Terry. Pairs are the favourite against each other
    distinct candidate (a random ``max_pairs`` of them), so every pair's chosen reply is
    what this user liked best; ratings are as in :func:`label_candidates`.
    """
    utilities = np.asarray(user.utilities(candidates), dtype=float)
    logits = utilities / user.temperature
    weights = np.exp(logits - logits.max())
    favourite = int(rng.choice(len(candidates), p=weights / weights.sum()))
    others = [
        j for j, reply in enumerate(candidates) if reply != candidates[favourite] and list(candidates).index(reply) == j
    ]
    if max_pairs is not None and len(others) > max_pairs:
        keep = rng.choice(len(others), size=max_pairs, replace=False)
        others = [others[k] for k in sorted(keep)]
    return _labelled(user, prompt, candidates, utilities, [(favourite, j) for j in others], rng)


def label_candidates(
    user: SimulatedUser,
    prompt: str,
    candidates: Sequence[str],
    rng: np.random.Generator,
    *,
    max_pairs: int | None = None,
) -> LabelledCandidates:
    """Label one prompt's candidate replies the way this user would.

    Every distinct pair of candidates (or a random ``max_pairs`` of them) gets one
    Bradley–Terry choice, and every candidate one noisy rating. Identical candidates are
    never paired: they carry no preference signal.
    """
    utilities = user.utilities(candidates)
    index_pairs = [
        (i, j) for i in range(len(candidates)) for j in range(i + 1, len(candidates)) if candidates[i] != candidates[j]
    ]
    if max_pairs is not None and len(index_pairs) > max_pairs:
        keep = rng.choice(len(index_pairs), size=max_pairs, replace=False)
        index_pairs = [index_pairs[k] for k in sorted(keep)]
    choices = []
    for i, j in index_pairs:
        p_i = _sigmoid((utilities[i] - utilities[j]) / user.temperature)
        choices.append((i, j) if rng.random() < p_i else (j, i))
    return _labelled(user, prompt, candidates, utilities, choices, rng)


def _labelled(
    user: SimulatedUser,
    prompt: str,
    candidates: Sequence[str],
    utilities: Sequence[float],
    choices: Sequence[tuple[int, int]],
    rng: np.random.Generator,
) -> LabelledCandidates:
    """Pairs from (winner, loser) candidate indices, then one noisy rating per candidate."""
    prompt_tag = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    pairs = [
        PreferencePair(
            prompt=prompt,
            chosen=candidates[winner],
            rejected=candidates[loser],
            source_id=f"sim:{user.user_id}:{prompt_tag}:{winner}>{loser}",
        )
        for winner, loser in choices
    ]
    ratings = [
        CandidateRating(prompt=prompt, reply=reply, rating=_rating(u, user.temperature, rng))
        for reply, u in zip(candidates, utilities)
    ]
    return LabelledCandidates(pairs=pairs, ratings=ratings)
