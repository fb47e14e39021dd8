"""The population app's ClientApp: fedpal's ClientApp (same mods: clipping, SecAgg+) whose
client is a simulated user's node (``fedpal.simulations.population.node``)."""

from __future__ import annotations

from typing import Any

from flwr.app import Context

from fedpal.client.client_app import make_client_app
from fedpal.simulations.population.node import PopulationClient


def population_client(context: Context) -> Any:
    return PopulationClient(context).to_client()


app = make_client_app(client_fn=population_client)
