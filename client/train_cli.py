"""``fedpal train``: turn a client's preference memory into its adapters, on its own device.

Everything that can be checked without the model is checked first (the options, the
home, the memory's passphrase and whether it holds anything to learn from), so a mistake
is reported in a second instead of after the model has loaded.
"""

from __future__ import annotations

import json

import typer

from fedpal.client.cli_common import PASSPHRASE_FILE, choices, home_option, plain, read_passphrase
from fedpal.client.personalize import DEFAULT_TRAIN, HOLDOUT
from fedpal.client.trainer import OBJECTIVES
from fedpal.common.generation import PLACEMENTS

ADAPTER_CHOICES = ("personal", "shared", "both")
Adapter = choices("Adapter", ADAPTER_CHOICES)
Objective = choices("Objective", OBJECTIVES)
Placement = choices("Placement", PLACEMENTS)
ADD_HINT = (
    "`fedpal memory add pair PROMPT CHOSEN REJECTED`, `fedpal memory import FILE`, or /rate and /pick in `fedpal chat`"
)


def train(
    home: str = home_option("The client's home folder (memory, adapters, checkpoints)."),
    model: str = typer.Option("default", help="'default', 'tiny', a local folder or a hub id."),
    adapter: Adapter = typer.Option(
        "personal", help="Which adapter to train: personal, shared or both (shared first)."
    ),
    steps: int = typer.Option(
        DEFAULT_TRAIN.steps,
        min=1,
        help="Most optimizer steps per adapter; training stops earlier once held-out pairs stop improving.",
    ),
    objective: Objective = typer.Option(
        DEFAULT_TRAIN.objective,
        help="both (DPO + SFT on the chosen replies), dpo (pairs only) or sft (examples and chosen replies).",
    ),
    learning_rate: float = typer.Option(DEFAULT_TRAIN.learning_rate, help="AdamW learning rate."),
    beta: float = typer.Option(DEFAULT_TRAIN.beta, help="DPO beta (strength of the pull towards the reference)."),
    batch_size: int = typer.Option(None, min=1, help="Pairs per step; default: from the device profile."),
    max_length: int = typer.Option(None, min=8, help="Tokens per sequence; default: from the device profile."),
    rank: int = typer.Option(None, min=1, help="LoRA rank for new adapters; saved adapters keep theirs."),
    seed: int = typer.Option(0, help="Same seed, same data, same device: same adapter."),
    holdout: float = typer.Option(
        HOLDOUT,
        min=0.0,
        max=0.9,
        help="Share of prompts held out to stop training on and to judge the new adapter (0: none).",
    ),
    guard: bool = typer.Option(
        True,
        "--guard/--no-guard",
        help="Refuse an adapter whose probe replies degenerate (repetition, length, fluency).",
    ),
    retrieval: bool = typer.Option(
        False,
        "--retrieval",
        help="Train with the stated preferences in context, as `fedpal generate --retrieval` answers.",
    ),
    retrieval_in: Placement = typer.Option(
        "prompt", "--retrieval-in", help="Where they go: after the request or in the system message (as for generate)."
    ),
    time_budget: float = typer.Option(None, min=0.001, help="Stop after this many seconds (per adapter)."),
    device: str = typer.Option(None, help="torch device; default: cuda if available, else cpu."),
    passphrase: str = typer.Option(
        None,
        envvar="FEDPAL_PASSPHRASE",
        show_envvar=True,
        help="Memory passphrase (or the OS keyring); --passphrase-file keeps it off the command line.",
    ),
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary line instead of text."),
) -> None:
    """Train the personal and/or shared adapter on the memory and activate it only if it helps.

    Part of the user's prompts is held out: training stops when their pairs stop improving,
    and the new adapter replaces the saved one only if it ranks them better and its replies
    to a few probe prompts stay fluent. Otherwise it is kept aside and the previous one serves.
    """
    from dataclasses import replace

    from fedpal.client.guard import GuardConfig
    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PreferenceMemory
    from fedpal.client.personalize import Personalizer, TrainingData
    from fedpal.common.adapters import PERSONAL, SHARED, attach_adapters, load_adapter
    from fedpal.common.errors import FedpalError
    from fedpal.common.models import load_base_model, resolve_device

    adapter, objective, retrieval_in = plain(adapter), plain(objective), plain(retrieval_in)
    config = replace(
        DEFAULT_TRAIN,
        objective=objective,
        steps=steps,
        learning_rate=learning_rate,
        beta=beta,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        time_budget_s=time_budget,
    )
    config.validate()
    client = ClientHome.existing(home).writable()
    adapter_config = client.adapter_config(rank)
    resolve_device(device)
    source = PreferenceMemory.key_source(client.root)
    if source is None:
        raise FedpalError(f"no preference memory in {client.root} to train on; add pairs with {ADD_HINT}")
    passphrase = read_passphrase(passphrase, passphrase_file, ask=source == "passphrase")
    with PreferenceMemory.open(client.root, passphrase=passphrase) as memory:
        data = TrainingData.from_memory(memory, retrieval_in if retrieval else None, holdout)
    if not (data.pairs or (objective == "sft" and data.examples)):
        if data.heldout:
            raise FedpalError(
                f"--holdout {holdout:g} holds out every prompt of the memory, leaving nothing to train "
                "on; lower --holdout or add pairs for more prompts"
            )
        if objective == "sft":
            raise FedpalError(
                f"nothing to train on in the memory at {client.root}: SFT needs pairs or replies rated "
                f"4-5; add some with {ADD_HINT}"
            )
        raise FedpalError(f"no preference pairs to train on in the memory at {client.root}; add some with {ADD_HINT}")
    if objective == "dpo":
        data = replace(data, examples=())

    base = load_base_model(model, device=device)
    peft_model = attach_adapters(base.model, adapter_config)
    for name in (SHARED, PERSONAL):
        if (client.adapter_dir(name) / "adapter_config.json").is_file():
            load_adapter(peft_model, name, client.adapter_dir(name))

    plan = {"shared": [(SHARED, [])], "personal": [(PERSONAL, [SHARED])], "both": [(SHARED, []), (PERSONAL, [SHARED])]}[
        adapter
    ]
    personalizer = Personalizer(base, peft_model, client, config, guard=GuardConfig() if guard else None)
    outcomes = [personalizer.train(name, data, reference, progress=not as_json) for name, reference in plan]
    limit = outcomes[-1].train.max_length
    cut = _cut_sequences(base.tokenizer, data, limit)
    if cut:
        typer.echo(
            f"warning: {cut} training sequence(s) were longer than the {limit}-token limit and were cut "
            "(the prompt loses its start first); raise --max-length to keep them whole",
            err=True,
        )

    if as_json:
        runs = [o.train for o in outcomes]
        summary = {
            "pairs": len(data.pairs) + len(data.heldout),
            "heldout_pairs": len(data.heldout),
            "examples": len(data.examples),
            "steps": sum(r.steps for r in runs),
            "device": runs[-1].device,
            "loss_first": runs[0].loss_first,
            "loss_last": runs[-1].loss_last,
            "seconds": round(sum(r.seconds for r in runs), 3),
            "activated": all(o.activated for o in outcomes),
            "heldout_accuracy_before": runs[-1].heldout_accuracy_first,
            "heldout_accuracy_after": runs[-1].heldout_accuracy_best,
            "guard": outcomes[-1].guard.to_dict() if outcomes[-1].guard else None,
            "adapter_dir": outcomes[-1].adapter_dir,
            "model": str(base.path),
            "cut_sequences": cut,
            "runs": [o.to_dict() for o in outcomes],
        }
        typer.echo(json.dumps(summary))
        return
    for outcome in outcomes:
        typer.echo(outcome.line())


def _cut_sequences(tokenizer, data, limit: int) -> int:
    """How many training sequences (prompt in the chat template, reply, end token) exceed ``limit`` tokens."""
    from fedpal.common.generation import chat_input_ids

    if limit <= 0:
        return 0
    lengths: dict[tuple[str, str | None], int] = {}

    def too_long(prompt: str, system: str | None, reply: str) -> bool:
        if (prompt, system) not in lengths:
            lengths[(prompt, system)] = len(chat_input_ids(tokenizer, prompt, system))
        return lengths[(prompt, system)] + len(tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1 > limit

    cut = sum(
        too_long(p.prompt, p.system, reply) for p in data.pairs + data.heldout for reply in (p.chosen, p.rejected)
    )
    return cut + sum(too_long(e.prompt, e.system, e.response) for e in data.examples)
