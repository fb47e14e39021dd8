"""``fedpal bench train``: DPO training speed, fedpal's ``LocalTrainer`` beside TRL's ``DPOTrainer`` + peft.

The three contenders train the same LoRA (same rank, alpha and target modules) on the same
preference pairs, with the same batch size, sequence limit, step count, learning rate, beta,
seed and device, starting from the same base weights:

- fedpal: ``LocalTrainer`` (DPO); the reference log-probs are computed once per pair
  (adapter off) before the first step; a pair's chosen and rejected replies share one copy
  of their prompt in one forward pass;
- TRL: ``DPOTrainer(peft_config=...)``, the reference re-run every step with the adapter
  disabled (its default);
- TRL precomputed: the same with ``precompute_ref_log_probs=True`` (TRL's own cached
  reference), the like-for-like comparison.

A repeat is one whole run, timed from constructing the trainer to the end of training
(fedpal's reference pass, TRL's dataset preparation and precomputation included); its
figure is pairs/s (steps x batch size over the seconds). Where the time goes is taken
from the same runs: "setup" is what comes before the first step (encoding, reference
log-probs), "per step" the mean of the steps after the first. The contenders alternate
(``interleaved``) after one untimed one-step warm-up of each.
"""

from __future__ import annotations

import copy
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fedpal.simulations.benchmarks.core import BenchReport, Spread, benchmark, interleaved, on_this_machine

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
CONTENDERS = ("fedpal", "trl", "trl_precomputed")
LABELS = {
    "fedpal": "fedpal LocalTrainer",
    "trl": "TRL DPOTrainer",
    "trl_precomputed": "TRL DPOTrainer, precomputed ref",
}
BASELINE = "trl"
COLUMNS = ["trainer", "pairs/s", "vs TRL DPOTrainer", "setup s", "per step s", "last loss"]


@dataclass(frozen=True)
class Settings:
    """One benchmark's sizes; both sides get the same ones."""

    model: str = "default"
    pairs: int = 32
    steps: int = 16
    batch_size: int = 4
    max_length: int = 128
    rank: int = 8
    learning_rate: float = 5e-4
    beta: float = 0.1
    seed: int = 0
    repeats: int = 5
    device: str | None = None

    @classmethod
    def of(cls, quick: bool) -> "Settings":
        """The full run (16 steps x 4 = two passes over 32 pairs, SmolLM2-135M), or the tiny smoke test."""
        if quick:
            return cls(model="tiny", pairs=8, steps=4, batch_size=4, max_length=64, repeats=2)
        return cls()


@dataclass(frozen=True)
class Run:
    """One timed training run of one contender."""

    seconds: float
    setup_s: float
    step_s: float
    loss_last: float
    device: str


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


class _Clock:
    """Times of the end of each step, for the setup / per-step split."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.step_ends: list[float] = []

    def step_done(self) -> None:
        self.step_ends.append(time.perf_counter())

    def run(self, loss_last: float, device: str) -> Run:
        end = time.perf_counter()
        ends = self.step_ends or [end]
        # the first step's own cost is taken to be that of the later ones
        step_s = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0] - self.start
        setup_s = max(ends[0] - self.start - step_s, 0.0)
        return Run(end - self.start, setup_s, step_s, loss_last, device)


def fedpal_run(base, pairs: list, s: Settings) -> Run:
    """fedpal's ``LocalTrainer`` on a fresh copy of ``base``."""
    import torch

    from fedpal.client.trainer import LocalTrainer, TrainConfig
    from fedpal.common.adapters import SHARED, AdapterConfig, attach_adapters

    model = copy.deepcopy(base.model)
    peft_model = attach_adapters(model, AdapterConfig(rank=s.rank, alpha=2.0 * s.rank, init_seed=s.seed))
    torch.manual_seed(s.seed)
    clock = _Clock()
    trainer = LocalTrainer(
        replace(base, model=model),
        peft_model,
        TrainConfig(
            steps=s.steps,
            batch_size=s.batch_size,
            max_length=s.max_length,
            learning_rate=s.learning_rate,
            beta=s.beta,
            seed=s.seed,
            checkpoint_every=0,
        ),
    )
    result = trainer.train(SHARED, pairs, progress=False, callback=lambda step, loss: clock.step_done())
    return clock.run(result.loss_last, result.device)


def trl_run(base, pairs: list, s: Settings, precompute: bool) -> Run:
    """TRL's ``DPOTrainer`` with a peft LoRA on a fresh copy of ``base``."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from fedpal.common.adapters import AdapterConfig

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
    model = copy.deepcopy(base.model)
    torch.manual_seed(s.seed)

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done()

    with tempfile.TemporaryDirectory(prefix="fedpal-bench-train-") as out, _quiet():
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=s.batch_size,
            max_steps=s.steps,
            learning_rate=s.learning_rate,
            beta=s.beta,
            max_length=s.max_length,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            gradient_checkpointing=False,
            precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=s.batch_size,
            use_cpu=base.device.type == "cpu",
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=s.seed,
            dataloader_num_workers=0,
        )
        clock = _Clock()
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=base.tokenizer,
            peft_config=AdapterConfig(rank=s.rank, alpha=2.0 * s.rank).lora_config(),
            callbacks=[StepClock()],
        )
        for printer in (PrinterCallback, ProgressCallback):  # they print every log line to stdout
            trainer.remove_callback(printer)
        try:
            trainer.train()
            run = clock.run(0.0, str(base.device))
        finally:
            # TRL caches precomputed reference log-probs in a file keyed by the dataset's and the
            # model's fingerprints (the same in every repeat): remove it so no run reuses another's
            for cached in trainer.train_dataset.cache_files:
                Path(cached["filename"]).unlink(missing_ok=True)
    # TRL's train_loss is the mean over all steps; the last step's loss is what fedpal reports
    last = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1]
    return replace(run, loss_last=float(last))


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from ``datasets`` (its map calls) or TRL's reference precomputation."""
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    previous = os.environ.get("TQDM_DISABLE")
    datasets.utils.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _trl_precision() -> str:
    """What TRL's ``DPOConfig`` defaults to for mixed precision here (it is left at its default)."""
    from trl import DPOConfig

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, use_cpu=True, report_to="none")
    return "bf16 autocast" if config.bf16 else "fp16 autocast" if config.fp16 else "fp32"


def measure(s: Settings) -> tuple[dict[str, Spread], dict[str, list[Run]]]:
    """Warm up each contender with one step, then interleave ``s.repeats`` whole runs of each."""
    from transformers.utils import logging as hf_logging

    from fedpal.common.models import load_base_model

    hf_logging.set_verbosity_error()
    base = load_base_model(s.model, device=s.device)
    pairs = style_pairs(s.pairs)
    runs: dict[str, list[Run]] = {name: [] for name in CONTENDERS}
    makers: dict[str, Callable[[list, Settings], Run]] = {
        "fedpal": lambda data, settings: fedpal_run(base, data, settings),
        "trl": lambda data, settings: trl_run(base, data, settings, precompute=False),
        "trl_precomputed": lambda data, settings: trl_run(base, data, settings, precompute=True),
    }
    # lazy imports, file cache and thread pools would otherwise be charged to whichever runs first
    for name in CONTENDERS:
        makers[name](pairs[: s.batch_size], replace(s, steps=1, pairs=s.batch_size))

    def contender(name: str) -> Callable[[], float]:
        def once() -> float:
            run = makers[name](pairs, s)
            gc.collect()  # the last run's model copy, before the next one allocates its own
            runs[name].append(run)
            return s.steps * s.batch_size / run.seconds

        return once

    spreads = interleaved({name: contender(name) for name in CONTENDERS}, s.repeats)
    return spreads, runs


@benchmark("train", help="DPO training speed (pairs/s): fedpal's LocalTrainer vs TRL's DPOTrainer + peft.")
def run(quick: bool) -> BenchReport:
    import torch

    s = Settings.of(quick)
    started = time.perf_counter()
    with on_this_machine() as machine:
        spreads, runs = measure(s)
        report_machine = machine()
    threads = torch.get_num_threads()
    baseline = spreads[BASELINE]
    rows, figures = [], {}
    for name in CONTENDERS:
        setup = Spread.of([r.setup_s for r in runs[name]])
        step = Spread.of([r.step_s for r in runs[name]])
        ratio = spreads[name].ratio(baseline)
        rows.append(
            [
                LABELS[name],
                spreads[name].show(2),
                f"{ratio:.2f}x",
                setup.show(1),
                step.show(2),
                f"{runs[name][-1].loss_last:.4f}",
            ]
        )
        figures[name] = {
            "pairs_per_s": asdict(spreads[name]),
            "ratio_vs_trl": round(ratio, 3),
            "seconds": asdict(Spread.of([r.seconds for r in runs[name]])),
            "setup_s": asdict(setup),
            "step_s": asdict(step),
            "loss_last": runs[name][-1].loss_last,
            "device": runs[name][-1].device,
        }
    figures["ratio_fedpal_vs_trl"] = round(spreads["fedpal"].ratio(baseline), 3)
    figures["ratio_fedpal_vs_trl_precomputed"] = round(spreads["fedpal"].ratio(spreads["trl_precomputed"]), 3)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    device = runs["fedpal"][-1].device
    notes = [
        f"Median (min-max) of {s.repeats} whole runs per trainer, interleaved (order reversed every other round) "
        "after a one-step warm-up of each; a run is timed from constructing the trainer to the end of training.",
        f"Same for all: {s.model} model on {device} ({threads} torch threads), {s.pairs} pairs, {s.steps} steps x "
        f"{s.batch_size} pairs, max {s.max_length} tokens, LoRA r={s.rank} alpha={2 * s.rank} on q/k/v/o_proj, "
        f"AdamW lr {s.learning_rate:g} constant, beta {s.beta:g}, gradient clipping at 1.0, seed {s.seed}.",
        "TRL: gradient checkpointing off (its DPOConfig turns it on: slower) and a constant learning rate, as fedpal; "
        f"mixed precision left at its default ({_trl_precision()} on this device); fedpal trains in fp32 on CPU. "
        "TRL keeps precomputed reference log-probs in a file keyed by the data and the starting weights; it is "
        "deleted after each run, so no repeat reuses another's.",
        f"Trainers: {LABELS['fedpal']} (DPO, reference log-probs computed once per pair with the adapter off, a "
        f"pair's replies sharing one prompt row); {LABELS['trl']} with peft_config (reference re-run each step with "
        f"the adapter disabled, its default); {LABELS['trl_precomputed']}: precompute_ref_log_probs=True.",
        "setup: what comes before the first step (tokenization; fedpal's and TRL-precomputed's reference pass); "
        "per step: mean of the steps after the first (TRL without precomputation runs its reference forward "
        "in every step). last loss: the last step's DPO loss (each trainer initialises the LoRA and orders "
        "the batches its own way).",
    ]
    if quick:
        notes.append("Quick run: tiny model and few steps; a smoke test, not a measurement.")
    return BenchReport(
        name="train",
        title="DPO training speed: fedpal vs TRL DPOTrainer (pairs/s)",
        machine=report_machine,
        settings={
            "quick": quick,
            "model": s.model,
            "pairs": s.pairs,
            "steps": s.steps,
            "batch": s.batch_size,
            "max length": s.max_length,
            "rank": s.rank,
            "repeats": s.repeats,
        },
        columns=COLUMNS,
        rows=rows,
        figures=figures,
        notes=notes,
    )
