"""DPO training speed: fedpal's ``LocalTrainer`` side by side with TRL's ``DPOTrainer`` + peft.

``python -m fedpal.simulations.benchmarks.training [--model default|tiny]`` trains the
same LoRA (same rank and target modules) on the same preference pairs, with the same
batch size, sequence limit, step count, learning rate, beta and device, and reports
pairs/second (pairs processed, including the cached reference pass for fedpal and
TRL's dataset preparation, from constructing the trainer to the end of training):

- fedpal: reference log-probs computed once per pair by switching the adapter off;
- TRL: ``DPOTrainer(peft_config=...)``, reference re-run every step with adapters
  disabled (its default);
- TRL precomputed: the same with ``precompute_ref_log_probs=True`` (TRL's own cached
  reference), which is the fair like-for-like comparison.

TRL's ``gradient_checkpointing`` (on by default) is turned off and its learning-rate
schedule set to constant so both run the same arithmetic per step. After one untimed
warm-up step of each, runs alternate (order reversed every other repeat) and each figure
is the median over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone

TOPICS = (
    "a weekend trip to the mountains",
    "learning to cook rice",
    "a morning routine",
    "saving money each month",
    "starting a garden",
    "writing a cover letter",
    "sleeping better",
    "a team meeting agenda",
    "learning python",
    "a healthy lunch",
    "reading more books",
    "training for a 5k run",
)


def style_pairs(n: int) -> list:
    """Pairs whose chosen reply is a bullet list and rejected the same points as prose."""
    from fedpal.common.types import PreferencePair

    pairs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        points = [f"start small with {topic}", f"plan {topic} ahead of time", f"ask a friend about {topic}"]
        pairs.append(
            PreferencePair(
                prompt=f"Give me some advice about {topic} (variant {i}).",
                chosen="Here are some tips:\n" + "\n".join(f"- {p.capitalize()}." for p in points),
                rejected="Here are some tips. " + " ".join(f"{p.capitalize()}." for p in points),
            )
        )
    return pairs


def _fedpal(model: str, pairs, args) -> dict:
    import torch

    from fedpal.client.trainer import LocalTrainer, TrainConfig
    from fedpal.common.adapters import SHARED, AdapterConfig, attach_adapters
    from fedpal.common.models import load_base_model

    base = load_base_model(model, device=args.device)
    peft_model = attach_adapters(base.model, AdapterConfig(rank=args.rank, alpha=2.0 * args.rank))
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    trainer = LocalTrainer(
        base,
        peft_model,
        TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            learning_rate=args.learning_rate,
            beta=args.beta,
            seed=args.seed,
            checkpoint_every=0,
        ),
    )
    result = trainer.train(SHARED, pairs, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "loss_last": result.loss_last, "device": result.device}


def _trl(model: str, pairs, args, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from fedpal.common.adapters import AdapterConfig
    from fedpal.common.models import load_base_model

    base = load_base_model(model, device=args.device)
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p.prompt}],
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for p in pairs
        ]
    )
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.learning_rate,
            beta=args.beta,
            max_length=args.max_length,
            lr_scheduler_type="constant",
            gradient_checkpointing=False,
            precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=args.batch_size,
            use_cpu=base.device.type == "cpu",
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=args.seed,
            dataloader_num_workers=0,
        )
        start = time.perf_counter()
        trainer = DPOTrainer(
            model=base.model,
            args=config,
            train_dataset=dataset,
            processing_class=base.tokenizer,
            peft_config=AdapterConfig(rank=args.rank, alpha=2.0 * args.rank).lora_config(),
        )
        trainer.train()
        seconds = time.perf_counter() - start
    # TRL's train_loss is the mean over all steps; the last step's loss is what fedpal reports
    last = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1]
    return {"seconds": seconds, "loss_last": float(last), "device": str(base.device)}


def _warm_up(args: argparse.Namespace, pairs) -> None:
    """One untimed step of each trainer: lazy imports, file cache and thread pools
    would otherwise be charged to whichever runs first."""
    short = argparse.Namespace(**{**vars(args), "steps": 1})
    _fedpal(args.model, pairs[: args.batch_size], short)
    _trl(args.model, pairs[: args.batch_size], short, precompute=True)


def run(args: argparse.Namespace) -> dict:
    """Alternate the three trainers ``repeats`` times; medians of pairs/second."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = style_pairs(args.pairs)
    runners = {
        "fedpal": lambda: _fedpal(args.model, pairs, args),
        "trl": lambda: _trl(args.model, pairs, args, precompute=False),
        "trl_precomputed": lambda: _trl(args.model, pairs, args, precompute=True),
    }
    _warm_up(args, pairs)
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
        for name in order:
            runs[name].append(runners[name]())
    processed = args.steps * args.batch_size
    figures = {}
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        figures[name] = {
            "pairs_per_s": processed / seconds,
            "seconds": seconds,
            "all_seconds": [round(r["seconds"], 2) for r in results],
            "loss_last": results[-1]["loss_last"],
            "device": results[-1]["device"],
        }
    return {
        "model": args.model,
        "pairs": args.pairs,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": figures,
        "ratio_vs_trl": figures["fedpal"]["pairs_per_s"] / figures["trl"]["pairs_per_s"],
        "ratio_vs_trl_precomputed": figures["fedpal"]["pairs_per_s"] / figures["trl_precomputed"]["pairs_per_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default', 'tiny' or a model folder")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="16 x 4 = two passes over 32 pairs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device; default cuda if available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (same for all runs)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(
        f"DPO training, {report['model']} on {report['results']['fedpal']['device']} "
        f"({report['threads']} threads), {report['pairs']} pairs, {report['steps']} steps x "
        f"{report['batch_size']} pairs, max {report['max_length']} tokens, LoRA r={report['rank']}, "
        f"median of {report['repeats']} ({report['date']})"
    )
    for name, fig in report["results"].items():
        print(
            f"  {name:<16} {fig['pairs_per_s']:8.2f} pairs/s  {fig['seconds']:8.2f} s  final loss "
            f"{fig['loss_last']:.4f}"
        )
    print(
        f"  fedpal / TRL: {report['ratio_vs_trl']:.2f}x   fedpal / TRL precomputed: "
        f"{report['ratio_vs_trl_precomputed']:.2f}x"
    )
    return report


if __name__ == "__main__":
    main()
