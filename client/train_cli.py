"""``fedpal train``: turn a client's preference memory into its adapters, on its own device."""

from __future__ import annotations

import json
from pathlib import Path

import typer

ADAPTER_CHOICES = ("personal", "shared", "both")


def train(
    home: Path = typer.Option(..., help="The client's home folder (memory, adapters, checkpoints)."),
    model: str = typer.Option("default", help="'default', 'tiny', a local folder or a hub id."),
    adapter: str = typer.Option("personal", help="Which adapter to train: personal, shared or both (shared first)."),
    steps: int = typer.Option(30, min=1, help="Optimizer steps per adapter."),
    objective: str = typer.Option("dpo", help="dpo (pairs), sft (examples and chosen replies) or both."),
    learning_rate: float = typer.Option(5e-4, help="AdamW learning rate."),
    beta: float = typer.Option(0.1, help="DPO beta (strength of the pull towards the reference)."),
    batch_size: int = typer.Option(None, min=1, help="Pairs per step; default: from the device profile."),
    max_length: int = typer.Option(None, min=8, help="Tokens per sequence; default: from the device profile."),
    rank: int = typer.Option(None, min=1, help="LoRA rank for new adapters; saved adapters keep theirs."),
    seed: int = typer.Option(0, help="Same seed, same data, same device: same adapter."),
    retrieval: bool = typer.Option(
        False, "--retrieval", help="Train with the stated preferences in context, as `fedpal generate --retrieval` answers."
    ),
    retrieval_in: str = typer.Option("prompt", "--retrieval-in", help="Where they go: prompt or system (as for generate)."),
    time_budget: float = typer.Option(None, min=0.001, help="Stop after this many seconds (per adapter)."),
    device: str = typer.Option(None, help="torch device; default: cuda if available, else cpu."),
    passphrase: str = typer.Option(None, envvar="FEDPAL_PASSPHRASE", help="Memory passphrase (or the OS keyring)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary line instead of text."),
) -> None:
    """Train the personal and/or shared adapter on the memory's pairs and save it in the home folder."""
    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PreferenceMemory
    from fedpal.client.trainer import NO_PAIRS, OBJECTIVES, LocalTrainer, TrainConfig
    from fedpal.common.adapters import PERSONAL, SHARED, AdapterConfig, attach_adapters, load_adapter, save_adapter
    from fedpal.common.errors import FedpalError
    from fedpal.common.models import load_base_model

    if adapter not in ADAPTER_CHOICES:
        raise FedpalError(f"--adapter must be one of {', '.join(ADAPTER_CHOICES)}, not '{adapter}'")
    if objective not in OBJECTIVES:
        raise FedpalError(f"--objective must be one of {', '.join(OBJECTIVES)}, not '{objective}'")
    client = ClientHome.at(home)
    with PreferenceMemory.open(client.root, passphrase=passphrase) as memory:
        pairs = memory.preference_pairs()
        examples = memory.sft_examples() if objective != "dpo" else []
        if retrieval:
            pairs, examples = memory.in_context(pairs, retrieval_in), memory.in_context(examples, retrieval_in)
    config = TrainConfig(
        objective=objective, steps=steps, learning_rate=learning_rate, beta=beta, batch_size=batch_size,
        max_length=max_length, seed=seed, time_budget_s=time_budget,
    )
    config.validate()
    if objective != "sft" and not pairs:
        raise FedpalError(f"{NO_PAIRS}; memory at {client.root}")

    base = load_base_model(model, device=device)
    adapter_config = _saved_adapter_config(client) or AdapterConfig(
        **({"rank": rank, "alpha": 2.0 * rank} if rank else {})
    )
    peft_model = attach_adapters(base.model, adapter_config)
    for name in (SHARED, PERSONAL):
        if (client.adapter_dir(name) / "adapter_config.json").is_file():
            load_adapter(peft_model, name, client.adapter_dir(name))

    plan = {"shared": [(SHARED, [])], "personal": [(PERSONAL, [SHARED])],
            "both": [(SHARED, []), (PERSONAL, [SHARED])]}[adapter]
    trainer = LocalTrainer(base, peft_model, config, checkpoint_dir=client.training)
    runs = []
    for name, reference in plan:
        result = trainer.train(name, pairs, examples, reference_adapters=reference, progress=not as_json)
        directory = save_adapter(peft_model, name, client.adapter_dir(name))
        runs.append({**result.to_dict(), "adapter_dir": str(directory)})

    summary = {
        "pairs": len(pairs),
        "examples": len(examples),
        "steps": sum(r["steps"] for r in runs),
        "device": runs[-1]["device"],
        "loss_first": runs[0]["loss_first"],
        "loss_last": runs[-1]["loss_last"],
        "seconds": round(sum(r["seconds"] for r in runs), 3),
        "adapter_dir": runs[-1]["adapter_dir"],
        "stopped": runs[-1]["stopped"],
        "model": str(base.path),
        "runs": runs,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for run in runs:
        typer.echo(
            f"{run['adapter']}: {run['steps']} steps on {run['pairs']} pairs ({run['device']}, {run['seconds']:.1f}s), "
            f"loss {run['loss_first']:.4f} -> {run['loss_last']:.4f}, "
            f"reward margin {run['reward_margin_first']:.3f} -> {run['reward_margin_last']:.3f}, "
            f"stopped: {run['stopped']}; saved to {run['adapter_dir']}"
        )
        if run["note"]:
            typer.echo(f"  note: {run['note']}")


def _saved_adapter_config(client):
    """The LoRA settings of an adapter already in the home folder: new ones must match them."""
    from fedpal.common.adapters import ADAPTER_NAMES, FEDPAL_FILE, AdapterConfig
    from fedpal.common.errors import FedpalError

    for name in ADAPTER_NAMES:
        path = client.adapter_dir(name) / FEDPAL_FILE
        if path.is_file():
            try:
                return AdapterConfig.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError) as err:
                raise FedpalError(f"corrupt adapter settings {path}: {err}") from None
    return None
