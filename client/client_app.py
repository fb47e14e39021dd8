"""The fedpal ClientApp: train on this node's own memory, send back only the shared adapter.

Each round the node receives the global shared adapter (and keeps it in its home
folder), trains it on the preference memory there, then trains its personal adapter on
top of the global one and keeps that on disk too, next to the memory. The reply carries the shared adapter's
tensors in the order
they came, a fingerprint of their names and shapes, and numbers (examples, losses,
seconds, bytes): never the personal adapter and never memory text. After the last
round the server sends the final global adapter in an "evaluate" message, which the
node saves the same way, training nothing.

The mods are Flower's (``secaggplus_mod``, ``fixedclipping_mod``) behind small guards
that run them only when the server asked for them, because both raise on rounds
configured without SecAgg+ or DP; plus ``half_precision_mod``, which casts the clipped
reply to fp16 (Flower has no such mod).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from fedpal.common.errors import FedpalError
from fedpal.common.settings import FederationSettings

if TYPE_CHECKING:
    from fedpal.client.home import ClientHome

log = logging.getLogger("fedpal.client")

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]

# One base model per process and model name: Ray reuses its actors across rounds, and
# reloading the model every round would dominate a small client's round time.
_MODELS: dict[tuple, Any] = {}


def node_home(context: Context, settings: FederationSettings) -> Path:
    """This node's home folder: node config ``home``, else ``<home-base>/<partition-id>``."""
    from fedpal.common.config import fedpal_home

    node_config = dict(context.node_config)
    if node_config.get("home"):
        return Path(str(node_config["home"])).expanduser()
    if "partition-id" in node_config:
        base = settings.home_base or str(fedpal_home() / "nodes")
        return Path(base).expanduser() / str(node_config["partition-id"])
    raise FedpalError("this node has no home folder: start the SuperNode with --node-config \"home='/path/to/home'\"")


def node_model(settings: FederationSettings) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """The cached base model, its peft wrapper and the personal adapter's initial tensors."""
    from fedpal.common.adapters import PERSONAL, AdapterConfig, adapter_to_arrays, attach_adapters
    from fedpal.common.models import load_base_model

    adapters = AdapterConfig.from_settings(settings)
    key = (settings.model, adapters)
    if key not in _MODELS:
        _MODELS.clear()
        base = load_base_model(settings.model)
        peft = attach_adapters(base.model, adapters)
        _MODELS[key] = (base, peft, adapter_to_arrays(peft, PERSONAL, "AB"))
    return _MODELS[key]


class FedpalClient(NumPyClient):
    """One user's node for one message: load, train, reply."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        from fedpal.client.agent import record_round
        from fedpal.client.guard import GuardConfig
        from fedpal.client.home import ClientHome
        from fedpal.client.memory import PreferenceMemory
        from fedpal.client.personalize import HOLDOUT, Personalizer, TrainingData
        from fedpal.client.trainer import TrainConfig
        from fedpal.common.adapters import (
            FINGERPRINT_KEY,
            PERSONAL,
            SHARED,
            adapter_fingerprint,
            adapter_to_arrays,
            arrays_to_adapter,
            load_adapter,
        )
        from fedpal.common.privacy import PrivacySpent

        started = time.perf_counter()
        settings = FederationSettings.from_message(config)
        server_round = int(config["round"])
        home = ClientHome.at(node_home(self.context, settings))
        # personal-guard: the personal adapter replaces the saved one only if it ranks
        # held-out pairs better and passes the degeneration guard; off, it trains on all
        # pairs and is always kept
        checked = settings.personal_guard
        holdout = HOLDOUT if checked else 0.0
        with PreferenceMemory.open(home.root) as memory:
            # the shared adapter learns what everyone likes from bare prompts; the personal
            # one, optionally, in the context this user's replies are generated in
            shared_data = TrainingData.from_memory(memory, holdout=holdout)
            context = settings.preferences_in if settings.train_with_preferences else None
            personal_data = TrainingData.from_memory(memory, context, holdout) if context else shared_data
        base, peft, fresh_personal = node_model(settings)
        parts = "B" if settings.ffa_lora else "AB"
        received = install_global(peft, home, parameters, settings)
        record_round(home.root, "joined", server_round, spent=PrivacySpent.from_config(config))
        personal_dir = home.adapter_dir(PERSONAL)
        if personal_dir.is_dir():
            load_adapter(peft, PERSONAL, personal_dir)
        else:  # this process may have served another node before: start from the fresh init
            arrays_to_adapter(peft, PERSONAL, fresh_personal, "AB")

        partition = int(self.context.node_config.get("partition-id", 0))
        node_seed = training_seed(settings.seed, server_round, partition)
        # Flower's FedProx adds proximal_mu to the round's config
        train = TrainConfig.for_federation(settings, proximal_mu=float(config.get("proximal_mu", 0.0)))
        personalizer = Personalizer(
            base, peft, home, train, guard=GuardConfig() if checked else None, checkpoints=False
        )
        # The shared adapter trains alone (personal off) so its update depends only on
        # the global adapter and this node's data, never on personal state.
        shared = personalizer.train_update(SHARED, shared_data, node_seed, steps=settings.local_steps)
        update = adapter_to_arrays(peft, SHARED, parts, dtype=np.float32)
        for name, array in update.items():
            if not np.all(np.isfinite(array)):
                raise FedpalError(f"local training produced non-finite values in {name}; not sending this update")
        if settings.personal_steps > 0:
            # the personal adapter learns on top of the global shared one, as used at inference;
            # it replaces the saved one only if it ranks held-out pairs better and stays fluent
            arrays_to_adapter(peft, SHARED, received, parts)
            outcome = personalizer.train(
                PERSONAL,
                personal_data,
                reference_adapters=(SHARED,),
                seed=node_seed + 1,
                progress=False,
                steps=settings.personal_steps,
            )
            log.info("personal adapter: %s", outcome.line())
        out = list(update.values())
        if settings.deterministic:
            # SecAgg+ quantizes this reply with stochastic rounding from numpy's global
            # generator, right after fit returns; a simulation asked to be replayable
            np.random.seed([settings.seed, server_round, partition])
        uniform = bool(config["uniform-weights"])
        metrics = {
            "examples": int(shared.pairs + shared.examples),
            "loss_first": float(shared.loss_first),
            "loss_last": float(shared.loss_last),
            "train_seconds": float(shared.seconds),
            "seconds": float(time.perf_counter() - started),
            "payload_bytes": int(sum(a.nbytes for a in out)),
            FINGERPRINT_KEY: adapter_fingerprint(update),
        }
        return out, 1 if uniform else max(metrics["examples"], 1), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        """The run's final global adapter (``final`` in the config): saved as this node's shared
        adapter, nothing trained. Every round's train message brings the adapter of the round
        before, so this is how the last round's aggregate reaches the node at all."""
        from fedpal.client.agent import record_round
        from fedpal.client.home import ClientHome
        from fedpal.common.privacy import PrivacySpent

        if not config.get("final"):
            raise FedpalError(
                "this node evaluates nothing; the server sent an evaluate message that is not the final adapter"
            )
        settings = FederationSettings.from_message(config)
        home = ClientHome.at(node_home(self.context, settings))
        _, peft, _ = node_model(settings)
        install_global(peft, home, parameters, settings)
        record_round(home.root, "final", int(config["round"]), spent=PrivacySpent.from_config(config))
        return 0.0, 0, {}


def training_seed(seed: int, server_round: int, partition: int) -> int:
    """The seed of one node's local training in one round (its personal adapter uses the next one)."""
    return seed * 1_000_003 + server_round * 7919 + partition


def install_global(
    peft: Any, home: ClientHome, parameters: list[np.ndarray], settings: FederationSettings
) -> dict[str, np.ndarray]:
    """Load the server's global shared adapter into ``peft`` and save it in ``home``; returns it by name."""
    from fedpal.common.adapters import SHARED, adapter_to_arrays, arrays_to_adapter, save_adapter

    parts = "B" if settings.ffa_lora else "AB"
    names = list(adapter_to_arrays(peft, SHARED, parts))
    if len(names) != len(parameters):
        raise FedpalError(f"the server sent {len(parameters)} tensors; this node's shared adapter has {len(names)}")
    received = dict(zip(names, parameters))
    arrays_to_adapter(peft, SHARED, received, parts)
    save_adapter(peft, SHARED, home.adapter_dir(SHARED))
    return received


def policy_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Decline a train message at once when this node's agent policy says the machine is busy.

    The reply is an error, which the server counts as a dropout; nothing is loaded or
    trained. Nodes without an agent (simulations) always train.
    """
    from flwr.app import Error

    from fedpal.client.agent import policy_verdict, record_round

    home = dict(ctxt.node_config).get("home")
    if msg.metadata.message_type != "train" or not home:
        return call_next(msg, ctxt)
    root = Path(str(home)).expanduser()
    busy = policy_verdict(root)
    if busy is None:
        return call_next(msg, ctxt)
    log.warning("declining this round: %s", busy)
    record_round(root, "declined", _fit_config(msg).get("round"), busy)
    return Message(Error(code=0, reason=f"fedpal policy: busy ({busy})"), reply_to=msg)


def when_secagg(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``secaggplus_mod``, on messages of a round the server runs with SecAgg+."""
    from flwr.client.mod import secaggplus_mod
    from fedpal.common.flower_internals import SECAGG_CONFIGS_RECORD

    if msg.has_content() and SECAGG_CONFIGS_RECORD in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def when_clipping(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``fixedclipping_mod``, on train messages that carry a clipping norm (DP on).

    Flower 1.41 divides the clipping norm by the update's norm, so a node whose update is
    exactly zero (it learned nothing this round, e.g. a tiny learning rate on a large
    adapter) would fail the round with ZeroDivisionError; a zero update needs no
    clipping and goes out as it is.
    """
    from flwr.client.mod import fixedclipping_mod
    from fedpal.common.flower_internals import KEY_CLIPPING_NORM

    if KEY_CLIPPING_NORM not in _fit_config(msg):
        return call_next(msg, ctxt)
    replies: list[Message] = []

    def trained(m: Message, c: Context) -> Message:
        replies.append(call_next(m, c))
        return replies[-1]

    try:
        return fixedclipping_mod(msg, ctxt, trained)
    except ZeroDivisionError:
        if not replies:
            raise
        return replies[-1]  # Flower failed before writing into it: the update, unclipped, is zero


def half_precision_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Cast the (already clipped) update to fp16 when the server asked for fp16 updates.

    Rounding to fp16 changes each value by at most 2^-11 of itself, so a clipped update
    may exceed C by that fraction; the server's norm check allows 1%.
    """
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    wants_fp16 = bool(_fit_config(msg).get("fp16-updates", False))
    out = call_next(msg, ctxt)
    if not wants_fp16 or out.has_error():
        return out
    fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
    fit_res.parameters = ndarrays_to_parameters(
        [a.astype(np.float16) for a in parameters_to_ndarrays(fit_res.parameters)]
    )
    out.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return out


def _fit_config(msg: Message) -> dict:
    """The FitIns config of a train message ({} for other messages and SecAgg+ key exchange)."""
    if msg.metadata.message_type != "train" or not msg.has_content():
        return {}
    record = msg.content.config_records.get("fitins.config")
    return dict(record) if record is not None else {}


def fedpal_client(context: Context) -> Any:
    """The client of a fedpal node: one user's memory, trainer and adapters."""
    return FedpalClient(context).to_client()


def make_client_app(extra_mods: Sequence[Mod] = (), client_fn: Callable[[Context], Any] = fedpal_client) -> ClientApp:
    """The fedpal ClientApp; ``extra_mods`` run outermost (e.g. to watch what leaves the node).

    ``client_fn`` builds each node's client; a privacy audit swaps in canary clients for some
    nodes, which then go through the same mods (clipping, SecAgg+) as every user's."""
    return ClientApp(
        client_fn=client_fn, mods=[*extra_mods, policy_mod, when_secagg, half_precision_mod, when_clipping]
    )


app = make_client_app()
