"""Settings of a population study run: many simulated users, one Flower app, one ``flwr run``.

``PopulationConfig`` holds one run; from it come the app's whole Flower run config
(fedpal's federation settings plus this config's own fields, prefixed ``sim-``) and
the Simulation Engine's settings (number of virtual SuperNodes, each node's CPUs/GPUs).
The named presets go from a quick check to 1000 users on a 2-core machine; the tiny
model keeps a client's round under a second there, which is what makes a population of
that size fit at all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedpal.common.errors import FedpalError
from fedpal.common.settings import FederationSettings
from fedpal.simulations.config import SIM_PREFIX, federation_checks, from_run_config, to_run_config
from fedpal.simulations.styles import STYLES_BY_NAME


def _help(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True)
class PopulationConfig:
    """One population run. Every field has a help line; ``__post_init__`` checks them all."""

    preset: str = field(default="custom", metadata=_help("Name of the preset this run came from."))
    model: str = field(default="tiny", metadata=_help("Base model: tiny (random, for scale), default, or a folder."))
    users: int = field(default=100, metadata=_help("Simulated users, one virtual SuperNode each."))
    clients_per_round: int = field(default=10, metadata=_help("Users the server samples per round."))
    rounds: int = field(default=3, metadata=_help("Federated rounds."))
    seed: int = field(default=0, metadata=_help("Seed of the users, their choices, the sampling and the DP noise."))
    train_prompts: int = field(default=120, metadata=_help("Pool of training prompts the users answer from."))
    prompts_per_round: int = field(default=2, metadata=_help("New prompts a user labels each time it is sampled."))
    pairs_per_prompt: int = field(default=2, metadata=_help("Preference pairs a user stores per labelled prompt."))
    heldout_prompts: int = field(
        default=8, metadata=_help("Held-out prompts each evaluated user labels (never trained on).")
    )
    eval_users: int = field(default=100, metadata=_help("Users scored at the end (capped at users)."))
    styles: tuple[str, ...] = field(
        default=("plain", "one_sentence", "bulleted", "warm_question", "detailed_example"),
        metadata=_help("Reply styles of the template candidates."),
    )
    labelling: str = field(
        default="favourite", metadata=_help("favourite (best candidate vs others) or pairs (random pairs).")
    )
    shared_weight: float = field(default=0.3, metadata=_help("Weight of the preference every user shares."))
    minority_fraction: float = field(default=0.2, metadata=_help("Share of users of the minority archetype."))
    lora_rank: int = field(default=8, metadata=_help("Rank of the shared LoRA adapter."))
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata=_help("Modules the adapter wraps."))
    lora_top_layers: int = field(
        default=0, metadata=_help("LoRA only in the last N layers (0 = all): fewer noised numbers.")
    )
    local_steps: int = field(default=4, metadata=_help("Local steps on the shared adapter per round."))
    learning_rate: float = field(default=2e-3, metadata=_help("Local learning rate."))
    dpo_beta: float = field(default=0.1, metadata=_help("DPO beta."))
    batch_size: int = field(default=4, metadata=_help("Local batch size."))
    max_length: int = field(default=128, metadata=_help("Tokens per encoded pair."))
    strategy: str = field(default="fedavg", metadata=_help("Flower strategy."))
    dp: bool = field(default=True, metadata=_help("User-level DP (client clipping, server noise)."))
    noise_multiplier: float = field(
        default=1.0, metadata=_help("Noise std / clipping norm (ignored if target_epsilon is set).")
    )
    target_epsilon: float = field(
        default=0.0, metadata=_help("If > 0, the noise multiplier that spends this epsilon in `rounds`.")
    )
    clipping_norm: float = field(default=0.5, metadata=_help("Clipping norm C of a user's update."))
    delta: float = field(default=1e-5, metadata=_help("DP delta (keep below 1 / users)."))
    secagg: bool = field(default=True, metadata=_help("SecAgg+ masking of the updates."))
    secagg_shares: float = field(
        default=1.0,
        metadata=_help(
            "SecAgg+ neighbours: a fraction of the round's clients in (0, 1], or a whole number >= 3 (constant "
            "cost per client at scale)."
        ),
    )
    node_cpus: int = field(
        default=1, metadata=_help("CPUs Flower reserves per client node (Ray runs cores / node_cpus at once).")
    )
    node_gpus: float = field(
        default=0.0, metadata=_help("GPUs Flower reserves per client node (e.g. 0.25: four clients share one).")
    )

    def __post_init__(self) -> None:
        positive = (
            "users",
            "clients_per_round",
            "rounds",
            "train_prompts",
            "prompts_per_round",
            "pairs_per_prompt",
            "heldout_prompts",
            "eval_users",
            "lora_rank",
            "batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise FedpalError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.clients_per_round > self.users:
            raise FedpalError(f"clients_per_round ({self.clients_per_round}) cannot exceed users ({self.users})")
        if self.secagg and self.clients_per_round < 3:
            raise FedpalError(
                "SecAgg+ needs at least 3 clients per round: raise clients_per_round or set secagg = false"
            )
        if self.dp and self.target_epsilon <= 0 and not self.noise_multiplier > 0:
            raise FedpalError("with dp on, set a positive noise_multiplier or target_epsilon")
        if self.prompts_per_round > self.train_prompts:
            raise FedpalError("prompts_per_round cannot exceed train_prompts")
        if len(self.styles) < 2 or any(s not in STYLES_BY_NAME for s in self.styles):
            raise FedpalError(f"styles must name at least two of: {', '.join(STYLES_BY_NAME)}")
        if self.labelling not in ("favourite", "pairs"):
            raise FedpalError(f"labelling must be 'favourite' or 'pairs', not '{self.labelling}'")
        for name in ("shared_weight", "minority_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise FedpalError(f"{name} must be between 0 and 1, not {getattr(self, name)}")
        if self.node_cpus < 1:
            raise FedpalError(f"node_cpus must be a whole number of CPUs, at least 1, not {self.node_cpus}")
        if self.node_gpus < 0:
            raise FedpalError("node_gpus must not be negative")
        federation_checks(lambda: self._federation(1.0, Path(), Path()))

    # -- what the run is made of -------------------------------------------------------

    def noise(self) -> float:
        """The noise multiplier: as set, or the smallest that keeps epsilon at ``target_epsilon``."""
        if not self.dp:
            return 0.0
        if self.target_epsilon <= 0:
            return self.noise_multiplier
        from fedpal.common.privacy import PrivacyBudget, noise_for_epsilon

        budget = PrivacyBudget(
            noise_multiplier=1.0,
            clipping_norm=self.clipping_norm,
            target_delta=self.delta,
            population_size=self.users,
            sample_size=self.clients_per_round,
        )
        return noise_for_epsilon(budget, self.target_epsilon, self.rounds)

    def federation(self, run_dir: Path, home_base: Path) -> FederationSettings:
        """fedpal's federation settings for this run (their checks are fedpal's own)."""
        return self._federation(self.noise() if self.dp else FederationSettings().noise_multiplier, run_dir, home_base)

    def _federation(self, noise: float, run_dir: Path, home_base: Path) -> FederationSettings:
        return replace(
            FederationSettings(),
            model=self.model,
            num_server_rounds=self.rounds,
            strategy=self.strategy,
            fraction_train=self.clients_per_round / self.users,
            min_clients=self.clients_per_round,
            population_size=self.users,
            seed=self.seed,
            deterministic=True,
            lora_rank=self.lora_rank,
            lora_alpha=2.0 * self.lora_rank,
            lora_targets=self.lora_targets,
            lora_top_layers=self.lora_top_layers,
            objective="both",
            local_steps=self.local_steps,
            personal_steps=0,
            personal_guard=False,
            learning_rate=self.learning_rate,
            dpo_beta=self.dpo_beta,
            batch_size=self.batch_size,
            max_length=self.max_length,
            dp=self.dp,
            noise_multiplier=noise,
            clipping_norm=self.clipping_norm,
            delta=self.delta,
            secagg=self.secagg,
            secagg_shares=self.secagg_shares,
            final_adapter=False,
            run_dir=str(run_dir),
            home_base=str(home_base),
        )

    def run_config(self, run_dir: Path, home_base: Path) -> dict[str, Any]:
        """The Flower run config of the whole app: fedpal's settings and this config's fields as ``sim-`` keys."""
        return {**self.federation(run_dir, home_base).run_config(), **to_run_config(self, SIM_PREFIX)}

    def federation_config(self) -> dict[str, Any]:
        """The Simulation Engine's settings for ``flwr run --federation-config``."""
        from fedpal.simulations.engine import engine_config

        return engine_config(self.users, self.node_cpus, self.node_gpus)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["styles"] = list(self.styles)
        return data


def split_run_config(run_config: dict[str, Any]) -> tuple[FederationSettings, PopulationConfig]:
    """fedpal's federation settings and the population's settings of one run config."""
    fedpal = FederationSettings.from_run_config({k: v for k, v in run_config.items() if not k.startswith(SIM_PREFIX)})
    return fedpal, from_run_config(PopulationConfig, run_config, SIM_PREFIX)


_TINY_SCALE = dict(model="tiny", lora_rank=4, lora_top_layers=0, local_steps=4, secagg_shares=7.0)

PRESETS: dict[str, PopulationConfig] = {
    "quick": PopulationConfig(
        preset="quick",
        users=12,
        clients_per_round=6,
        rounds=2,
        eval_users=12,
        noise_multiplier=0.5,
        clipping_norm=0.5,
        **{**_TINY_SCALE, "secagg_shares": 1.0},
    ),
    "p100": PopulationConfig(preset="p100", users=100, clients_per_round=10, **_TINY_SCALE),
    "p300": PopulationConfig(preset="p300", users=300, clients_per_round=30, **_TINY_SCALE),
    "p1000": PopulationConfig(preset="p1000", users=1000, clients_per_round=100, **_TINY_SCALE),
}


def load_population_config(preset: str, settings: dict[str, str] | None = None) -> PopulationConfig:
    """A preset with some fields replaced from ``name -> text`` pairs (``--set name=value``),
    each read as the field's type; one clear line for an unknown name or a bad value."""
    if preset not in PRESETS:
        raise FedpalError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    types = {f.name: str(f.type) for f in fields(PopulationConfig)}
    changes: dict[str, Any] = {}
    for name, text in (settings or {}).items():
        if name not in types:
            raise FedpalError(f"unknown setting '{name}'; known settings: {', '.join(sorted(types))}")
        changes[name] = _parse(name, types[name], text)
    return replace(PRESETS[preset], **changes)


def _parse(name: str, kind: str, text: str) -> Any:
    words = {"true": True, "false": False}
    try:
        if kind == "bool":
            return words[text.strip().lower()]
        if kind == "int":
            return int(text)
        if kind == "float":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except (KeyError, ValueError):
        raise FedpalError(
            f"{name} must be "
            f"{'true or false' if kind == 'bool' else 'an integer' if kind == 'int' else 'a number'}, not {text!r}"
        ) from None
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text
