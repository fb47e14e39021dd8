"""The population app's ClientApp: fedpal's ClientApp (same mods: clipping, SecAgg+) whose
client is a simulated user's node (``fedpal.simulations.population.node``), plus an
outermost mod that answers the server's roll call with the node's partition id."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpal.client.client_app import make_client_app
from fedpal.simulations.population.node import ROLL_CALL, PopulationClient


def population_client(context: Context) -> Any:
    return PopulationClient(context).to_client()


def roll_call_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Answer the server's roll call (a query message) with this node's partition id, and nothing else.

    A simulation's node ids are drawn afresh each run; the partition id is the user. The
    server orders nodes by it, so a seed samples the same users in every run (and on a
    Ray cluster as on one machine)."""
    if msg.metadata.message_type == "query" and msg.has_content() and ROLL_CALL in msg.content.config_records:
        answer = ConfigRecord({"partition-id": int(ctxt.node_config["partition-id"])})
        return Message(RecordDict({ROLL_CALL: answer}), reply_to=msg)
    return call_next(msg, ctxt)


app = make_client_app(extra_mods=[roll_call_mod], client_fn=population_client)
