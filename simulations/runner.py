"""The main job: a federated personalization experiment with simulated users.

One run, start to finish:

1. the base model is exported once to ONNX Runtime GenAI, and candidate replies to the
   training prompts are generated through it in several styles (shared by all users);
2. each simulated user gets an encrypted memory holding their stated preference (if
   any); before every round they "interact": label the candidates of new prompts into
   pairs and a rating, which go into their memory;
3. each round is a real Flower round (Simulation Engine) of fedpal's ServerApp and
   ClientApp, privacy protection as configured; the server resumes from its checkpoint
   each round, which is what lets the users interact between rounds;
4. a local-only personal adapter per user (no federation) is trained beside it, with the
   same number of steps, for the baseline;
5. replies on held-out prompts, through the ONNX runtime, are scored with each user's
   exact utility: base, retrieval-only, local-only, shared-only and fedpal
   (shared + personal + retrieval), plus the cross-user matrix and learning curves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpal.client.home import ClientHome
from fedpal.client.memory import PASSPHRASE_ENV
from fedpal.common.adapters import PERSONAL, SHARED, AdapterConfig
from fedpal.simulations.config import SimulationConfig
from fedpal.simulations.evaluation import (
    candidate_headroom,
    cross_user_matrix,
    diagonal_best_fraction,
    evaluate_baseline,
    shared_reply_table,
    utility_table,
)
from fedpal.simulations.prompts import sample_prompts
from fedpal.simulations.styles import STYLES_BY_NAME, candidate_generation_prompts, synthetic_reply
from fedpal.simulations.users import SimulatedUser, choose_favourite, label_candidates, make_population

log = logging.getLogger("fedpal.simulations")

BASELINES = ("base", "retrieval", "local", "shared", "fedpal")
ABLATIONS = ("fedpal_merge",)
METHODS = BASELINES + ABLATIONS
"""Every method a run can score; ``Experiment.methods`` is the subset a config scores."""
BASELINE_LABELS = {
    "base": "base model",
    "retrieval": "retrieval only (stated preferences in the prompt)",
    "local": "local-only personal adapter (no federation)",
    "shared": "shared adapter only (FedAvg)",
    "fedpal": "fedpal (shared + personal + retrieval, `fedpal generate --retrieval` at its default mode)",
    "fedpal_merge": "ablation: fedpal's adapters and retrieval, merge mode (no reranking)",
}

Progress = Callable[[str, int], Callable[[], None]]


class SimulationRun:
    """The state of one experiment in ``out``; :meth:`run` does everything and returns results."""

    def __init__(self, config: SimulationConfig, out: Path, progress: Progress | None = None) -> None:
        config.check()
        self.config = config
        self.out = Path(out)
        self.progress = progress or _no_progress
        self.users: list[SimulatedUser] = make_population(
            config.users,
            config.seed,
            minority_fraction=config.minority_fraction,
            shared_weight=config.population_shared_weight,
            stated_fraction=config.stated_fraction,
        )
        self.train_prompts = sample_prompts("train", config.train_prompts, config.seed)
        self.heldout = sample_prompts("heldout", config.heldout_prompts, config.seed)
        self.federation_dir = self.out / "federation"
        self.adapter_config = AdapterConfig.from_settings(self.federation_overrides(1))
        self._trainer_model: Any = None
        self._generator: Any = None

    # -- homes -------------------------------------------------------------------------

    def home(self, index: int) -> ClientHome:
        """User ``index``'s federated home: the ClientApp finds it by partition id."""
        return ClientHome.at(self.out / "users" / str(index))

    def local_home(self, index: int) -> ClientHome:
        """User ``index``'s home for the local-only baseline (never federated)."""
        return ClientHome.at(self.out / "local" / str(index))

    # -- the run -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run every phase and return the ``results.json`` dictionary."""
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        os.environ[PASSPHRASE_ENV] = f"fedpal-simulation-{self.config.seed}"
        candidates = self.candidates()
        self.create_memories()
        chunks = [list(c) for c in np.array_split(np.array(self.train_prompts, dtype=object), self.config.rounds)]
        pairs_seen: list[float] = []
        curve_rounds: dict[str, list[float]] = {name: [] for name in ("fedpal", "shared", "local")}
        for round_index, chunk in enumerate(chunks, start=1):
            pairs_seen.append(self.interact(round_index, chunk, candidates))
            self.federated_round(round_index)
            self.train_local(round_index)
            if round_index < self.config.rounds:
                for name, value in self.curve_point().items():
                    curve_rounds[name].append(value)
        replies = self.evaluate()
        curve_slice = slice(0, self.config.curve_prompts)
        final = self.utilities_of(replies, curve_slice)
        for name in curve_rounds:
            curve_rounds[name].append(final[name])
        headroom = candidate_headroom(self.users, [candidates[p] for p in self.train_prompts], self.config.styles)
        return self.results(replies, curve_rounds, pairs_seen, headroom, time.perf_counter() - started)

    def candidates(self) -> dict[str, list[str]]:
        """Candidate replies per training prompt, one per style, from the base model (cached)."""
        from fedpal.client.generator import DecodeOptions

        cache = self.out / "candidates.json"
        key = {"source": self.config.candidate_source, "model": self.config.model, "precision": self.config.precision,
               "styles": list(self.config.styles), "tokens": self.config.candidate_tokens, "prompts": self.train_prompts,
               "seed": self.config.seed}
        if cache.is_file():
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return stored["candidates"]
        styles = [STYLES_BY_NAME[name] for name in self.config.styles]
        options = DecodeOptions(max_new_tokens=self.config.candidate_tokens)
        result: dict[str, list[str]] = {}
        source = "base model, ONNX" if self.config.candidate_source == "model" else "templates"
        advance = self.progress(f"candidate replies ({source})", len(self.train_prompts) * len(styles))
        for number, prompt in enumerate(self.train_prompts):
            result[prompt] = []
            if self.config.candidate_source == "synthetic":
                rng = np.random.default_rng([self.config.seed, number])
                requests = [synthetic_reply(prompt, style, rng) for style in styles]
            else:
                requests = candidate_generation_prompts(prompt, styles)
            for request in requests:
                if self.config.candidate_source == "model":
                    request = self.generator().generate(request, options=options).text
                result[prompt].append(request)
                advance()
        cache.write_text(json.dumps({"key": key, "candidates": result}))
        return result

    def create_memories(self) -> None:
        """Fresh encrypted memories holding each user's stated preference (if they state one)."""
        from fedpal.client.memory import PreferenceMemory

        for index, user in enumerate(self.users):
            for home in (self.home(index), self.local_home(index)):
                with PreferenceMemory.open(home.root) as memory:
                    memory.forget(everything=True)
                with PreferenceMemory.open(home.root) as memory:
                    if user.stated_preference:
                        memory.add_stated(user.stated_preference, tags=("simulated",))

    def interact(self, round_index: int, prompts: Sequence[str], candidates: dict[str, list[str]]) -> float:
        """Each user labels the candidates of ``prompts``; returns the mean pairs per user so far."""
        from fedpal.client.memory import PreferenceMemory

        label = choose_favourite if self.config.labelling == "favourite" else label_candidates
        totals = []
        for index, user in enumerate(self.users):
            rng = np.random.default_rng([self.config.seed, round_index, index])
            labelled = [
                (prompt, label(user, prompt, candidates[prompt], rng, max_pairs=self.config.pairs_per_prompt))
                for prompt in prompts
            ]
            for home in (self.home(index), self.local_home(index)):
                with PreferenceMemory.open(home.root) as memory:
                    for prompt, labels in labelled:
                        for pair in labels.pairs:
                            memory.add_pair(pair.prompt, pair.chosen, pair.rejected, tags=("simulated",))
                        seen = labels.ratings[0]
                        memory.add_rating(prompt, seen.reply, seen.rating, tags=("simulated",))
                    pairs = len(memory.records("pair"))
            totals.append(pairs)  # both homes received the same interactions
        return float(np.mean(totals))

    def federation_overrides(self, round_index: int) -> dict[str, Any]:
        """fedpal's run config for round ``round_index`` (resumed from the checkpoint after round 1)."""
        c = self.config
        return {
            "model": c.model,
            "num-server-rounds": round_index,
            "resume": round_index > 1,
            "final-adapter": False,  # install_global_adapter puts each round's aggregate into every home
            "run-dir": str(self.federation_dir),
            "home-base": str(self.out / "users"),
            "strategy": c.strategy,
            "fraction-train": c.clients_per_round / c.users,
            "min-clients": c.clients_per_round,
            "population-size": c.users,
            "seed": c.seed,
            "deterministic": True,
            "lora-rank": c.lora_rank,
            "lora-alpha": c.lora_alpha,
            "lora-targets": c.lora_targets,
            "lora-top-layers": c.lora_top_layers,
            "ffa-lora": c.ffa_lora,
            "objective": c.objective,
            "local-steps": c.local_steps,
            "personal-steps": c.personal_steps if round_index >= c.personal_from_round else 0,
            "learning-rate": c.learning_rate,
            "dpo-beta": c.dpo_beta,
            "batch-size": c.batch_size,
            "max-length": c.max_length,
            "train-with-preferences": c.train_in_context,
            "preferences-in": c.retrieval_in,
            "dp": c.dp,
            "noise-multiplier": c.noise_multiplier,
            "clipping-norm": c.clipping_norm,
            "delta": c.delta,
            "secagg": c.secagg,
        }

    def federated_round(self, round_index: int) -> None:
        """One real Flower round through the Simulation Engine, resumed from the last checkpoint."""
        from flwr.simulation import run_simulation

        from fedpal.client.client_app import app as client_app
        from fedpal.server.server_app import make_server_app

        advance = self.progress(f"federated round {round_index}/{self.config.rounds} (Flower simulation)", 1)
        with quiet_flower():
            run_simulation(
                server_app=make_server_app(self.federation_overrides(round_index)),
                client_app=client_app,
                num_supernodes=self.config.users,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"log_to_driver": False, "logging_level": logging.WARNING},
                },
            )
        rounds = self.federation_metrics()
        if not rounds or rounds[-1]["round"] != round_index:
            raise RuntimeError(f"the federation did not complete round {round_index}; see {self.federation_dir}")
        self.install_global_adapter()
        advance()

    def federation_metrics(self) -> list[dict[str, Any]]:
        from fedpal.server.server_app import METRICS_FILE

        path = self.federation_dir / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def install_global_adapter(self) -> None:
        """Put the global shared adapter into every user's home, as a client holds it after a round."""
        from fedpal.common.adapters import arrays_to_adapter, save_adapter
        from fedpal.server.server_app import load_global_adapter

        model = self.trainer_model()
        arrays_to_adapter(model, SHARED, load_global_adapter(self.federation_dir), "B" if self.config.ffa_lora else "AB")
        save_adapter(model, SHARED, self.out / "global" / SHARED)
        for index in range(len(self.users)):
            save_adapter(model, SHARED, self.home(index).adapter_dir(SHARED))

    def trainer_model(self) -> Any:
        """One in-process copy of the base model with both adapters (global adapter I/O, local-only training)."""
        if self._trainer_model is None:
            from fedpal.common.adapters import adapter_to_arrays, attach_adapters
            from fedpal.common.models import load_base_model

            base = load_base_model(self.config.model)
            model = attach_adapters(base.model, self.adapter_config)
            self._trainer_model = (base, model, adapter_to_arrays(model, PERSONAL))
        return self._trainer_model[1]

    def train_local(self, round_index: int) -> None:
        """The local-only baseline: a personal adapter per user, no federation, same step budget,
        through the same flow as a federated client's personal adapter (held-out check, guard),
        in the rounds where personal adapters train."""
        from fedpal.client.memory import PreferenceMemory
        from fedpal.client.personalize import Personalizer, TrainingData
        from fedpal.client.trainer import TrainConfig
        from fedpal.common.adapters import arrays_to_adapter, load_adapter

        c = self.config
        if round_index < c.personal_from_round:
            return
        model = self.trainer_model()
        base, _, fresh_personal = self._trainer_model
        config = TrainConfig(objective=c.objective, learning_rate=c.learning_rate, beta=c.dpo_beta,
                             batch_size=c.batch_size, max_length=c.max_length, checkpoint_every=0)
        advance = self.progress(f"local-only adapters, round {round_index}", len(self.users))
        for index in range(len(self.users)):
            home = self.local_home(index)
            with PreferenceMemory.open(home.root) as memory:
                data = TrainingData.from_memory(memory)
            if (home.adapter_dir(PERSONAL) / "adapter_config.json").is_file():
                load_adapter(model, PERSONAL, home.adapter_dir(PERSONAL))
            else:
                arrays_to_adapter(model, PERSONAL, fresh_personal)
            Personalizer(base, model, home, config, checkpoints=False).train(
                PERSONAL, data, seed=c.seed * 1_000_003 + round_index * 7919 + index,
                steps=self.local_only_steps(round_index), progress=False,
            )
            advance()

    def local_only_steps(self, round_index: int) -> int:
        """The local-only baseline's steps in ``round_index``: what a federated client has
        trained since the baseline last trained (all rounds so far, the first time)."""
        c = self.config
        rounds = round_index if round_index == c.personal_from_round else 1
        return rounds * c.local_steps + c.personal_steps

    # -- evaluation --------------------------------------------------------------------

    def generator(self) -> Any:
        """The ONNX Runtime generator (the export is made once and cached under FEDPAL_HOME)."""
        if self._generator is None:
            from fedpal.client.generator import PersonalizedGenerator
            from fedpal.client.onnx_export import DEFAULT_MAX_RANK, export_model

            c = self.config
            export = export_model(c.model, c.precision, self.adapter_config.target_modules,
                                  max_rank=max(DEFAULT_MAX_RANK, 2 * c.lora_rank))
            self._generator = PersonalizedGenerator(export)
            for index in range(len(self.users)):  # as `fedpal export --home` records it for a user
                for home in (self.home(index), self.local_home(index)):
                    home.record_export(c.model, c.precision, export.max_rank, export.execution_provider, export.key)
        return self._generator

    def replies(self, prompts: Sequence[str], methods: Sequence[str], label: str) -> dict[str, list[list[str]]]:
        """Greedy replies per method, per user, per prompt, each through ``generate_for`` (what
        ``fedpal generate`` runs); base and shared are the same for every user and made once."""
        from fedpal.client.generator import DecodeOptions

        generator = self.generator()
        c = self.config
        options = DecodeOptions(max_new_tokens=c.reply_tokens)
        n_users = len(self.users)
        per_user = [m for m in methods if m not in ("base", "shared")]
        total = len(prompts) * (sum(m in methods for m in ("base", "shared")) + n_users * len(per_user))
        advance = self.progress(label, total)
        calls = {
            "base": lambda i: (self.home(i), dict(mode="base")),
            "shared": lambda i: (self.home(i), dict(mode="merge", w_shared=1.0, w_personal=0.0)),
            "retrieval": lambda i: (self.home(i), dict(mode="base", retrieval=True)),
            "local": lambda i: (self.local_home(i), dict(mode="merge", w_shared=0.0, w_personal=1.0)),
            "fedpal": lambda i: (self.home(i), dict(mode=c.fedpal_mode, retrieval=True, w_shared=c.w_shared,
                                                    w_personal=c.w_personal)),
            "fedpal_merge": lambda i: (self.home(i), dict(mode="merge", retrieval=True, w_shared=c.w_shared,
                                                          w_personal=c.w_personal)),
        }

        def run(method: str, index: int) -> list[str]:
            home, how = calls[method](index)
            out = []
            for prompt in prompts:
                out.append(generator.generate_for(home, prompt, options=options, retrieval_in=c.retrieval_in, **how).text)
                advance()
            return out

        result: dict[str, list[list[str]]] = {}
        for method in ("base", "shared"):
            if method in methods:
                result[method] = [run(method, 0)] * n_users
        for method in per_user:
            result[method] = [run(method, index) for index in range(n_users)]
        return result

    def curve_point(self) -> dict[str, float]:
        """Mean held-out utility of the adapted methods now (on the first ``curve_prompts`` prompts)."""
        prompts = self.heldout[: self.config.curve_prompts]
        replies = self.replies(prompts, ("fedpal", "shared", "local"), "learning-curve replies")
        return self.utilities_of(replies, slice(None))

    def utilities_of(self, replies: dict[str, list[list[str]]], prompts: slice) -> dict[str, float]:
        return {
            name: float(utility_table(self.users, [r[prompts] for r in per_user]).mean())
            for name, per_user in replies.items()
            if name in ("fedpal", "shared", "local")
        }

    def methods(self) -> tuple[str, ...]:
        """The baselines, and the merge ablation when fedpal answers in another mode (in merge
        mode it would repeat fedpal's replies at the cost of a third of the evaluation)."""
        return BASELINES + tuple(m for m in ABLATIONS if self.config.fedpal_mode != "merge")

    def evaluate(self) -> dict[str, list[list[str]]]:
        """Replies of every baseline to every held-out prompt (kept in ``replies.json``)."""
        replies = self.replies(self.heldout, self.methods(), "held-out replies, all baselines")
        (self.out / "replies.json").write_text(
            json.dumps({"prompts": self.heldout, "replies": {m: replies[m] for m in self.methods()}}, indent=1)
        )
        return replies

    def results(
        self,
        replies: dict[str, list[list[str]]],
        curve_rounds: dict[str, list[float]],
        pairs_seen: list[float],
        headroom: dict[str, Any] | None,
        seconds: float,
    ) -> dict[str, Any]:
        """The ``results.json`` dictionary (schema in ``fedpal.simulations.report``)."""
        c = self.config
        base_replies = replies["base"][0]
        baselines = {name: evaluate_baseline(name, self.users, replies[name], base_replies) for name in self.methods()}
        matrix = cross_user_matrix(self.users, replies["fedpal"])
        metrics = self.federation_metrics()
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
            "ablations": [name for name in ABLATIONS if name in self.methods()],
            "cross_user_diagonal_best_fraction": diagonal_best_fraction(matrix),
            "cross_user_matrix": matrix.tolist(),
            "curves": {
                "rounds": {"x": list(range(1, c.rounds + 1)), "series": curve_rounds},
                "pairs": {"x": pairs_seen, "series": {"fedpal": curve_rounds["fedpal"], "local": curve_rounds["local"]}},
            },
            "epsilon_per_round": epsilons,
            "base_utility_per_user": base_table.mean(axis=1).tolist(),
            "user_ids": [u.user_id for u in self.users],
            "minority_users": [u.user_id for u in self.users if u.is_minority],
            "users_detail": [u.to_dict() for u in self.users],
            "federation": [
                {k: m.get(k) for k in ("round", "seconds", "overhead_s", "clients_summed", "loss_before_mean",
                                       "loss_after_mean", "global_change_norm", "epsilon", "bytes_up_per_client",
                                       "bytes_down_per_client", "rejected", "failures")}
                for m in metrics
            ],
            "headroom": headroom,
            "config": c.to_dict(),
            "wall_time_s": round(seconds, 1),
            "notes": self.notes(baselines, metrics) + self.headroom_notes(headroom),
        }

    def notes(self, baselines: dict[str, Any], metrics: list[dict[str, Any]]) -> list[str]:
        """What limits these numbers, stated from the run itself."""
        c = self.config
        notes = [f"{c.users} users, {c.train_prompts} training prompts ({c.pairs_per_prompt} pairs each), "
                 f"{c.heldout_prompts} held-out prompts, replies of at most {c.reply_tokens} tokens, greedy."]
        if c.personal_from_round > 1:
            notes.append(
                f"Personal adapters train from round {c.personal_from_round} on (before it the clients send shared "
                f"updates only): {c.personal_steps} personal steps per round for fedpal's clients, "
                f"{self.local_only_steps(c.personal_from_round)} steps for the local-only baseline the first time."
            )
        if c.dp:
            notes.append(
                f"User-level DP with noise multiplier {c.noise_multiplier} over {c.clients_per_round} clients per round: "
                f"the noise on the mean update is {c.noise_multiplier / c.clients_per_round:.3f} x the clipping norm; "
                "with this few clients either epsilon or utility of the shared adapter suffers."
            )
        if c.model == "tiny":
            notes.append("The tiny model is random: its replies carry no real style, so these numbers only check the pipeline.")
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


def _no_progress(description: str, total: int) -> Callable[[], None]:
    return lambda: None


def _not_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    """Flower 1.41 deprecates ``run_simulation`` in favour of the ``flwr run`` CLI; the runner
    keeps it because it must hand control back to the users between rounds. The README says
    so once; Flower would say it every round."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower logs every message exchange at INFO; a simulation shows its own progress bars."""
    loggers = [logging.getLogger(name) for name in ("flwr", "ray")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    loggers[0].addFilter(_not_run_simulation_deprecation)
    try:
        yield
    finally:
        loggers[0].removeFilter(_not_run_simulation_deprecation)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def simulate(config: SimulationConfig, out: Path | str, progress: Progress | None = None) -> dict[str, Any]:
    """Run the experiment, write ``results.json``, ``report.md`` and the plots into ``out``."""
    from fedpal.simulations.report import write_report

    out = Path(out)
    results = SimulationRun(config, out, progress).run()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return results
