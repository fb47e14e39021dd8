"""The parts of Flower 1.41 that fedpal needs and Flower does not publish, in one place.

fedpal runs its own round loop (``fedpal.server.federation``) on Flower's compatibility
stack, because SecAgg+ exists only there (``SecAggPlusWorkflow`` on a ``LegacyContext``).
That loop needs a few of Flower's internals: the thread that registers connected nodes
with a client manager, the record names under which the workflows keep the global
parameters and the round, the plain fit workflow, the client manager's lock, the
serializer (to count bytes), and the attributes in which Flower's strategies keep their
optimizer state (to checkpoint it). The ClientApp's guards need the names under which
Flower's SecAgg+ and clipping mods find their settings in a message. They are here, and
nowhere else, so that a Flower upgrade is checked against one file.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.server.client_manager import SimpleClientManager
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM as KEY_CLIPPING_NORM

SECAGG_CONFIGS_RECORD = RECORD_KEY_CONFIGS
"""Record name of the SecAgg+ settings in a message (Flower's ``secaggplus_mod`` reads them)."""


class OrderedClientManager(SimpleClientManager):
    """Flower's client manager, sampling from the node ids in sorted order.

    ``random.sample`` over registration order would draw different nodes for the same
    seed after a restart; over sorted ids, a seeded round draws the same ones. A
    simulation, whose node ids are drawn afresh each run, passes ``node_order`` (node id
    to its partition id) so that a seed draws the same *users* in every run.
    """

    def __init__(self, node_order: Callable[[int], int] | None = None) -> None:
        super().__init__()
        self.node_order = node_order

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: Any = None) -> list:
        with self._cv:
            key = (lambda item: self.node_order(int(item[0]))) if self.node_order else None
            self.clients = dict(sorted(self.clients.items(), key=key))
        return super().sample(num_clients, min_num_clients, criterion)


def payload_bytes(msg: Message) -> int:
    """Serialized size of the message content (what goes on the wire, minus metadata).

    Measured on the protobuf rather than with ``Record.count_bytes()``, which in Flower
    1.41 raises on an empty list value (SecAgg+ sends those).
    """
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0


def payload(msg: Message) -> bytes:
    """The message content as it goes on the wire (Flower's protobuf), for audits that read it."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(msg.content).SerializeToString() if msg.has_content() else b""


# Attributes in which Flower's strategies keep state between rounds.
_STATE_ATTRS = ("current_weights", "m_t", "v_t", "momentum_vector")


def strategy_state(strategy: Any) -> dict[str, list[np.ndarray]]:
    """The server optimizer's state (FedAdam/FedYogi moments, FedAvgM momentum) for a checkpoint."""
    from flwr.common import parameters_to_ndarrays

    state = {
        a: [np.asarray(x) for x in getattr(strategy, a)] for a in _STATE_ATTRS if getattr(strategy, a, None) is not None
    }
    if type(strategy).__name__ == "FedAvgM" and strategy.initial_parameters is not None:
        state["initial_parameters"] = parameters_to_ndarrays(strategy.initial_parameters)
    return state


def restore_strategy_state(strategy: Any, state: Mapping[str, list[np.ndarray]]) -> None:
    """Put a checkpoint's optimizer state back into a freshly built strategy."""
    from flwr.common import ndarrays_to_parameters

    for key, arrays in state.items():
        if key == "initial_parameters":
            strategy.initial_parameters = ndarrays_to_parameters(list(arrays))
        elif key in _STATE_ATTRS:
            setattr(strategy, key, [np.array(a) for a in arrays])


@contextlib.contextmanager
def legacy_rounds(
    grid: Grid, context: Context, strategy: Any, num_rounds: int, node_order: Callable[[int], int] | None
) -> Iterator[Any]:
    """Flower's ``LegacyContext`` for ``strategy``, with connected nodes registered in an
    ``OrderedClientManager`` by Flower's own thread while the block runs."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.app_utils import start_update_client_manager_thread

    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=num_rounds),
        strategy=strategy,
        client_manager=OrderedClientManager(node_order),
    )
    thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
    try:
        registered.wait()
        # The thread first registers nodes after a 5 s sleep; the client manager's wrapped
        # ``num_available`` registers the connected ones now, so round 1 does not wait for it.
        legacy.client_manager.num_available()
        yield legacy
    finally:
        stop.set()
        thread.join()


def start_rounds(legacy: Any, arrays: list[np.ndarray]) -> Callable[[int], None]:
    """Put the global parameters where Flower's fit workflows read them; returns the function
    that sets the current round before each one."""
    from flwr.app import ConfigRecord
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), keep_input=True
    )
    config = ConfigRecord()
    config[Key.START_TIME] = time.time()
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = config

    def set_round(server_round: int) -> None:
        config[Key.CURRENT_ROUND] = server_round

    return set_round


def fit_workflow(secagg: dict[str, Any] | None) -> Callable[[Grid, Any], None]:
    """Flower's fit workflow of one round: ``SecAggPlusWorkflow(**secagg)``, or the plain one."""
    if secagg is None:
        from flwr.server.workflow.default_workflows import default_fit_workflow

        return default_fit_workflow
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(**secagg)
