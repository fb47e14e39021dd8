"""Settings of one simulation run, and the named presets ``quick``, ``default`` and ``large``.

A run is fully described by a ``SimulationConfig``: the same config and seed give the same
``results.json`` (up to float noise). ``--config FILE`` (TOML or JSON) overrides any field
of the chosen preset.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedpal.client.generator import DEFAULT_MODE, MODES
from fedpal.client.onnx_export import DEFAULT_PRECISION, PRECISIONS
from fedpal.client.trainer import OBJECTIVES
from fedpal.common.errors import FedpalError
from fedpal.common.generation import PLACEMENTS
from fedpal.common.settings import FederationSettings, key_of
from fedpal.simulations.styles import STYLES_BY_NAME


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that shapes a simulation. Sizes are per user unless named otherwise.

    ``candidate_source`` is ``model`` (the base model answers each training prompt in each
    style) or ``synthetic`` (template replies with those styles, for the random tiny model,
    which cannot follow a style instruction).

    ``labelling`` is how a user labels one prompt's candidates: ``pairs`` (independent
    Bradley–Terry choices between random pairs of candidates) or ``favourite`` (they pick
    the one they like best; pairs are it against the others). ``retrieval_in``: where the
    retrieval and fedpal methods put the user's stated preferences (``prompt`` or
    ``system``). ``train_in_context``: the federated clients train their personal adapter
    with them there too, as fedpal's replies are generated (the shared adapter and the
    local-only baseline train on bare prompts, as they are evaluated). ``fedpal_mode``: the
    generation mode of the fedpal method (``fedpal generate``'s default unless set).

    ``personal_from_round``: the first round in which personal adapters train (the
    federated clients' and the local-only baseline's); before it the clients only send
    shared updates. A personal run costs its held-out checks and the degeneration guard
    whatever its length, so on a small machine one run after the last round buys more
    training than a few steps every round. The local-only baseline trains as many steps
    as a client has trained in all by then (``local_steps`` per round plus
    ``personal_steps``).

    ``node_cpus`` / ``node_gpus``: what Flower's Simulation Engine reserves for each user's
    virtual SuperNode (Ray runs cores / ``node_cpus`` of them at once); ``node_cpus`` is also
    the threads a node trains and decodes with.
    """

    preset: str = "custom"
    model: str = "tiny"
    precision: str = "fp32"
    users: int = 4
    rounds: int = 2
    clients_per_round: int = 4
    seed: int = 0
    train_prompts: int = 12
    heldout_prompts: int = 6
    curve_prompts: int = 3
    styles: tuple[str, ...] = ("plain", "one_sentence", "bulleted", "warm_question", "detailed_example")
    pairs_per_prompt: int = 3
    labelling: str = "pairs"
    train_in_context: bool = True
    retrieval_in: str = "prompt"
    candidate_source: str = "synthetic"
    candidate_tokens: int = 48
    reply_tokens: int = 48
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    lora_top_layers: int = 0
    ffa_lora: bool = True
    objective: str = "both"
    local_steps: int = 4
    personal_steps: int = 4
    personal_from_round: int = 1
    learning_rate: float = 2e-3
    dpo_beta: float = 0.1
    batch_size: int = 4
    max_length: int = 128
    strategy: str = "fedavg"
    dp: bool = True
    noise_multiplier: float = 0.5
    clipping_norm: float = 1.0
    delta: float = 1e-5
    secagg: bool = True
    fedpal_mode: str = DEFAULT_MODE
    w_shared: float = 1.0
    w_personal: float = 1.0
    population_shared_weight: float = 0.3
    minority_fraction: float = 0.2
    stated_fraction: float = 0.5
    node_cpus: int = 1
    node_gpus: float = 0.0

    def check(self) -> None:
        """One clear line for the first setting that cannot work, before anything is generated or written."""
        if self.users < 2:
            raise FedpalError("a simulation needs at least 2 users (the cross-user matrix compares them)")
        if not 1 <= self.clients_per_round <= self.users:
            raise FedpalError(
                f"clients_per_round must be between 1 and users ({self.users}), not {self.clients_per_round}"
            )
        if self.secagg and self.clients_per_round < 3:
            raise FedpalError(
                "SecAgg+ needs at least 3 clients per round: raise clients_per_round or set secagg = false"
            )
        if self.rounds < 1:
            raise FedpalError("rounds must be at least 1")
        if self.train_prompts < self.rounds:
            raise FedpalError(
                f"train_prompts ({self.train_prompts}) must be at least rounds ({self.rounds}): each round adds "
                "new interactions"
            )
        if self.heldout_prompts < 1 or not 1 <= self.curve_prompts <= self.heldout_prompts:
            raise FedpalError("heldout_prompts must be at least 1 and curve_prompts between 1 and heldout_prompts")
        if len(self.styles) < 2:
            raise FedpalError("at least two styles are needed to make preference pairs")
        unknown = [style for style in self.styles if style not in STYLES_BY_NAME]
        if unknown:
            raise FedpalError(f"unknown style '{unknown[0]}'; known styles: {', '.join(STYLES_BY_NAME)}")
        if self.objective not in OBJECTIVES:
            raise FedpalError(f"objective must be one of {', '.join(OBJECTIVES)}, not '{self.objective}'")
        for name in ("pairs_per_prompt", "candidate_tokens", "reply_tokens"):
            if getattr(self, name) < 1:
                raise FedpalError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 1 <= self.personal_from_round <= self.rounds:
            raise FedpalError(
                f"personal_from_round must be between 1 and rounds ({self.rounds}), not {self.personal_from_round}"
            )
        for name in ("population_shared_weight", "minority_fraction", "stated_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise FedpalError(f"{name} must be between 0 and 1, not {getattr(self, name)}")
        for name in ("w_shared", "w_personal"):
            if not math.isfinite(getattr(self, name)):
                raise FedpalError(f"{name} must be a finite number, not {getattr(self, name)}")
        if self.candidate_source not in ("model", "synthetic"):
            raise FedpalError(
                f"candidate_source must be 'model' (the base model in each style) or 'synthetic' (templates), not "
                f"'{self.candidate_source}'"
            )
        if self.labelling not in ("favourite", "pairs"):
            raise FedpalError(
                f"labelling must be 'favourite' (best of the candidates) or 'pairs' (random pairs), not "
                f"'{self.labelling}'"
            )
        if self.retrieval_in not in PLACEMENTS:
            raise FedpalError(f"retrieval_in must be one of {', '.join(PLACEMENTS)}, not '{self.retrieval_in}'")
        if self.fedpal_mode not in MODES:
            raise FedpalError(f"fedpal_mode must be one of {', '.join(MODES)}, not '{self.fedpal_mode}'")
        if self.precision not in PRECISIONS:
            raise FedpalError(f"precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")
        if self.node_cpus < 1 or not 0 <= self.node_gpus:
            raise FedpalError(
                f"node_cpus must be at least 1 and node_gpus not negative, not {self.node_cpus} and {self.node_gpus}"
            )
        federation_checks(lambda: self.federation(Path(".")))

    # -- the Flower app's settings -----------------------------------------------------

    def federation(self, out: Path) -> FederationSettings:
        """The federation's settings for a run in ``out`` (their checks are fedpal's own)."""
        return FederationSettings(
            **{
                key.replace("-", "_"): value
                for key, value in {
                    "model": self.model,
                    "num-server-rounds": self.rounds,
                    "resume": False,
                    "final-adapter": False,  # the users' between-rounds message brings the last aggregate
                    "run-dir": str(Path(out) / "federation"),
                    "home-base": str(Path(out) / "users"),
                    "strategy": self.strategy,
                    "fraction-train": self.clients_per_round / self.users,
                    "min-clients": self.clients_per_round,
                    "population-size": self.users,
                    "seed": self.seed,
                    "deterministic": True,
                    "lora-rank": self.lora_rank,
                    "lora-alpha": self.lora_alpha,
                    "lora-targets": self.lora_targets,
                    "lora-top-layers": self.lora_top_layers,
                    "ffa-lora": self.ffa_lora,
                    "objective": self.objective,
                    "local-steps": self.local_steps,
                    "personal-steps": self.personal_steps,
                    "personal-from-round": self.personal_from_round,
                    "learning-rate": self.learning_rate,
                    "dpo-beta": self.dpo_beta,
                    "batch-size": self.batch_size,
                    "max-length": self.max_length,
                    "train-with-preferences": self.train_in_context,
                    "preferences-in": self.retrieval_in,
                    "dp": self.dp,
                    "noise-multiplier": self.noise_multiplier,
                    "clipping-norm": self.clipping_norm,
                    "delta": self.delta,
                    "secagg": self.secagg,
                    "client-threads": self.node_cpus,
                }.items()
            }
        )

    def run_config(self, out: Path) -> dict[str, Any]:
        """The app's whole Flower run config: the federation's keys, this config's fields as
        ``sim-`` keys, and ``sim-out`` (where the ServerApp writes results)."""
        return {
            **self.federation(out).run_config(),
            **to_run_config(self, SIM_PREFIX),
            SIM_PREFIX + "out": str(Path(out)),
        }

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> tuple["SimulationConfig", Path]:
        """The config and output folder a run config of :meth:`run_config` describes."""
        out = run_config.get(SIM_PREFIX + "out")
        if not out:
            raise FedpalError("this run config has no sim-out setting: it is not a fedpal simulate run")
        return from_run_config(cls, run_config, SIM_PREFIX), Path(str(out))

    def federation_config(self) -> dict[str, Any]:
        """The Simulation Engine's settings for ``flwr run --federation-config``."""
        from fedpal.simulations.engine import engine_config

        return engine_config(self.users, self.node_cpus, self.node_gpus)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["styles"] = list(self.styles)
        return data


SIM_PREFIX = "sim-"
"""Run-config keys of a simulation's own settings (fedpal's are ``fedpal.common.settings.FederationSettings``)."""


def federation_checks(build: Callable[[], FederationSettings]) -> None:
    """Run the federation's own checks (strategy, LoRA, training, DP, SecAgg+) on the settings
    ``build`` derives from a simulation's config, naming settings as that config does
    (``lora_top_layers``, not the run-config key ``lora-top-layers``)."""
    try:
        build()
    except FedpalError as err:
        message = str(err)
        for f in fields(FederationSettings):
            message = message.replace(key_of(f.name), f.name)
        raise FedpalError(message) from None


def to_run_config(settings: Any, prefix: str) -> dict[str, Any]:
    """A settings dataclass as Flower run-config keys: ``prefix`` + the field name in kebab
    case; a tuple of names becomes one comma-separated string (run configs hold scalars)."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        out[prefix + f.name.replace("_", "-")] = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return out


def from_run_config(cls: Any, run_config: dict[str, Any], prefix: str) -> Any:
    """The dataclass ``cls`` read back from the keys :func:`to_run_config` wrote (each value as
    its field's type); one clear line for a missing key."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = prefix + f.name.replace("_", "-")
        if key not in run_config:
            raise FedpalError(f"this run config has no {key} setting; it was not written by this fedpal version")
        value, kind = run_config[key], str(f.type)
        if kind.startswith("tuple"):
            value = tuple(part for part in str(value).split(",") if part)
        elif kind == "bool":
            value = value if isinstance(value, bool) else str(value).lower() == "true"
        elif kind in ("int", "float", "str"):
            value = {"int": int, "float": float, "str": str}[kind](value)
        values[f.name] = value
    return cls(**values)


PRESETS: dict[str, SimulationConfig] = {
    "quick": SimulationConfig(preset="quick"),
    "default": SimulationConfig(
        preset="default",
        model="default",
        precision=DEFAULT_PRECISION,
        candidate_source="model",
        users=8,
        rounds=3,
        clients_per_round=8,
        train_prompts=18,
        pairs_per_prompt=4,
        heldout_prompts=36,
        curve_prompts=3,
        candidate_tokens=40,
        reply_tokens=40,
        local_steps=2,
        personal_steps=4,
        personal_from_round=3,
        batch_size=2,
        learning_rate=2e-3,
        max_length=112,
        noise_multiplier=1.0,
        clipping_norm=0.05,
    ),
    "large": SimulationConfig(
        preset="large",
        model="default",
        precision=DEFAULT_PRECISION,
        candidate_source="model",
        users=32,
        rounds=10,
        clients_per_round=16,
        train_prompts=60,
        heldout_prompts=40,
        curve_prompts=10,
        candidate_tokens=96,
        reply_tokens=96,
        local_steps=10,
        personal_steps=10,
        learning_rate=5e-4,
        max_length=256,
        styles=(
            "plain",
            "one_sentence",
            "bulleted",
            "warm_question",
            "detailed_example",
            "formal",
            "casual",
            "budget_simple",
        ),
    ),
}


def load_config(preset: str = "quick", config_file: Path | str | None = None) -> SimulationConfig:
    """The preset, with the fields named in ``config_file`` (TOML or JSON) replaced."""
    if preset not in PRESETS:
        raise FedpalError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    if config_file is not None:
        config = replace(config, **read_overrides(Path(config_file), PRESETS["quick"]))
    config.check()
    return config


def read_overrides(path: Path, template: Any) -> dict[str, Any]:
    """The settings ``path`` (TOML or JSON) names, checked against the fields and types of
    the dataclass instance ``template``; one clear line for the first that is wrong."""
    if path.is_dir():
        raise FedpalError(f"config file {path} is a folder")
    if not path.is_file():
        raise FedpalError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FedpalError(
            f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}"
        ) from None
    if not isinstance(data, dict):
        raise FedpalError(f"config file {path} must hold an object of settings, not a {type(data).__name__}")
    known = {f.name: f for f in fields(template)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise FedpalError(f"config file {path}: unknown setting '{unknown[0]}'; known: {', '.join(known)}")
    overrides = {}
    for key, value in data.items():
        default = getattr(template, key)
        if isinstance(default, tuple):
            example = list(default[:2]) or list(known[key].default[:2])  # a preset may empty a list the class fills
            numbers = bool(example) and all(isinstance(item, float) for item in example)
            ok = (
                (lambda item: isinstance(item, (int, float)) and not isinstance(item, bool))
                if numbers
                else (lambda item: isinstance(item, str))
            )
            if not isinstance(value, list) or not all(ok(item) for item in value):
                kind = "numbers" if numbers else "names"
                raise FedpalError(f"config file {path}: '{key}' must be a list of {kind}, like {json.dumps(example)}")
            value = tuple(float(item) for item in value) if numbers else tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise FedpalError(
                f"config file {path}: '{key}' must be {type(default).__name__}, not {type(value).__name__}"
            )
        overrides[key] = value
    return overrides
