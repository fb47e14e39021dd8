"""``results.json`` of ``fedpal simulate``: every method's replies scored with the users' utilities.

Scoring is the simulator's business (the users' exact utilities live here and on the
server side of the experiment, never on a client). Schema in ``fedpal.simulations.report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpal.simulations.config import SimulationConfig
from fedpal.simulations.evaluation import (
    candidate_headroom,
    cross_user_matrix,
    diagonal_best_fraction,
    evaluate_baseline,
    shared_reply_table,
    utility_table,
)
from fedpal.simulations.experiment.node import local_only_steps
from fedpal.simulations.users import SimulatedUser

BASELINES = ("base", "retrieval", "local", "shared", "fedpal")
ABLATIONS = ("fedpal_merge",)
METHODS = BASELINES + ABLATIONS
"""Every method a run can score; :func:`methods_of` is the subset a config scores."""
CURVE_METHODS = ["fedpal", "shared", "local"]
"""The adapted methods whose utility is followed round by round (the learning curves)."""
BASELINE_LABELS = {
    "base": "base model",
    "retrieval": "retrieval only (stated preferences in the prompt)",
    "local": "local-only personal adapter (no federation)",
    "shared": "shared adapter only (FedAvg)",
    "fedpal": "fedpal (shared + personal + retrieval, `fedpal generate --retrieval` at its default mode)",
    "fedpal_merge": "ablation: fedpal's adapters and retrieval, merge mode (no reranking)",
}


def methods_of(config: SimulationConfig) -> list[str]:
    """The baselines, and the merge ablation when fedpal answers in another mode (in merge
    mode it would repeat fedpal's replies at the cost of a third of the evaluation)."""
    return list(BASELINES) + [m for m in ABLATIONS if config.fedpal_mode != "merge"]


class ExperimentResults:
    """The scores of one finished experiment (its federation's metrics are in ``federation_dir``)."""

    def __init__(
        self,
        config: SimulationConfig,
        users: Sequence[SimulatedUser],
        federation_dir: Path,
        candidates: dict[str, list[str]],
    ) -> None:
        self.config, self.users, self.federation_dir, self.candidates = config, list(users), federation_dir, candidates

    @staticmethod
    def mean_utilities(users: Sequence[SimulatedUser], replies: dict[str, list[list[str]]]) -> dict[str, float]:
        """Mean utility of each adapted method's replies (per user, per prompt)."""
        return {
            name: float(utility_table(list(users), per_user).mean())
            for name, per_user in replies.items()
            if name in CURVE_METHODS
        }

    def to_dict(
        self,
        replies: dict[str, list[list[str]]],
        curve_rounds: dict[str, list[float]],
        pairs_seen: list[float],
        seconds: float,
    ) -> dict[str, Any]:
        from fedpal.server.cli import read_metrics

        c = self.config
        methods = methods_of(c)
        train_prompts = [p for p in self.candidates]
        headroom = candidate_headroom(self.users, [self.candidates[p] for p in train_prompts], c.styles)
        base_replies = replies["base"][0]
        baselines = {name: evaluate_baseline(name, self.users, replies[name], base_replies) for name in methods}
        matrix = cross_user_matrix(self.users, replies["fedpal"])
        metrics = read_metrics(self.federation_dir)[0]
        epsilons = [m.get("epsilon") for m in metrics]
        uploads = [m["bytes_up_per_client"] for m in metrics if m.get("bytes_up_per_client")]
        base_table = shared_reply_table(self.users, base_replies)
        return {
            "preset": c.preset,
            "model": c.model,
            "seed": c.seed,
            "users": len(self.users),
            "rounds": c.rounds,
            "epsilon": epsilons[-1] if epsilons else None,
            "delta": c.delta if c.dp else None,
            "noise_multiplier": c.noise_multiplier if c.dp else 0.0,
            "clients_per_round": c.clients_per_round,
            "bytes_per_client_round": int(round(float(np.mean(uploads)))) if uploads else 0,
            "baselines": {name: result.to_dict() for name, result in baselines.items()},
            "base_baseline": "base",
            "ablations": [name for name in ABLATIONS if name in methods],
            "cross_user_diagonal_best_fraction": diagonal_best_fraction(matrix),
            "cross_user_matrix": matrix.tolist(),
            "curves": {
                "rounds": {"x": list(range(1, c.rounds + 1)), "series": curve_rounds},
                "pairs": {
                    "x": pairs_seen,
                    "series": {"fedpal": curve_rounds["fedpal"], "local": curve_rounds["local"]},
                },
            },
            "epsilon_per_round": epsilons,
            "base_utility_per_user": base_table.mean(axis=1).tolist(),
            "user_ids": [u.user_id for u in self.users],
            "minority_users": [u.user_id for u in self.users if u.is_minority],
            "users_detail": [u.to_dict() for u in self.users],
            "federation": [
                {
                    k: m.get(k)
                    for k in (
                        "round",
                        "seconds",
                        "overhead_s",
                        "clients_summed",
                        "loss_before_mean",
                        "loss_after_mean",
                        "global_change_norm",
                        "epsilon",
                        "bytes_up_per_client",
                        "bytes_down_per_client",
                        "rejected",
                        "failures",
                    )
                }
                for m in metrics
            ],
            "headroom": headroom,
            "config": c.to_dict(),
            "wall_time_s": round(seconds, 1),
            "notes": self.notes(metrics) + self.headroom_notes(headroom),
        }

    def notes(self, metrics: list[dict[str, Any]]) -> list[str]:
        """What limits these numbers, stated from the run itself."""
        c = self.config
        notes = [
            f"{c.users} users, {c.train_prompts} training prompts ({c.pairs_per_prompt} pairs each), "
            f"{c.heldout_prompts} held-out prompts, replies of at most {c.reply_tokens} tokens, greedy."
        ]
        if c.personal_from_round > 1:
            notes.append(
                f"Personal adapters train from round {c.personal_from_round} on (before it the clients send shared "
                f"updates only): {c.personal_steps} personal steps per round for fedpal's clients, "
                f"{local_only_steps(c, c.personal_from_round)} steps for the local-only baseline the first time."
            )
        if c.dp:
            notes.append(
                f"User-level DP with noise multiplier {c.noise_multiplier} over {c.clients_per_round} clients per "
                "round: "
                f"the noise on the mean update is {c.noise_multiplier / c.clients_per_round:.3f} x the clipping norm; "
                "with this few clients either epsilon or utility of the shared adapter suffers."
            )
        if c.model == "tiny":
            notes.append(
                "The tiny model is random: its replies carry no real style, so these numbers only check the pipeline."
            )
        rejected = sum(len(m.get("rejected") or []) for m in metrics)
        if rejected:
            notes.append(f"{rejected} client updates were rejected by the server's checks.")
        return notes

    def headroom_notes(self, headroom: dict[str, Any] | None) -> list[str]:
        """The ceiling a style-learning adapter faces, when the candidates include plain replies."""
        if not headroom or self.config.candidate_source != "model":
            return []
        return [
            f"Even replies always in each user's best instructed style would beat the base model on "
            f"{headroom['best_style_win_rate_vs_base']:.0%} of training prompts "
            f"(the best candidate per prompt: {headroom['best_candidate_win_rate_vs_base']:.0%}): adapters "
            "that learn to imitate one candidate style cannot win more often than that."
        ]
