"""Where DP stops hurting: population runs compared at a fixed epsilon, and budgets at a fixed population.

Each run is scored by *held-out preference accuracy*: each of a sample of users labels
the candidates of held-out prompts, and the node counts the pairs the base model and
the final global (shared) adapter rank that user's way (chosen reply likelier). The
gain is the mean over users of the per-user difference, with a normal 95% interval over
users; the adapter *beats the base model* when the whole interval is above zero.
Generating and judging replies for hundreds of users is out of reach of two cores,
which is why the ranking of pairs stands in for reply utility here (the report says so).

Three sweeps, every run a separate ``flwr run`` (``engine.run_population``):

- population size at a fixed epsilon and sampling rate (clients per round grow with the
  population, so the noise on the mean update shrinks as 1 / clients);
- epsilon at a fixed population;
- the shared adapter's size (rank, modules, layers) at a fixed population and epsilon:
  fewer noised numbers for the same clipping norm raise signal-to-noise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedpal.common.errors import FedpalError
from fedpal.simulations.population.engine import PopulationRun, run_population
from fedpal.simulations.population.settings import PRESETS, PopulationConfig

Progress = Callable[[str, int], Callable[[], None]]

ADAPTERS: dict[str, dict[str, Any]] = {
    "rank 4, q/k/v/o, all layers": {},
    "rank 2, q/v, all layers": {"lora_rank": 2, "lora_targets": "q_proj,v_proj"},
    "rank 1, q/v, last layer": {"lora_rank": 1, "lora_targets": "q_proj,v_proj", "lora_top_layers": 1},
}
"""Shared-adapter sizes the study compares (the first is the presets' own)."""


@dataclass(frozen=True)
class HeldoutScore:
    """Held-out preference accuracy of the base model and the shared adapter over the scored users."""

    users: int
    pairs: int
    base: float
    shared: float
    gain: float
    gain_low: float
    gain_high: float

    @property
    def beats_base(self) -> bool:
        """The shared adapter ranks better than the base model beyond the 95% interval."""
        return self.gain_low > 0

    @classmethod
    def of(cls, evaluation: dict[str, Any]) -> "HeldoutScore":
        users = [u for u in evaluation["users"] if u.get("pairs", 0) > 0]
        if len(users) < 2:
            raise FedpalError(f"only {len(users)} users scored the adapter: no interval can be given")
        base = np.array([u["base_right"] / u["pairs"] for u in users])
        shared = np.array([u["shared_right"] / u["pairs"] for u in users])
        gain = shared - base
        half = 1.96 * float(gain.std(ddof=1)) / math.sqrt(len(gain))
        return cls(
            len(users),
            int(sum(u["pairs"] for u in users)),
            float(base.mean()),
            float(shared.mean()),
            float(gain.mean()),
            float(gain.mean()) - half,
            float(gain.mean()) + half,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "pairs": self.pairs,
            "base_accuracy": self.base,
            "shared_accuracy": self.shared,
            "gain": self.gain,
            "gain_ci95": [self.gain_low, self.gain_high],
            "beats_base": self.beats_base,
        }


def run_results(config: PopulationConfig, run: PopulationRun) -> dict[str, Any]:
    """The ``results.json`` of one run: settings, per-round time, peak memory, privacy and the score."""
    rounds = [m for m in run.metrics() if "stopped" not in m]
    epsilons = [m.get("epsilon") for m in rounds]
    evaluation = run.evaluation()
    return {
        "preset": config.preset,
        "users": config.users,
        "clients_per_round": config.clients_per_round,
        "rounds": len(rounds),
        "dp": config.dp,
        "secagg": config.secagg,
        "noise_multiplier": config.noise() if config.dp else 0.0,
        "epsilon": epsilons[-1] if epsilons else None,
        "delta": config.delta if config.dp else None,
        "adapter_numbers": _adapter_numbers(run),
        "round_seconds": [m["seconds"] for m in rounds],
        "median_round_seconds": float(np.median([m["seconds"] for m in rounds])) if rounds else None,
        "evaluation_seconds": evaluation["seconds"],
        "wall_seconds": round(run.wall_seconds, 1),
        "peak_memory_mb": round(run.peak_memory_bytes / 2**20, 1),
        "noise_stddev_on_mean": rounds[-1].get("noise_stddev_on_mean") if rounds else None,
        "global_change_norm": [m.get("global_change_norm") for m in rounds],
        "score": HeldoutScore.of(evaluation).to_dict(),
        "scored_users": evaluation["users"],
        "config": config.to_dict(),
    }


def _adapter_numbers(run: PopulationRun) -> int:
    from fedpal.server.federation import load_global_adapter

    return int(sum(a.size for a in load_global_adapter(run.run_dir).values()))


@dataclass(frozen=True)
class StudyPlan:
    """The runs of a study: sizes at one epsilon, epsilons at one size, adapter sizes at one size."""

    base: PopulationConfig = PRESETS["p1000"]
    sizes: tuple[int, ...] = (20, 50, 100, 300, 1000)
    sampling_rate: float = 0.1
    epsilon: float = 8.0
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 0.0)
    """0 means DP off (no noise, no accountant)."""
    sweep_users: int = 300
    control: bool = True
    """Also run every population size with a learning rate of 1e-12: its global adapter is the
    DP noise alone, so its "gain" is what noise without learning scores (with few users the
    noise is large enough to move the base model's rankings either way)."""
    adapters: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(ADAPTERS))
    seeds: tuple[int, ...] = (0, 1)
    """Seeds of the size sweep (and its twins): where the noise is as large as the signal, one
    noise draw decides the outcome, and the 95% interval over scored users cannot show it."""
    repeat_up_to: int = 300
    """Sizes above this run with the first seed only (their noise on the mean is ~10x below the signal)."""

    def seeds_for(self, users: int) -> tuple[int, ...]:
        return self.seeds if users <= self.repeat_up_to else self.seeds[:1]

    def config(self, users: int, epsilon: float, adapter: str | None = None) -> PopulationConfig:
        changes = {
            "users": users,
            "clients_per_round": max(3, round(self.sampling_rate * users)),
            "eval_users": min(self.base.eval_users, users),
            "dp": epsilon > 0,
            "target_epsilon": epsilon,
            "preset": f"study-{users}-eps{epsilon:g}",
        }
        changes.update(self.adapters[adapter] if adapter else {})
        return replace(self.base, **changes)

    def sizes_key(self, users: int, seed: int | None = None) -> str:
        return f"users={users} eps={self.epsilon:g}" + (f" seed={seed}" if seed not in (None, self.seeds[0]) else "")

    def control_key(self, users: int, seed: int | None = None) -> str:
        return self.sizes_key(users, seed) + " noise only (no learning)"

    def budget_key(self, epsilon: float) -> str:
        return f"users={self.sweep_users} eps={epsilon:g}" if epsilon else f"users={self.sweep_users} no DP"

    def adapter_key(self, adapter: str) -> str:
        """The presets' own adapter (the first) is the plain run at ``sweep_users`` and ``epsilon``."""
        first = next(iter(self.adapters))
        return self.budget_key(self.epsilon) + ("" if adapter == first else f" {adapter}")

    def run_names(self) -> dict[str, Any]:
        """Which run answers each row of the report (kept in results.json, so the report never
        rebuilds a name)."""
        return {
            "sizes": {n: [self.sizes_key(n, seed) for seed in self.seeds_for(n)] for n in self.sizes},
            "twins": {n: [self.control_key(n, seed) for seed in self.seeds_for(n)] for n in self.sizes}
            if self.control
            else {},
            "budgets": [self.budget_key(eps) for eps in self.epsilons],
            "adapters": {name: self.adapter_key(name) for name in self.adapters},
        }

    def runs(self) -> dict[str, PopulationConfig]:
        """Every distinct run by a readable name (a run two sweeps share is made once)."""
        named = {self.sizes_key(n): self.config(n, self.epsilon) for n in self.sizes}
        for eps in self.epsilons:
            named.setdefault(self.budget_key(eps), self.config(self.sweep_users, eps))
        for name in self.adapters:
            named.setdefault(self.adapter_key(name), self.config(self.sweep_users, self.epsilon, name))
        for n in self.sizes:
            for seed in self.seeds_for(n):
                learner = (
                    replace(self.config(n, self.epsilon), seed=seed)
                    if seed != self.seeds[0]
                    else self.config(n, self.epsilon)
                )
                named.setdefault(self.sizes_key(n, seed), learner)
                if self.control:
                    named[self.control_key(n, seed)] = replace(
                        learner, learning_rate=1e-12, preset=f"study-{n}-eps{self.epsilon:g}-noise-only"
                    )
        return named


STUDIES: dict[str, StudyPlan] = {
    "default": StudyPlan(),
    "quick": StudyPlan(
        base=PRESETS["quick"],
        sizes=(8, 12),
        sampling_rate=0.5,
        epsilons=(8.0, 0.0),
        sweep_users=8,
        adapters={"rank 4, q/k/v/o, all layers": {}},
        control=False,
        seeds=(0,),
    ),
}


def over_noise(run: dict[str, Any], control: dict[str, Any]) -> list[float]:
    """95% interval of the learned gain minus its noise-only twin's (different users were scored
    in the two runs, so the two intervals combine as independent: unpaired)."""
    a, b = run["score"], control["score"]
    half = math.hypot(a["gain_ci95"][1] - a["gain"], b["gain_ci95"][1] - b["gain"])
    return [a["gain"] - b["gain"] - half, a["gain"] - b["gain"] + half]


def learned(runs: dict[str, Any], plan: "StudyPlan", users: int) -> bool:
    """With every seed, the shared adapter beats the base model beyond its 95% interval, and
    (with controls) beats the DP noise alone too: what it gained was learned, not the noise
    moving the rankings."""
    for seed in plan.seeds_for(users):
        run = runs[plan.sizes_key(users, seed)]
        if not run["score"]["beats_base"]:
            return False
        if plan.control and over_noise(run, runs[plan.control_key(users, seed)])[0] <= 0:
            return False
    return True


def run_folder(name: str) -> str:
    """A run's folder name from its readable name ("users=300 eps=8" -> "users-300-eps-8")."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def _finished(folder: Path, config: PopulationConfig) -> dict[str, Any] | None:
    """The results of a run this study already finished with exactly ``config`` (an interrupted
    or extended study goes on where it stopped); None when it must run."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done if done.get("config") == json.loads(json.dumps(config.to_dict())) else None


def population_study(
    plan: StudyPlan, out: Path, progress: Progress | None = None, *, ray_address: str | None = None
) -> dict[str, Any]:
    """Run every run of ``plan`` (each in ``out/runs/<its name>``; one finished before with the
    same settings is reused), then write results.json, report.md and plots."""
    from fedpal.simulations.population.report import write_study_report

    out = Path(out)
    runs: dict[str, Any] = {}
    for name, config in plan.runs().items():
        folder = out / "runs" / run_folder(name)
        done = _finished(folder, config)
        if done is None:
            done = run_results(config, run_population(config, folder, progress, ray_address=ray_address))
            (folder / "results.json").write_text(json.dumps(done, indent=1))
        runs[name] = {"folder": f"runs/{folder.name}", **done}
    results = {
        "plan": {
            "sizes": list(plan.sizes),
            "sampling_rate": plan.sampling_rate,
            "epsilon": plan.epsilon,
            "epsilons": list(plan.epsilons),
            "sweep_users": plan.sweep_users,
            "adapters": list(plan.adapters),
            "control": plan.control,
            "seeds": {n: list(plan.seeds_for(n)) for n in plan.sizes},
            "base": plan.base.to_dict(),
            "run_names": plan.run_names(),
        },
        "runs": runs,
        "first_size_beating_base": next((n for n in sorted(plan.sizes) if learned(runs, plan, n)), None),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_study_report(results, out)
    return results
