"""The fedpal ServerApp: fedpal's federation (``fedpal.server.federation``) as a Flower app."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpal.common.settings import FederationSettings
from fedpal.server.federation import run_federation
from fedpal.server.strategy import Observer


def make_server_app(overrides: dict | None = None, observers: Sequence[Observer] = ()) -> ServerApp:
    """A ServerApp whose run config is ``overrides`` over the run's own (for Python-API runs);
    ``observers`` see each round's replies as the server receives them."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = FederationSettings.from_run_config({**dict(context.run_config), **(overrides or {})})
        run_federation(grid, context, settings, observers)

    return server_app


app = make_server_app()
