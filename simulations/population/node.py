"""A simulated user where a real one would be: on its own client node.

When the server samples the node, the user first does what a person with fedpal does
between rounds: answers a few new prompts by picking among candidate replies, and the
choices go into their encrypted memory. Then the node trains exactly as a deployed
client does (``FedpalClient``). The training code never sees the user's attribute
weights; only the user's own choices, as stored pairs, reach it.

At the end the server asks a sample of nodes to score the global adapter: the user
labels the candidates of held-out prompts (never stored, never trained on), and the node
counts how many of those pairs the base model and the shared adapter rank the user's
way (the chosen reply likelier than the rejected one).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedpal.client.client_app import FedpalClient, node_home
from fedpal.client.memory import PASSPHRASE_ENV
from fedpal.common.errors import FedpalError
from fedpal.common.settings import FederationSettings
from fedpal.common.types import PreferencePair
from fedpal.simulations.population.settings import PopulationConfig, split_run_config

HELDOUT_EVAL = "heldout-eval"
"""Config key of the server's "score the global adapter on your held-out pairs" message."""


@lru_cache(maxsize=2)
def _population(users: int, seed: int, shared_weight: float, minority_fraction: float) -> tuple:
    from fedpal.simulations.users import make_population

    return tuple(make_population(users, seed, shared_weight=shared_weight, minority_fraction=minority_fraction))


@lru_cache(maxsize=4)
def _prompts(split: str, n: int, seed: int) -> tuple[str, ...]:
    from fedpal.simulations.prompts import sample_prompts

    return tuple(sample_prompts(split, n, seed))  # type: ignore[arg-type]


def candidates(prompt: str, styles: tuple[str, ...], seed: int) -> list[str]:
    """One template reply per style; the same for every user (a shared generator made them)."""
    from fedpal.simulations.styles import STYLES_BY_NAME, synthetic_reply

    rng = np.random.default_rng([seed, int(hashlib.sha1(prompt.encode()).hexdigest()[:8], 16)])
    return [synthetic_reply(prompt, STYLES_BY_NAME[name], rng) for name in styles]


class SimulatedNodeUser:
    """User ``index`` of a population: their choices, given their run's settings."""

    def __init__(self, sim: PopulationConfig, index: int) -> None:
        if not 0 <= index < sim.users:
            raise FedpalError(f"node partition {index} is outside the population of {sim.users} users")
        self.sim, self.index = sim, index
        self.user = _population(sim.users, sim.seed, sim.shared_weight, sim.minority_fraction)[index]

    def label(self, prompts: list[str], rng: np.random.Generator) -> list[PreferencePair]:
        from fedpal.simulations.users import choose_favourite, label_candidates

        label = choose_favourite if self.sim.labelling == "favourite" else label_candidates
        pairs: list[PreferencePair] = []
        for prompt in prompts:
            replies = candidates(prompt, self.sim.styles, self.sim.seed)
            pairs += label(self.user, prompt, replies, rng, max_pairs=self.sim.pairs_per_prompt).pairs
        return pairs

    def interact(self, home: Path, server_round: int) -> int:
        """Answer ``prompts_per_round`` prompts not answered before; returns the pairs stored now."""
        from fedpal.client.memory import PreferenceMemory

        pool = _prompts("train", self.sim.train_prompts, self.sim.seed)
        order = np.random.default_rng([self.sim.seed, self.index]).permutation(len(pool))
        with PreferenceMemory.open(home) as memory:
            seen = {record.fields["prompt"] for record in memory.records("pair")}
            fresh = [pool[i] for i in order if pool[i] not in seen][: self.sim.prompts_per_round]
            pairs = self.label(fresh, np.random.default_rng([self.sim.seed, server_round, self.index]))
            for pair in pairs:
                memory.add_pair(pair.prompt, pair.chosen, pair.rejected, tags=("simulated",))
        return len(pairs)

    def heldout_pairs(self) -> list[PreferencePair]:
        prompts = list(_prompts("heldout", self.sim.heldout_prompts, self.sim.seed))
        return self.label(prompts, np.random.default_rng([self.sim.seed, 1_000_003, self.index]))


def ranking_accuracy(model: Any, tokenizer: Any, pairs: list[PreferencePair], active: tuple[str, ...]) -> int:
    """How many ``pairs`` the model (``active`` adapters; none: the base) ranks the user's way."""
    from fedpal.simulations.privacy.likelihood import reply_logprobs

    chosen = reply_logprobs(model, tokenizer, [(p.prompt, p.chosen) for p in pairs], active)
    rejected = reply_logprobs(model, tokenizer, [(p.prompt, p.rejected) for p in pairs], active)
    return int(np.sum(chosen.logprob > rejected.logprob))


class PopulationClient(FedpalClient):
    """fedpal's client with its simulated user: interacts, then trains; scores when asked."""

    def _user(self) -> tuple[SimulatedNodeUser, Path]:
        fedpal, sim = split_run_config(dict(self.context.run_config))
        os.environ.setdefault(PASSPHRASE_ENV, f"fedpal-simulation-{sim.seed}")
        index = int(self.context.node_config["partition-id"])
        return SimulatedNodeUser(sim, index), node_home(self.context, fedpal)

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        user, home = self._user()
        user.interact(home, int(config["round"]))
        return super().fit(parameters, config)

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        if not config.get(HELDOUT_EVAL):
            return super().evaluate(parameters, config)
        from fedpal.client.client_app import install_global, node_model
        from fedpal.client.home import ClientHome
        from fedpal.common.adapters import SHARED

        user, home = self._user()
        base, peft, _ = node_model(FederationSettings.from_message(config))
        install_global(
            peft, ClientHome.at(home), parameters, FederationSettings.from_message(config)
        )  # the node keeps the final adapter
        pairs = user.heldout_pairs()
        base_right = ranking_accuracy(peft, base.tokenizer, pairs, ())
        shared_right = ranking_accuracy(peft, base.tokenizer, pairs, (SHARED,))
        return (
            0.0,
            len(pairs),
            {
                "pairs": len(pairs),
                "base_right": base_right,
                "shared_right": shared_right,
                "user": user.index,
                "minority": int(user.user.is_minority),
            },
        )
