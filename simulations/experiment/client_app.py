"""``fedpal simulate``'s ClientApp: fedpal's ClientApp (same mods: clipping, SecAgg+) whose client
is a simulated user's node (``fedpal.simulations.experiment.node``), answering the server's
roll call with its partition id as population nodes do."""

from __future__ import annotations

from typing import Any

from flwr.app import Context

from fedpal.client.client_app import make_client_app
from fedpal.simulations.experiment.node import ExperimentClient
from fedpal.simulations.roll_call import roll_call_mod


def experiment_client(context: Context) -> Any:
    return ExperimentClient(context).to_client()


app = make_client_app(extra_mods=[roll_call_mod], client_fn=experiment_client)
