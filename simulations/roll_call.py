"""The roll call of a simulation's nodes: which simulated user each virtual SuperNode is.

A simulation's node ids are drawn afresh each run; the partition id is the user. Before the
first round the ServerApp asks every node (a query message) and the node's outermost mod
answers with its partition id, so the server can order and sample nodes by user: a seed
then draws the same users in every run, on one machine or on a Ray cluster. Both
simulation apps (``fedpal simulate`` and population studies) hold one.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedpal.common.errors import FedpalError

ROLL_CALL = "roll-call"
"""Record name of the server's "which user are you?" query, and of the node's answer."""
ROLL_CALL_TIMEOUT = 600.0


def roll_call(grid: Grid) -> dict[int, int]:
    """Each node's partition id (its simulated user), asked once before the first round."""
    nodes = sorted(grid.get_node_ids())
    messages = [
        Message(
            RecordDict({ROLL_CALL: ConfigRecord({"ask": True})}),
            dst_node_id=node,
            message_type="query",
            group_id=ROLL_CALL,
        )
        for node in nodes
    ]
    answers = {}
    for reply in grid.send_and_receive(messages, timeout=ROLL_CALL_TIMEOUT):
        if not reply.has_error():
            answers[int(reply.metadata.src_node_id)] = int(reply.content.config_records[ROLL_CALL]["partition-id"])
    if len(answers) < len(nodes):
        raise FedpalError(f"only {len(answers)} of {len(nodes)} nodes answered the roll call")
    return answers


def roll_call_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Answer the server's roll call (a query message) with this node's partition id, and nothing else.

    A simulation's node ids are drawn afresh each run; the partition id is the user. The
    server orders nodes by it, so a seed samples the same users in every run (and on a
    Ray cluster as on one machine)."""
    if msg.metadata.message_type == "query" and msg.has_content() and ROLL_CALL in msg.content.config_records:
        answer = ConfigRecord({"partition-id": int(ctxt.node_config["partition-id"])})
        return Message(RecordDict({ROLL_CALL: answer}), reply_to=msg)
    return call_next(msg, ctxt)
