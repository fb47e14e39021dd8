"""``fedpal simulate``'s ServerApp: the whole experiment in one Flower run.

The main loop holds a roll call (each node says which user it is, so a seed samples the
same users every run), sends every node the before-round-1 message (the user joins and
answers the first prompts), then runs fedpal's own federation (``run_federation``:
sampling, clipping, noise, SecAgg+, accountant, checkpoints). After each round every node
gets the global adapter and the between-rounds message (``node.UserDevice``): it trains
its local-only baseline, replies to held-out prompts when a learning-curve point or the
final evaluation is due, and its user answers the next round's prompts, whose candidate
replies the server sends along. The server scores the replies with the simulated users'
utilities (it is the simulator: no client ever sees them) and writes ``results.json`` and
``replies.json``; the launcher (``fedpal.simulations.runner``) adds the report and plots.

Progress goes to ``progress.jsonl`` in the output folder, which the launcher turns into
progress bars.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedpal.common.errors import FedpalError
from fedpal.server.federation import initial_adapter, run_federation, send_adapter
from fedpal.common.settings import FederationSettings
from fedpal.simulations.config import SIM_PREFIX, SimulationConfig
from fedpal.simulations.engine import ProgressLog
from fedpal.simulations.experiment.node import BETWEEN_ROUNDS, heldout_prompts, population
from fedpal.simulations.experiment.results import CURVE_METHODS, ExperimentResults, methods_of
from fedpal.simulations.roll_call import roll_call

log = logging.getLogger("fedpal.simulations")

PROGRESS_FILE = "progress.jsonl"
CANDIDATES_FILE = "candidates.json"
BETWEEN_GROUP = "between-rounds"
BETWEEN_TIMEOUT = 6 * 3600.0
"""A node's between-rounds work (local training, up to hundreds of replies) on a slow CPU."""


class Experiment:
    """One experiment's server side: the rounds, the between-rounds messages, the scoring."""

    def __init__(self, grid: Grid, context: Context) -> None:
        from fedpal.simulations.prompts import sample_prompts

        run_config = dict(context.run_config)
        self.grid, self.context = grid, context
        self.config, self.out = SimulationConfig.from_run_config(run_config)
        self.settings = FederationSettings.from_run_config(
            {k: v for k, v in run_config.items() if not k.startswith(SIM_PREFIX)}
        )
        self.progress = ProgressLog(self.out / PROGRESS_FILE)
        self.users = list(population(self.config))
        self.heldout = list(heldout_prompts(self.config))
        train_prompts = sample_prompts("train", self.config.train_prompts, self.config.seed)
        self.chunks = [list(c) for c in np.array_split(np.array(train_prompts, dtype=object), self.config.rounds)]
        path = self.out / CANDIDATES_FILE
        if not path.is_file():
            raise FedpalError(f"{path} is missing: the launcher writes the candidate replies before the run")
        self.candidates: dict[str, list[str]] = json.loads(path.read_text())["candidates"]
        self.methods = methods_of(self.config)
        self.nodes: dict[int, int] = {}
        self.pairs_seen: list[float] = []
        self.curves: dict[str, list[float]] = {name: [] for name in CURVE_METHODS}
        self.final: dict[str, list[list[str]]] = {}
        self.advance_round = lambda: None

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.nodes = roll_call(self.grid)
        if sorted(self.nodes.values()) != list(range(self.config.users)):
            raise FedpalError(f"the nodes are not the {self.config.users} users of this experiment")
        self.between(0, list(initial_adapter(self.settings).values()))
        self.advance_round = self.progress.phase(
            f"federated rounds ({self.config.users} users, flwr run)", self.config.rounds
        )
        folder = run_federation(
            self.grid, self.context, self.settings, node_order=self.nodes.__getitem__, after_round=self.after_round
        )
        results = ExperimentResults(self.config, self.users, folder, self.candidates)
        (self.out / "replies.json").write_text(
            json.dumps({"prompts": self.heldout, "replies": {m: self.final[m] for m in self.methods}}, indent=1)
        )
        return results.to_dict(self.final, self.curves, self.pairs_seen, time.perf_counter() - started)

    def after_round(self, server_round: int, arrays: list[np.ndarray]) -> None:
        self.advance_round()
        self.between(server_round, arrays)

    def between(self, finished: int, arrays: list[np.ndarray]) -> None:
        """The between-rounds message to every node, after round ``finished`` (0: before the first)."""
        c = self.config
        config: dict[str, Any] = {**self.settings.train_config(max(finished, 1)), BETWEEN_ROUNDS: finished}
        if finished < c.rounds:
            config["candidates"] = json.dumps({p: self.candidates[p] for p in self.chunks[finished]})
        if 1 <= finished < c.rounds:
            config.update(methods=json.dumps(CURVE_METHODS), prompts=c.curve_prompts)
            label = f"after round {finished}: local-only adapters, learning-curve replies, next prompts"
        elif finished == c.rounds:
            config.update(methods=json.dumps(self.methods), prompts=len(self.heldout))
            label = "after the last round: local-only adapters, held-out replies of every method"
        else:
            label = "users join and answer round 1's prompts"
        answers = self.ask_every_node(arrays, config, self.progress.phase(label, len(self.nodes)))
        if "candidates" in config:
            self.pairs_seen.append(float(np.mean([a["pairs"] for a in answers])))
        if "methods" in config:
            replies = self.collect(answers, json.loads(config["methods"]))
            if finished < c.rounds:
                for name, value in ExperimentResults.mean_utilities(self.users, replies).items():
                    self.curves[name].append(value)
            else:
                self.final = replies
                for name, value in ExperimentResults.mean_utilities(
                    self.users, {m: [r[: c.curve_prompts] for r in replies[m]] for m in CURVE_METHODS}
                ).items():
                    self.curves[name].append(value)

    def ask_every_node(self, arrays: list[np.ndarray], config: dict, advance: Any) -> list[dict[str, Any]]:
        """Send the message to every node; their answers in user order (one failure fails the run:
        the experiment needs every user)."""
        from flwr.compat.common import recorddict_compat as compat

        answers: list[dict[str, Any]] = []

        def answered(reply: Message) -> None:
            if reply.has_error():
                raise FedpalError(f"user node {reply.metadata.src_node_id} failed between rounds: {reply.error.reason}")
            answers.append(dict(compat.recorddict_to_evaluateres(reply.content).metrics))
            advance()

        send_adapter(self.grid, list(self.nodes), arrays, config, BETWEEN_GROUP, BETWEEN_TIMEOUT, answered)
        if len(answers) < len(self.nodes):
            missing = len(self.nodes) - len(answers)
            raise FedpalError(f"{missing} user nodes did not answer within {BETWEEN_TIMEOUT:.0f} s")
        return sorted(answers, key=lambda a: int(a["user"]))

    def collect(self, answers: list[dict[str, Any]], methods: list[str]) -> dict[str, list[list[str]]]:
        """Replies per method, per user; the user-independent ones (user 0 made them) copied to all."""
        per_user = [json.loads(str(a["replies"])) for a in answers]
        return {m: [r.get(m, per_user[0][m]) for r in per_user] for m in methods}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    experiment = Experiment(grid, context)
    results = experiment.run()
    (experiment.out / "results.json").write_text(json.dumps(results, indent=1))
    log.info("fedpal simulate: results written to %s", Path(experiment.out) / "results.json")
