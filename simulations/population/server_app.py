"""The population app's ServerApp: fedpal's federation, then the global adapter scored by users.

First a roll call: each node says which user (partition) it is, so sampling follows
the users and a seed draws the same ones in every run. The rounds are fedpal's own
(``run_federation``: sampling, clipping, noise, SecAgg+, accountant, checkpoints). After the last one a seeded
sample of ``eval-users`` nodes
receives the final global adapter in an evaluate message and answers with how many of
its user's held-out pairs the base model and the adapter rank the user's way; the
answers go to ``evaluation.json`` in the run folder.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpal.server.cli import read_metrics
from fedpal.server.federation import load_global_adapter, run_federation, send_adapter
from fedpal.common.settings import FederationSettings
from fedpal.simulations.population.node import HELDOUT_EVAL
from fedpal.simulations.roll_call import roll_call
from fedpal.simulations.population.settings import PopulationConfig, split_run_config

log = logging.getLogger("fedpal.simulations")

EVALUATION_FILE = "evaluation.json"
EVAL_GROUP = "heldout"
EVAL_TIMEOUT = 3600.0


def score_global_adapter(
    grid: Grid, settings: FederationSettings, sim: PopulationConfig, folder, users: dict[int, int]
) -> dict:
    """Ask ``sim.eval_users`` nodes to score the final global adapter on their held-out pairs."""
    from flwr.compat.common import recorddict_compat as compat

    started = time.perf_counter()
    rounds_done = sum(1 for m in read_metrics(folder)[0] if m.get("aggregated"))
    arrays = list(load_global_adapter(folder).values())
    nodes = sorted(grid.get_node_ids(), key=lambda node: users.get(int(node), len(users)))
    rng = np.random.default_rng([settings["seed"], 424242])
    # indices, not ids: node ids above 2**63 would pass through numpy as floats and lose digits
    asked = [nodes[i] for i in sorted(rng.choice(len(nodes), size=min(sim.eval_users, len(nodes)), replace=False))]
    config = {**settings.train_config(max(rounds_done, 1)), HELDOUT_EVAL: True}
    scored = []
    failures = 0
    for reply in send_adapter(grid, asked, arrays, config, EVAL_GROUP, EVAL_TIMEOUT):
        if reply.has_error():
            failures += 1
            log.warning("node %s could not score the adapter: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        result = compat.recorddict_to_evaluateres(reply.content)
        scored.append({k: int(v) for k, v in result.metrics.items()})
    scored.sort(key=lambda u: u["user"])
    return {
        "rounds_aggregated": rounds_done,
        "nodes_asked": len(asked),
        "failures": failures,
        "users": scored,
        "seconds": round(time.perf_counter() - started, 3),
    }


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings, sim = split_run_config(dict(context.run_config))
    users = roll_call(grid)
    folder = run_federation(grid, context, settings, node_order=users.__getitem__)
    evaluation = score_global_adapter(grid, settings, sim, folder, users)
    (folder / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=1))
    log.info("population evaluation: %d users scored the global adapter", len(evaluation["users"]))
