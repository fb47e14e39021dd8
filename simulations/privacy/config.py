"""Settings of one privacy audit, and the presets ``quick`` (tiny model, CI) and ``default``.

Like ``fedpal simulate``'s, an audit is fully described by its config: the same config and
seed give the same ``results.json``. ``--config FILE`` (TOML or JSON) overrides any field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fedpal.common.errors import FedpalError
from fedpal.simulations.config import read_overrides

PROTECTIONS = ("off", "dp", "secagg", "dp+secagg")
"""The protection settings an audit can attack: nothing, user-level DP (client clipping and
server noise), SecAgg+ (the server sees only the sum) and both."""


@dataclass(frozen=True)
class AuditConfig:
    """Everything that shapes a privacy audit. Sizes are per user unless named otherwise."""

    preset: str = "custom"
    model: str = "tiny"
    """Base model: ``tiny`` (random, for tests), ``default`` (SmolLM2-135M-Instruct) or a folder."""
    seed: int = 0
    users: int = 4
    """Simulated users with an encrypted memory, federated in every run."""
    pairs_per_user: int = 8
    """Preference pairs in each user's memory: their chosen replies are the attacks' members."""
    heldout_per_user: int = 8
    """Pairs the same user would label on prompts never stored: the attacks' non-members."""
    shadow_users: int = 8
    """Users outside the federation whose texts train the reference adapters and give RMIA its population."""
    reference_adapters: int = 2
    """Shadow adapters for the calibrated attack (RMIA); each trains on a random half of the shadow texts."""
    rounds: int = 2
    local_steps: int = 6
    """Shared-adapter steps per round; ``local_steps * batch_size`` must cover user 0's memory, so every
    member text (and every planted secret) is trained on in every round."""
    personal_steps: int = 6
    learning_rate: float = 1e-2
    dpo_beta: float = 0.1
    batch_size: int = 2
    max_length: int = 96
    lora_rank: int = 8
    lora_alpha: float = 16.0
    ffa_lora: bool = True
    objective: str = "both"
    noise_multiplier: float = 1.0
    """Noise multiplier of the ``dp`` and ``dp+secagg`` settings."""
    clipping_norm: float = 0.05
    delta: float = 1e-5
    protections: tuple[str, ...] = PROTECTIONS
    sweep: tuple[float, ...] = (0.5, 2.0)
    """Noise multipliers of the budget-vs-utility runs (DP only, no canary clients), beside one run without DP
    and the ``dp`` setting's run."""
    canary_clients: int = 64
    """Candidate canary clients of the one-run audit; each joins a run with probability 1/2."""
    canary_norm: float = 0.0
    """Norm of a canary client's update in runs without DP (0: the clipping norm). With DP every
    update is clipped to the clipping norm and a canary sends exactly that; without DP nothing bounds
    a client's influence, and on a small adapter (few dimensions, so random directions are far from
    orthogonal) a canary as small as a clipped update drowns in the users' unclipped ones."""
    secrets: int = 2
    """Secret Sharer canaries planted in user 0's memory."""
    secret_repeats: int = 2
    """How many times each secret is stored (as separate records)."""
    exposure_candidates: int = 255
    """Random alternative secrets each planted one is ranked against (largest measurable exposure ~8 bits)."""
    probes: int = 8
    """Public prompts the server's inversion attack probes the updated model with."""
    inversion_tokens: int = 50
    """Tokens the inversion attack names (its guess of what the client trained on)."""
    confidence: float = 0.95
    """Confidence of the audited epsilon's lower bound."""

    def check(self) -> None:
        """One clear line for the first setting that cannot work, before anything runs."""
        for name in (
            "users",
            "pairs_per_user",
            "heldout_per_user",
            "shadow_users",
            "reference_adapters",
            "rounds",
            "local_steps",
            "batch_size",
            "lora_rank",
            "exposure_candidates",
            "probes",
            "inversion_tokens",
        ):
            if getattr(self, name) < 1:
                raise FedpalError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("personal_steps", "canary_clients", "secrets", "secret_repeats", "canary_norm"):
            if getattr(self, name) < 0:
                raise FedpalError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.users < 3 and any("secagg" in p for p in self.protections):
            raise FedpalError("SecAgg+ needs at least 3 clients: raise users or drop the secagg settings")
        unknown = [p for p in self.protections if p not in PROTECTIONS]
        if unknown or not self.protections:
            raise FedpalError(f"protections must name some of {', '.join(PROTECTIONS)}, not {list(self.protections)}")
        stored = self.pairs_per_user + self.secrets * self.secret_repeats
        if self.local_steps * self.batch_size < stored:
            raise FedpalError(
                f"local_steps x batch_size ({self.local_steps * self.batch_size}) must cover user 0's "
                f"{stored} stored pairs, or some member texts would never be trained on"
            )
        for name in ("learning_rate", "dpo_beta", "clipping_norm", "noise_multiplier", "lora_alpha"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise FedpalError(f"{name} must be a positive number, not {getattr(self, name)}")
        if any(not math.isfinite(z) or z <= 0 for z in self.sweep):
            raise FedpalError(f"sweep must list positive noise multipliers, not {list(self.sweep)}")
        if not 0 < self.delta < 1 or not 0 < self.confidence < 1:
            raise FedpalError("delta and confidence must be between 0 and 1")
        if self.max_length < 16:
            raise FedpalError(f"max_length must be at least 16 tokens, not {self.max_length}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["protections"], data["sweep"] = list(self.protections), list(self.sweep)
        return data


PRESETS: dict[str, AuditConfig] = {
    # three settings, not four: SecAgg+ alone differs from DP + SecAgg+ only by the noise, which "dp" already isolates
    "quick": AuditConfig(
        preset="quick", sweep=(), canary_clients=32, canary_norm=0.5, protections=("off", "dp", "dp+secagg")
    ),
    "default": AuditConfig(
        preset="default",
        model="default",
        users=6,
        pairs_per_user=6,
        heldout_per_user=6,
        shadow_users=8,
        reference_adapters=2,
        rounds=3,
        local_steps=4,
        personal_steps=4,
        learning_rate=2e-3,
        batch_size=2,
        max_length=96,
        noise_multiplier=1.2,
        clipping_norm=0.05,
        sweep=(0.5, 4.0),
        canary_clients=128,
        secrets=1,
        secret_repeats=2,
        exposure_candidates=255,
    ),
}


def load_audit_config(preset: str = "quick", config_file: Path | str | None = None) -> AuditConfig:
    """The preset, with the fields named in ``config_file`` (TOML or JSON) replaced."""
    if preset not in PRESETS:
        raise FedpalError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    if config_file is not None:
        config = replace(config, **read_overrides(Path(config_file), config))
    config.check()
    return config
