"""The population app's ClientApp: fedpal's ClientApp (same mods: clipping, SecAgg+) whose
client is a simulated user's node (``fedpal.simulations.population.node``), plus an
outermost mod that answers the server's roll call with the node's partition id."""

from __future__ import annotations

from typing import Any

from flwr.app import Context

from fedpal.client.client_app import make_client_app
from fedpal.simulations.population.node import PopulationClient
from fedpal.simulations.roll_call import roll_call_mod


def population_client(context: Context) -> Any:
    return PopulationClient(context).to_client()


app = make_client_app(extra_mods=[roll_call_mod], client_fn=population_client)
