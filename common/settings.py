"""fedpal's federation settings: one typed class, from which every place that needs them derives.

``FederationSettings`` is the Flower run config of a federation (``[tool.flwr.app.config]``
in pyproject, ``--run-config``, ``fedpal server start --set``): one field per setting with
its default and a help line, every check in ``__post_init__``. From it come the run config
(:meth:`run_config`, kebab-case keys as Flower takes them), the message config each client
trains with (:meth:`train_config`), and, on the client, the same class read back from
that message (:meth:`from_message`), so a client never casts a key by hand. The
simulations' presets build one too (``fedpal.simulations.config``), so their checks are
these checks.

Field ``lora_rank`` is run-config key ``lora-rank``: the key is always the field name with
dashes, so nothing maps one to the other by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedpal.common.errors import FedpalError
from fedpal.common.generation import PLACEMENTS
from fedpal.common.strategies import STRATEGIES

RESUME_LOCKED = (
    "model",
    "strategy",
    "lora-rank",
    "lora-alpha",
    "lora-targets",
    "lora-top-layers",
    "ffa-lora",
    "dp",
    "noise-multiplier",
    "clipping-norm",
    "delta",
    "sampling",
    "seed",
    "deterministic",
)
"""Settings a resumed run must share with the run it continues: changing any of them mid-run
would make the checkpoint's adapter or privacy ledger mean something else."""

TRAIN_KEYS = (
    "model",
    "seed",
    "deterministic",
    "lora-rank",
    "lora-alpha",
    "lora-targets",
    "lora-top-layers",
    "ffa-lora",
    "objective",
    "local-steps",
    "learning-rate",
    "dpo-beta",
    "batch-size",
    "max-length",
    "train-with-preferences",
    "preferences-in",
    "personal-guard",
    "client-threads",
    "home-base",
)
"""The settings a client trains with, sent in every train message (see :meth:`FederationSettings.train_config`)."""


KINDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string"}


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def key_of(name: str) -> str:
    """Run-config key of field ``name``."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class FederationSettings:
    """One federation's settings (the Flower run config), typed, with a help line each."""

    model: str = setting(
        "tiny",
        "Base model: tiny (random, for tests), default (the embedded SmolLM2-135M-Instruct), "
        "a model folder or a hub id already in the local cache.",
    )
    num_server_rounds: int = setting(3, "Federated rounds.")
    strategy: str = setting(
        "fedavg",
        "Flower strategy: fedavg, fedprox, fedadam, fedyogi, fedavgm, or one "
        "registered with fedpal.common.strategies.flower_strategy.",
    )
    fraction_train: float = setting(1.0, "Fraction of the connected clients sampled per round, in (0, 1].")
    min_clients: int = setting(3, "Clients a round waits for (and samples at least).")
    population_size: int = setting(0, "Users the accountant counts (0: the clients connected at the start).")
    seed: int = setting(0, "Seed of the adapters' initialisation, the sampling and the clients' training.")
    deterministic: bool = setting(False, "DP noise from the public seed: replayable runs, for simulations only.")
    lora_rank: int = setting(8, "LoRA rank of both adapters.")
    lora_alpha: float = setting(16.0, "LoRA alpha (scale alpha / rank).")
    lora_targets: str = setting("q_proj,k_proj,v_proj,o_proj", "Comma-separated modules the adapters wrap.")
    lora_top_layers: int = setting(0, "LoRA only in the last N decoder layers (0 = all): cheaper steps, less DP noise.")
    ffa_lora: bool = setting(True, "FFA-LoRA: A frozen at its seeded init, only B trained and sent.")
    fp16_updates: bool = setting(False, "Send updates in fp16 (without SecAgg+ only).")
    objective: str = setting("both", "Local objective: dpo, sft or both.")
    local_steps: int = setting(10, "Local steps on the shared adapter per round.")
    personal_steps: int = setting(10, "Steps on the personal adapter per round (0: no personal training).")
    personal_from_round: int = setting(
        1, "First round in which personal adapters train; before it the clients send shared updates only."
    )
    learning_rate: float = setting(5e-4, "Local learning rate.")
    dpo_beta: float = setting(0.1, "DPO beta: how strongly the policy is held to the reference model.")
    batch_size: int = setting(4, "Local batch size.")
    max_length: int = setting(128, "Tokens per encoded example.")
    train_with_preferences: bool = setting(
        False,
        "Train the personal adapter with the user's stated preferences in "
        "context (prompt or system), as `fedpal generate --retrieval` answers.",
    )
    preferences_in: str = setting("prompt", "Where stated preferences go: " + " or ".join(PLACEMENTS) + ".")
    personal_guard: bool = setting(
        True,
        "A trained personal adapter replaces the saved one only if it ranks held-out "
        "pairs better and its replies do not degenerate.",
    )
    proximal_mu: float = setting(0.01, "FedProx's proximal term (fedprox only).")
    server_learning_rate: float = setting(0.01, "Server optimizer's learning rate (fedadam, fedyogi).")
    server_momentum: float = setting(0.9, "Server momentum (fedavgm).")
    client_threads: int = setting(1, "CPU threads a client trains with.")
    dp: bool = setting(True, "User-level differential privacy: client clipping, server noise, accountant.")
    noise_multiplier: float = setting(1.0, "Noise std / clipping norm (z).")
    clipping_norm: float = setting(0.5, "Clipping norm C of one user's update.")
    delta: float = setting(1e-5, "DP delta (keep below 1 / users).")
    max_epsilon: float = setting(0.0, "Stop before a round that would spend more (0: no limit).")
    sampling: str = setting(
        "without-replacement", "How the accountant models client sampling: without-replacement, poisson or none."
    )
    max_update_norm: float = setting(100.0, "Without DP, updates larger than this are rejected.")
    secagg: bool = setting(True, "SecAgg+: the server learns only the sum of the updates.")
    secagg_shares: float = setting(
        1.0,
        "SecAgg+ neighbours per client: a fraction of the round's clients (1.0: all) or "
        "a whole number >= 3 (constant cost per client).",
    )
    secagg_threshold: float = setting(0.8, "Fraction of shares needed to reconstruct a dropped client's mask.")
    secagg_clipping_range: float = setting(8.0, "SecAgg+ quantization range (must cover the clipping norm).")
    secagg_timeout: float = setting(600.0, "Seconds a SecAgg+ stage waits for clients (0: Flower's default).")
    final_adapter: bool = setting(True, "Send the final global adapter to every node after the last round.")
    run_dir: str = setting("", "Folder for checkpoints, metrics and the global adapter (empty: under the fedpal home).")
    resume: bool = setting(False, "Continue from the run folder's checkpoint.")
    home_base: str = setting("", "Simulations: folder holding each node's home, by partition id.")

    def __post_init__(self) -> None:
        for f in fields(self):  # a message config is untyped: its values must already be what the field says
            value = getattr(self, f.name)
            if (
                f.type == "bool"
                and not isinstance(value, bool)
                or f.type == "str"
                and not isinstance(value, str)
                or (f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))))
            ):
                raise FedpalError(f"run-config {key_of(f.name)} = {value!r} must be {KINDS[f.type]}")
            if f.type == "float" and not math.isfinite(value):
                raise FedpalError(f"run-config {key_of(f.name)} = {value!r} must be a finite number")
        if self.strategy not in STRATEGIES:
            raise FedpalError(f"strategy must be one of {', '.join(STRATEGIES)}, not '{self.strategy}'")
        if self.num_server_rounds < 1:
            raise FedpalError("num-server-rounds must be at least 1")
        if not 0 < self.fraction_train <= 1:
            raise FedpalError(f"fraction-train must be in (0, 1], not {self.fraction_train}")
        if self.min_clients < 1:
            raise FedpalError("min-clients must be at least 1")
        if self.secagg and self.min_clients < 3:
            raise FedpalError("SecAgg+ needs at least 3 clients per round: set min-clients >= 3 or secagg = false")
        for key in ("lora-rank", "batch-size", "client-threads"):
            if self[key] < 1:
                raise FedpalError(f"{key} must be at least 1, not {self[key]}")
        if self.max_length < 8:
            raise FedpalError(f"max-length must be at least 8 tokens, not {self.max_length}")
        if self.local_steps < 0 or self.personal_steps < 0:
            raise FedpalError("local-steps and personal-steps must not be negative")
        for key in ("learning-rate", "lora-alpha", "dpo-beta"):
            if not self[key] > 0:
                raise FedpalError(f"{key} must be a positive number, not {self[key]}")
        if not 0 < self.delta < 1:
            raise FedpalError(f"delta must be between 0 and 1, not {self.delta}")
        if self.noise_multiplier < 0:
            raise FedpalError(f"noise-multiplier must not be negative, not {self.noise_multiplier}")
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise FedpalError("lora-targets must name at least one module, e.g. 'q_proj,v_proj'")
        if self.personal_from_round < 1:
            raise FedpalError(
                "personal-from-round must be at least 1 (the first round in which personal adapters train)"
            )
        if self.preferences_in not in PLACEMENTS:
            raise FedpalError(f"preferences-in must be one of {', '.join(PLACEMENTS)}, not '{self.preferences_in}'")
        if self.lora_top_layers < 0:
            raise FedpalError("lora-top-layers must be 0 (all layers) or a positive number of last layers")
        if self.dp and not (self.noise_multiplier > 0 and self.clipping_norm > 0):
            raise FedpalError("with dp on, noise-multiplier and clipping-norm must be positive")
        shares = self.secagg_shares
        if not (0 < shares <= 1 or (shares >= 3 and shares == int(shares))):
            raise FedpalError(
                f"secagg-shares must be a fraction of the round's clients in (0, 1] or a whole number "
                f"of shares, at least 3; not {shares}"
            )
        if self.secagg and self.clipping_norm > self.secagg_clipping_range:
            raise FedpalError("clipping-norm must not exceed secagg-clipping-range")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederationSettings":
        """Settings from run-config keys (a TOML/CLI value as text is read as the field's type); one
        clear line for an unknown key or a value of the wrong type."""
        names = {key_of(f.name): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(names))
        if unknown:
            raise FedpalError(f"unknown run-config key '{unknown[0]}'; known keys: {', '.join(names)}")
        return cls(**{names[key].name: _coerce(key, value, names[key].type) for key, value in run_config.items()})

    @classmethod
    def from_message(cls, config: Mapping[str, Any]) -> "FederationSettings":
        """The settings a train or evaluate message carries (its other keys, like ``round``, are not settings)."""
        names = {key_of(f.name) for f in fields(cls)}
        return cls.from_run_config({k: v for k, v in config.items() if k in names})

    def __getitem__(self, key: str) -> Any:
        """The setting of run-config key ``key`` (``settings["lora-rank"]``)."""
        return getattr(self, key.replace("-", "_"))

    def run_config(self) -> dict[str, Any]:
        """Every setting under its run-config key."""
        return {key_of(f.name): getattr(self, f.name) for f in fields(self)}

    def train_config(self, server_round: int) -> dict[str, Any]:
        """What each client needs to train this round (sent inside FitIns.config)."""
        return {
            "round": server_round,
            **{key: self[key] for key in TRAIN_KEYS},
            "fp16-updates": self.fp16_updates and not self.secagg,
            "uniform-weights": self.dp,
            "personal-steps": self.personal_steps if server_round >= self.personal_from_round else 0,
        }

    def locked(self) -> dict[str, Any]:
        return {key: self[key] for key in RESUME_LOCKED}


DEFAULTS: dict[str, Any] = FederationSettings().run_config()
"""Every run-config key and its default. pyproject's ``[tool.flwr.app.config]`` lists the same
keys (Flower only lets ``--run-config`` override keys declared there); a test keeps the two equal."""


def _coerce(key: str, value: Any, kind: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(value, str):
        return value
    raise FedpalError(f"run-config {key} = {value!r} must be {KINDS[kind]}")
