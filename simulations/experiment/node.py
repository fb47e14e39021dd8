"""A simulated user's device in ``fedpal simulate``: their memories, their local-only baseline,
their replies. It runs on the user's own client node (``ExperimentClient``).

The node keeps two homes for its user: the federated one (``<out>/users/<i>``, the one
``FedpalClient`` trains in each round) and the local-only baseline's (``<out>/local/<i>``,
never federated). Between rounds the server sends every node one message
(:data:`BETWEEN_ROUNDS`), which the node answers as a person with fedpal would spend the
time until the next round:

- before round 1: the user joins (fresh memories holding their stated preference, if
  they state one);
- after round ``r``: the node keeps the new global adapter, trains the local-only
  baseline (from ``personal_from_round`` on) and, when asked, answers held-out prompts
  with every method it serves (learning curves, and the final evaluation);
- before round ``r + 1``: the user labels the candidate replies of the next prompts (sent
  by the server) into pairs and a rating, stored in both homes.

Replies go back as text; the server, which knows the simulated users, scores them. The
training code only ever sees the stored pairs, never the user's utility.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedpal.client.client_app import FedpalClient, install_global, node_home, node_model, training_seed
from fedpal.client.home import ClientHome
from fedpal.client.memory import PASSPHRASE_ENV
from fedpal.common.settings import FederationSettings
from fedpal.simulations.config import SimulationConfig

BETWEEN_ROUNDS = "between-rounds"
"""Config key (the round just finished; 0 before the first) of the server's between-rounds message."""
METHODS_PER_USER = ("retrieval", "local", "fedpal", "fedpal_merge")
"""Methods whose replies depend on the user; ``base`` and ``shared`` are the same for all."""


@lru_cache(maxsize=2)
def population(config: SimulationConfig) -> tuple:
    from fedpal.simulations.users import make_population

    return tuple(
        make_population(
            config.users,
            config.seed,
            minority_fraction=config.minority_fraction,
            shared_weight=config.population_shared_weight,
            stated_fraction=config.stated_fraction,
        )
    )


@lru_cache(maxsize=2)
def heldout_prompts(config: SimulationConfig) -> tuple[str, ...]:
    from fedpal.simulations.prompts import sample_prompts

    return tuple(sample_prompts("heldout", config.heldout_prompts, config.seed))


def simulation_export(config: SimulationConfig) -> Any:
    """The ONNX export a simulation's users answer with (built by the launcher before the run;
    the nodes find it in the cache). Checked once per process and config."""
    return _simulation_export(config)


@lru_cache(maxsize=2)
def _simulation_export(config: SimulationConfig) -> Any:
    from fedpal.client.onnx_export import DEFAULT_MAX_RANK, export_model
    from fedpal.common.adapters import AdapterConfig

    targets = AdapterConfig.from_settings(config.federation(Path("."))).target_modules  # the run's folder plays no part
    return export_model(config.model, config.precision, targets, max_rank=max(DEFAULT_MAX_RANK, 2 * config.lora_rank))


def simulation_passphrase(config: SimulationConfig) -> str:
    """The passphrase of the simulated users' memories (public: these users are not people)."""
    return f"fedpal-simulation-{config.seed}"


def local_only_steps(config: SimulationConfig, round_index: int) -> int:
    """The local-only baseline's steps in ``round_index``: what a federated client has trained
    since the baseline last trained (all rounds so far, the first time)."""
    rounds = round_index if round_index == config.personal_from_round else 1
    return rounds * config.local_steps + config.personal_steps


_GENERATORS: dict[str, Any] = {}


class UserDevice:
    """User ``index``'s two homes, and what the user and the node do with them between rounds."""

    def __init__(self, config: SimulationConfig, out: Path, index: int, federated_home: Path) -> None:
        self.config, self.index = config, index
        self.user = population(config)[index]
        self.home = ClientHome.at(federated_home)
        self.local_home = ClientHome.at(Path(out) / "local" / str(index))

    def join(self) -> None:
        """Fresh memories holding the user's stated preference, and the export they answer with."""
        from fedpal.client.memory import PreferenceMemory

        export = simulation_export(self.config)
        for home in (self.home, self.local_home):
            with PreferenceMemory.open(home.root) as memory:
                memory.forget(everything=True)
            with PreferenceMemory.open(home.root) as memory:
                if self.user.stated_preference:
                    memory.add_stated(self.user.stated_preference, tags=("simulated",))
            # as `fedpal export --home` records it for a user
            home.record_export(
                self.config.model, self.config.precision, export.max_rank, export.execution_provider, export.key
            )

    def interact(self, round_index: int, candidates: dict[str, list[str]]) -> int:
        """Label the candidates of this round's prompts into both memories; returns the pairs stored in all."""
        from fedpal.client.memory import PreferenceMemory
        from fedpal.simulations.users import choose_favourite, label_candidates

        label = choose_favourite if self.config.labelling == "favourite" else label_candidates
        rng = np.random.default_rng([self.config.seed, round_index, self.index])
        labelled = [
            (prompt, label(self.user, prompt, replies, rng, max_pairs=self.config.pairs_per_prompt))
            for prompt, replies in candidates.items()
        ]
        pairs = 0
        for home in (self.home, self.local_home):
            with PreferenceMemory.open(home.root) as memory:
                for prompt, labels in labelled:
                    for pair in labels.pairs:
                        memory.add_pair(pair.prompt, pair.chosen, pair.rejected, tags=("simulated",))
                    seen = labels.ratings[0]
                    memory.add_rating(prompt, seen.reply, seen.rating, tags=("simulated",))
                pairs = len(memory.records("pair"))
        return pairs

    def train_local(self, round_index: int, settings: FederationSettings) -> None:
        """The local-only baseline: a personal adapter, no federation, the same step budget, through
        the same flow as a federated client's personal adapter (held-out check, guard)."""
        from fedpal.client.memory import PreferenceMemory
        from fedpal.client.personalize import Personalizer, TrainingData
        from fedpal.client.trainer import TrainConfig
        from fedpal.common.adapters import PERSONAL, arrays_to_adapter, load_adapter

        c = self.config
        base, peft, fresh_personal = node_model(settings)
        with PreferenceMemory.open(self.local_home.root) as memory:
            data = TrainingData.from_memory(memory)
        if (self.local_home.adapter_dir(PERSONAL) / "adapter_config.json").is_file():
            load_adapter(peft, PERSONAL, self.local_home.adapter_dir(PERSONAL))
        else:
            arrays_to_adapter(peft, PERSONAL, fresh_personal, "AB")
        train = TrainConfig.for_federation(settings)  # as the federated clients train
        Personalizer(base, peft, self.local_home, train, checkpoints=False).train(
            PERSONAL,
            data,
            seed=training_seed(c.seed, round_index, self.index),  # what the federated client's shared run uses
            steps=local_only_steps(c, round_index),
            progress=False,
        )

    def generator(self) -> Any:
        """One ONNX Runtime generator per process and export (a node's process serves many users)."""
        from fedpal.client.generator import PersonalizedGenerator

        export = simulation_export(self.config)
        if export.key not in _GENERATORS:
            _GENERATORS.clear()
            _GENERATORS[export.key] = PersonalizedGenerator(export, threads=self.config.node_cpus)
        return _GENERATORS[export.key]

    def replies(self, prompts: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
        """Greedy replies per method, each through ``generate_for`` (what ``fedpal generate`` runs)."""
        from fedpal.client.generator import DecodeOptions

        c = self.config
        calls = {
            "base": (self.home, dict(mode="base")),
            "shared": (self.home, dict(mode="merge", w_shared=1.0, w_personal=0.0)),
            "retrieval": (self.home, dict(mode="base", retrieval=True)),
            "local": (self.local_home, dict(mode="merge", w_shared=0.0, w_personal=1.0)),
            "fedpal": (
                self.home,
                dict(mode=c.fedpal_mode, retrieval=True, w_shared=c.w_shared, w_personal=c.w_personal),
            ),
            "fedpal_merge": (
                self.home,
                dict(mode="merge", retrieval=True, w_shared=c.w_shared, w_personal=c.w_personal),
            ),
        }
        generator = self.generator()
        options = DecodeOptions(max_new_tokens=c.reply_tokens)
        out: dict[str, list[str]] = {}
        for method in methods:
            home, how = calls[method]
            out[method] = [
                generator.generate_for(home, prompt, options=options, retrieval_in=c.retrieval_in, **how).text
                for prompt in prompts
            ]
        return out


class ExperimentClient(FedpalClient):
    """fedpal's client on a simulated user's node: trains as any client; between rounds, the
    user's device does what :class:`UserDevice` describes."""

    def settings(self) -> tuple[SimulationConfig, Path]:
        """This run's simulation settings; the users' memories open with the simulation's passphrase."""
        settings, out = SimulationConfig.from_run_config(dict(self.context.run_config))
        os.environ.setdefault(PASSPHRASE_ENV, simulation_passphrase(settings))
        return settings, out

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        self.settings()
        return super().fit(parameters, config)

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        if BETWEEN_ROUNDS not in config:
            return super().evaluate(parameters, config)
        settings, out = self.settings()
        index = int(self.context.node_config["partition-id"])
        federation = FederationSettings.from_message(config)
        device = UserDevice(settings, out, index, node_home(self.context, federation))
        finished = int(config[BETWEEN_ROUNDS])
        if finished == 0:
            device.join()
        else:
            _, peft, _ = node_model(federation)
            install_global(peft, device.home, parameters, federation)
            if finished >= settings.personal_from_round:
                device.train_local(finished, federation)
        answer: dict[str, Any] = {"user": index}
        methods = json.loads(str(config.get("methods", "[]")))
        if methods:
            prompts = heldout_prompts(settings)[: int(config["prompts"])]
            shared_methods = [m for m in methods if m not in METHODS_PER_USER]
            asked = [m for m in methods if m in METHODS_PER_USER] + (shared_methods if index == 0 else [])
            answer["replies"] = json.dumps(device.replies(prompts, asked))
        if config.get("candidates"):
            answer["pairs"] = device.interact(finished + 1, json.loads(str(config["candidates"])))
        return 0.0, 1, answer
