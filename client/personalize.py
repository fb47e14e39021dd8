"""Personalizing one user's adapters: the one flow the ClientApp, ``fedpal train`` and the simulator run.

A new adapter only replaces the one a user is served by when it is better and still
fluent, because a user who trains and gets a broken assistant back has lost something:

1. the user's pairs are split by prompt: a stable share of prompts is held out (a prompt
   is always on the same side, however the memory grows, so a prompt trained on in one
   run is never scored as unseen in the next);
2. the adapter trains on the rest (DPO plus SFT on the chosen replies by default) and
   stops when its held-out loss stops improving (``LocalTrainer``);
3. it must rank the held-out pairs better than the adapter it would replace, and pass
   the degeneration guard (``fedpal.client.guard``); when the best weights fail the
   guard, the run's earlier held-out improvements are tried, newest first;
4. only then is it saved where the runtime reads adapters from; otherwise it is kept
   aside in ``<home>/kept-aside/<adapter>`` and the previous adapter keeps serving.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from fedpal.client.guard import DegenerationGuard, GuardConfig, GuardReport
from fedpal.client.home import ClientHome
from fedpal.client.trainer import LocalTrainer, TrainConfig, TrainResult
from fedpal.common.adapters import adapter_to_arrays, arrays_to_adapter, save_adapter
from fedpal.common.types import PreferencePair, SFTExample

if TYPE_CHECKING:
    from peft import PeftModel

    from fedpal.client.memory import PreferenceMemory
    from fedpal.common.models import BaseModel

HOLDOUT = 0.2
"""Share of a user's prompts held out to stop training on and to judge a new adapter."""
MIN_HELDOUT = 2
"""Held-out pairs below which a split is not worth its cost: all pairs train, no early stopping."""

DEFAULT_TRAIN = TrainConfig(
    objective="both",
    steps=24,
    learning_rate=1e-3,
    beta=0.5,
    eval_every=4,
    patience=3,
)
"""``fedpal train``'s defaults, chosen on the style suite (README; default model, 2 CPU cores,
batch 4 x 256 tokens from the device profile). DPO + SFT on the chosen reply, because pure
DPO on a few hundred tokens of pairs learns to repeat the form token that separates them.
beta 0.5 rather than the usual 0.1: at lr 1e-3 and beta 0.1 the styles appeared but word
repetition rose from 0.12 to 0.24-0.35 and distinct-2 fell from 0.81 to 0.58-0.70; at beta
0.5 (a stronger pull to the reference) a follow-up-question user went 0 -> 0.46 with
repetition 0.11 and distinct-2 0.81. 24 steps (~3 minutes) are a ceiling; the held-out
loss decides which step's weights are kept."""


def _ranks_no_better(result: TrainResult) -> str:
    """Why the kept weights must not replace the current adapter on held-out ranking ("" if they may)."""
    if result.heldout_loss_first is None:
        return ""
    if result.best_step == 0 or result.heldout_preference_loss_best >= result.heldout_preference_loss_first:
        return (
            f"it ranked the {result.heldout_pairs} held-out pairs no better than the current adapter "
            f"(accuracy {result.heldout_accuracy_first:.2f} -> {result.heldout_accuracy_best:.2f})"
        )
    return ""


def held_out_prompts(prompts: Sequence[str], fraction: float = HOLDOUT, minimum: int = MIN_HELDOUT) -> set[str]:
    """The prompts to hold out: those whose hash falls below ``fraction`` (stable as prompts are added).

    Where that leaves fewer than ``minimum`` prompts, the prompts with the smallest hashes
    are taken; a set of fewer than ``2 * minimum`` distinct prompts holds none out.
    """
    unique = sorted(set(prompts), key=_unit_hash)
    if fraction <= 0 or len(unique) < 2 * minimum:
        return set()
    chosen = [p for p in unique if _unit_hash(p) < fraction]
    return set(chosen if len(chosen) >= minimum else unique[:minimum])


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class TrainingData:
    """What one user's adapter learns from (``pairs``, ``examples``) and is judged on (``heldout``)."""

    pairs: tuple[PreferencePair, ...]
    examples: tuple[SFTExample, ...] = ()
    heldout: tuple[PreferencePair, ...] = ()

    @classmethod
    def split(
        cls, pairs: Sequence[PreferencePair], examples: Sequence[SFTExample] = (), holdout: float = HOLDOUT
    ) -> "TrainingData":
        """Hold out the pairs of :func:`held_out_prompts`; examples on those prompts are dropped too."""
        held = held_out_prompts([p.prompt for p in pairs], holdout)
        return cls(
            tuple(p for p in pairs if p.prompt not in held),
            tuple(e for e in examples if e.prompt not in held),
            tuple(p for p in pairs if p.prompt in held),
        )

    @classmethod
    def from_memory(
        cls, memory: "PreferenceMemory", context: str | None = None, holdout: float = HOLDOUT
    ) -> "TrainingData":
        """The memory's pairs and examples, split; ``context`` (prompt or system) places the user's
        stated preferences as generation with retrieval does. The split is made on the bare prompts."""
        data = cls.split(memory.preference_pairs(), memory.sft_examples(), holdout)
        if context is None:
            return data
        return cls(
            tuple(memory.in_context(data.pairs, context)),
            tuple(memory.in_context(data.examples, context)),
            tuple(memory.in_context(data.heldout, context)),
        )

    def everything(self) -> "TrainingData":
        """All pairs for training, none held out (the shared adapter's federated update)."""
        return TrainingData(self.pairs + self.heldout, self.examples)


@dataclass(frozen=True)
class Outcome:
    """What personalizing one adapter did: the run, the guard's figures, and whether it now serves."""

    adapter: str
    train: TrainResult
    activated: bool
    reason: str
    guard: GuardReport | None = None
    adapter_dir: str | None = None
    kept_aside: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["train"] = self.train.to_dict()
        data["guard"] = self.guard.to_dict() if self.guard is not None else None
        return data

    def line(self) -> str:
        """One line for a user: what was trained and whether it serves now."""
        t = self.train
        held = ""
        if t.heldout_accuracy_first is not None:
            held = (
                f", held-out accuracy {t.heldout_accuracy_first:.2f} -> {t.heldout_accuracy_best:.2f}"
                f" on {t.heldout_pairs} pairs"
            )
        head = (
            f"{self.adapter}: {t.steps} steps on {t.pairs} pairs ({t.device}, {t.seconds:.1f}s, "
            f"stopped: {t.stopped}){held}"
        )
        if self.activated:
            return f"{head}; active, saved to {self.adapter_dir}"
        where = f"; kept aside in {self.kept_aside}" if self.kept_aside else ""
        return f"{head}; not activated: {self.reason}{where}"


class Personalizer:
    """Trains a user's adapters on one peft model and activates only those that help.

    ``home`` is where adapters are saved (``None``: nothing is written, e.g. a benchmark
    that only wants the trained model). ``guard=None`` turns the degeneration guard off.
    """

    def __init__(
        self,
        base: "BaseModel",
        model: "PeftModel",
        home: ClientHome | None,
        config: TrainConfig = DEFAULT_TRAIN,
        guard: GuardConfig | None = GuardConfig(),
        checkpoints: bool = True,
    ) -> None:
        self.base, self.model, self.home, self.config = base, model, home, config
        self.guard = DegenerationGuard(base, model, guard) if guard is not None else None
        self.checkpoint_dir = home.training if home is not None and checkpoints else None

    def train(
        self,
        adapter: str,
        data: TrainingData,
        reference_adapters: Sequence[str] = (),
        seed: int | None = None,
        progress: bool = True,
        steps: int | None = None,
    ) -> Outcome:
        """Train ``adapter`` on ``data``, judge it, and save it where it serves only if it passes.

        ``seed`` and ``steps`` override the settings' for this run.
        """
        config = self._config(seed, steps)
        active = [*reference_adapters, adapter]
        previous = adapter_to_arrays(self.model, adapter, "AB")
        probes, before = [], None
        if self.guard is not None:
            probes = self.guard.probes([(p.prompt, p.system) for p in data.heldout])
            before, _ = self.guard.measure(probes, active)
        trainer = LocalTrainer(self.base, self.model, config, checkpoint_dir=self.checkpoint_dir)
        result = trainer.train(
            adapter,
            list(data.pairs),
            list(data.examples),
            reference_adapters,
            progress=progress,
            heldout=list(data.heldout),
        )
        reason = _ranks_no_better(result)
        report = None
        if self.guard is not None and not reason:
            report = self.guard.compare(before, probes, active)
            # the latest held-out improvement that still reads fluently: walk back while the guard refuses
            while report.degenerate and (earlier := trainer.fall_back(result)) is not None:
                result = earlier
                report = self.guard.compare(before, probes, active)
            if report.degenerate:
                reason = "its replies degenerate (" + "; ".join(report.reasons) + ")"
        if not reason:
            saved = str(save_adapter(self.model, adapter, self.home.adapter_dir(adapter))) if self.home else None
            return Outcome(adapter, result, True, "", report, adapter_dir=saved)
        aside = None
        if self.home is not None and result.best_step != 0:
            aside = str(save_adapter(self.model, adapter, self.home.kept_aside(adapter)))
        arrays_to_adapter(self.model, adapter, previous, "AB")
        return Outcome(adapter, result, False, reason, report, kept_aside=aside)

    def train_update(self, adapter: str, data: TrainingData, seed: int, steps: int | None = None) -> TrainResult:
        """Train ``adapter`` on all of ``data`` for a federated update: no hold-out, no guard,
        nothing saved (what the server receives is checked and aggregated there)."""
        trainer = LocalTrainer(self.base, self.model, self._config(seed, steps))
        everything = data.everything()
        return trainer.train(adapter, list(everything.pairs), list(everything.examples), progress=False)

    def _config(self, seed: int | None, steps: int | None) -> TrainConfig:
        changes = {k: v for k, v in (("seed", seed), ("steps", steps)) if v is not None}
        return replace(self.config, **changes) if changes else self.config
