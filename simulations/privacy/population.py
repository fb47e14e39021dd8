"""The texts an audit is about: what each user stores and trains on, and what they do not.

Membership inference needs members and non-members of the *same* distribution, or it
measures a distribution shift instead of a leak. Each user labels template replies
(fedpal's simulated users, :mod:`fedpal.simulations.users`) to training prompts, which
go into their memory, and to held-out prompts, which never do; both come from the same
generator with the same user. Candidates are drawn per user, so no two users store the
same reply and "member of user 3" is a property of one text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpal.common.types import PreferencePair
from fedpal.simulations.privacy.config import AuditConfig
from fedpal.simulations.prompts import load_prompts
from fedpal.simulations.styles import STYLES_BY_NAME, synthetic_reply
from fedpal.simulations.users import SimulatedUser, choose_favourite, make_population

STYLES = ("plain", "one_sentence", "bulleted", "warm_question", "detailed_example")


@dataclass(frozen=True)
class UserTexts:
    """One user's stored pairs (``members``) and pairs of the same kind never stored (``nonmembers``)."""

    members: tuple[PreferencePair, ...]
    nonmembers: tuple[PreferencePair, ...]
    stated: str | None


@dataclass(frozen=True)
class AuditPopulation:
    """The federated users' texts, the shadow users' (for reference adapters and RMIA's
    population) and the public prompts the server probes with."""

    users: tuple[UserTexts, ...]
    shadow: tuple[PreferencePair, ...]
    probes: tuple[str, ...]

    def members(self) -> list[PreferencePair]:
        return [pair for user in self.users for pair in user.members]

    def nonmembers(self) -> list[PreferencePair]:
        return [pair for user in self.users for pair in user.nonmembers]


def _labelled(user: SimulatedUser, prompts: list[str], seed: list[int]) -> list[PreferencePair]:
    """The user's favourite of fresh candidates per prompt, against one other candidate."""
    styles = [STYLES_BY_NAME[name] for name in STYLES]
    pairs = []
    for number, prompt in enumerate(prompts):
        rng = np.random.default_rng([*seed, number])
        candidates = [synthetic_reply(prompt, style, rng) for style in styles]
        pairs.extend(choose_favourite(user, prompt, candidates, rng, max_pairs=1).pairs)
    return pairs


def audit_population(config: AuditConfig) -> AuditPopulation:
    """Deterministic from ``config.seed``: every user draws their own prompts of each split."""
    people = make_population(config.users + config.shadow_users, config.seed)
    train, heldout = load_prompts("train"), load_prompts("heldout")
    rng = np.random.default_rng([config.seed, 7])
    users = []
    for index, person in enumerate(people[: config.users]):
        stored = [train[i] for i in rng.choice(len(train), config.pairs_per_user, replace=False)]
        unseen = [heldout[i] for i in rng.choice(len(heldout), config.heldout_per_user, replace=False)]
        users.append(
            UserTexts(
                members=tuple(_labelled(person, stored, [config.seed, index, 0])),
                nonmembers=tuple(_labelled(person, unseen, [config.seed, index, 1])),
                stated=person.stated_preference,
            )
        )
    shadow = []
    for index, person in enumerate(people[config.users :], start=config.users):
        asked = [train[i] for i in rng.choice(len(train), config.pairs_per_user, replace=False)]
        asked += [heldout[i] for i in rng.choice(len(heldout), config.heldout_per_user, replace=False)]
        shadow.extend(_labelled(person, asked, [config.seed, index, 2]))
    probes = tuple(heldout[i] for i in rng.choice(len(heldout), config.probes, replace=False))
    return AuditPopulation(tuple(users), tuple(shadow), probes)
