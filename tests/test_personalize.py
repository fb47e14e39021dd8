"""The personalization flow: held-out split, early stopping, the degeneration guard, activation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from fedpal.client.guard import Fluency, GuardConfig, distinct, repetition, verdict
from fedpal.client.personalize import DEFAULT_TRAIN, Personalizer, TrainingData, held_out_prompts
from fedpal.common.errors import FedpalError
from fedpal.common.types import PreferencePair, SFTExample

FAST = dict(batch_size=4, max_length=64)


def style_pairs(n: int, seed: int) -> list[PreferencePair]:
    sys.path.insert(0, os.path.dirname(__file__))
    from test_trainer import style_pairs as make

    return make(n, seed)


# ------------------------------------------------------------------ held-out split


def test_held_out_prompts_stay_held_out_as_the_memory_grows():
    prompts = [f"question number {i}?" for i in range(60)]
    first, later = held_out_prompts(prompts[:20]), held_out_prompts(prompts)
    assert first and first == later & set(prompts[:20])  # no prompt changes side as prompts are added
    assert 0.05 < len(later) / len(prompts) < 0.4


def test_few_prompts_hold_none_out_and_small_sets_hold_out_two():
    assert held_out_prompts(["a?", "b?", "c?"]) == set()
    assert len(held_out_prompts([f"p{i}" for i in range(5)])) >= 2
    assert held_out_prompts([f"p{i}" for i in range(50)], fraction=0.0) == set()


def test_split_keeps_a_prompts_pairs_and_examples_on_one_side():
    pairs = [PreferencePair(f"prompt {i % 12}", f"good {i}", f"bad {i}") for i in range(36)]
    examples = [SFTExample(f"prompt {i}", f"good {i}") for i in range(12)]
    data = TrainingData.split(pairs, examples)
    held = {p.prompt for p in data.heldout}
    assert held and not held & {p.prompt for p in data.pairs}
    assert not held & {e.prompt for e in data.examples}
    assert len(data.pairs) + len(data.heldout) == len(pairs)
    assert len(data.everything().pairs) == len(pairs) and not data.everything().heldout


# ------------------------------------------------------------------ guard measures


def test_repetition_and_distinct_separate_a_loop_from_prose():
    prose = "Boil the water, add the eggs, and wait nine minutes before you cool them in cold water."
    loop = "you are in your home and " * 10
    assert repetition(prose) == 0.0 and distinct(prose) == 1.0
    assert repetition(loop) > 0.8 and distinct(loop) < 0.2
    assert repetition("") == 0.0 and distinct("hi") == 1.0
    assert repetition("d" * 40) > 0.8  # a collapse without spaces


def test_verdict_names_each_threshold_crossed():
    fine = Fluency(repetition=0.05, distinct2=0.95, mean_tokens=40, at_limit=0.2, base_nll=2.0)
    assert verdict(fine, replace(fine, repetition=0.12, mean_tokens=60), GuardConfig()) == ()
    broken = Fluency(repetition=0.9, distinct2=0.1, mean_tokens=120, at_limit=1.0, base_nll=4.0)
    reasons = verdict(fine, broken, GuardConfig())
    assert len(reasons) == 4 and reasons[0].startswith("repetition 0.05 -> 0.90")
    with pytest.raises(FedpalError):
        GuardConfig(max_length_ratio=0.5)


# ------------------------------------------------------------------ flow on the tiny model


def _fresh():
    from fedpal.common.adapters import AdapterConfig, attach_adapters
    from fedpal.common.models import load_base_model

    base = load_base_model("tiny", device="cpu")
    return base, attach_adapters(base.model, AdapterConfig())


def test_the_guard_measures_each_set_of_weights_once(monkeypatch):
    """A measurement is remembered under the weights: the same weights again cost no replies,
    any change to them (training, another model) is measured anew."""
    import torch

    import fedpal.common.generation as generation
    from fedpal.client.guard import DegenerationGuard
    from fedpal.common.adapters import PERSONAL, SHARED, adapter_state

    calls = []
    real = generation.generate_replies
    monkeypatch.setattr(generation, "generate_replies", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, model = _fresh()
    config = GuardConfig(probes=2, max_new_tokens=8)
    guard = DegenerationGuard(base, model, config)
    probes = guard.probes([("How do I boil an egg?", None)])
    first, texts = guard.measure(probes, [SHARED, PERSONAL])
    again, texts_again = guard.measure(probes, [SHARED, PERSONAL])
    assert len(calls) == 1 and again == first and texts_again == texts
    with torch.no_grad():
        next(iter(adapter_state(model, PERSONAL, "B").values())).add_(0.5)
    guard.measure(probes, [SHARED, PERSONAL])
    assert len(calls) == 2
    other_base, other_model = _fresh()  # same weights, another model: measured for itself
    DegenerationGuard(other_base, other_model, config).measure(probes, [SHARED, PERSONAL])
    assert len(calls) == 3


def test_early_stopping_keeps_the_weights_that_ranked_held_out_pairs_best():
    from fedpal.common.adapters import PERSONAL, SHARED, adapter_to_arrays

    base, model = _fresh()
    data = TrainingData.split(style_pairs(24, 3))
    config = replace(DEFAULT_TRAIN, steps=40, learning_rate=0.05, eval_every=2, patience=2, **FAST)
    outcome = Personalizer(base, model, None, config, guard=None).train(PERSONAL, data, [SHARED], progress=False)
    result = outcome.train
    assert result.heldout_pairs == len(data.heldout) > 0
    assert result.heldout_accuracy_first == 0.5  # a fresh adapter ties every pair with the reference
    assert result.heldout_loss_best <= result.heldout_loss_first
    assert result.best_step is not None and result.best_step <= result.steps
    # what the model holds now scores exactly the best held-out loss
    from fedpal.client.trainer import LocalTrainer, _HeldoutJudge

    judge = _HeldoutJudge(LocalTrainer(base, model, config), PERSONAL, [SHARED], list(data.heldout))
    assert judge.score().loss == pytest.approx(result.heldout_loss_best, abs=1e-5)
    if result.stopped == "early":
        assert result.steps < 40 and "held-out loss did not improve" in result.note
    assert outcome.activated == (result.best_step > 0) or outcome.guard is None
    assert adapter_to_arrays(model, PERSONAL)  # still a well-formed adapter


def test_fall_back_restores_each_earlier_held_out_improvement_newest_first():
    """What the guard walks back through when the best weights degenerate."""
    from fedpal.client.trainer import EARLIER_KEPT, LocalTrainer, _HeldoutJudge
    from fedpal.common.adapters import PERSONAL, SHARED

    base, model = _fresh()
    data = TrainingData.split(style_pairs(24, 3))
    config = replace(DEFAULT_TRAIN, steps=16, learning_rate=0.01, eval_every=2, patience=8, **FAST)
    trainer = LocalTrainer(base, model, config)
    result = trainer.train(PERSONAL, list(data.pairs), [], [SHARED], progress=False, heldout=list(data.heldout))
    steps = [result.best_step]
    while (earlier := trainer.fall_back(result)) is not None:
        assert 0 < earlier.best_step < steps[-1] and "failed a later check" in earlier.note
        assert earlier.heldout_loss_best > result.heldout_loss_best  # it was an improvement, not the best
        judge = _HeldoutJudge(LocalTrainer(base, model, config), PERSONAL, [SHARED], list(data.heldout))
        assert judge.score().loss == pytest.approx(earlier.heldout_loss_best, abs=1e-5)  # the model holds them
        steps.append(earlier.best_step)
        result = earlier
    assert 2 <= len(steps) <= 1 + EARLIER_KEPT, steps


def test_an_adapter_that_does_not_improve_held_out_pairs_is_not_activated(tmp_path):
    from fedpal.client.home import ClientHome
    from fedpal.common.adapters import PERSONAL, SHARED

    base, model = _fresh()
    home = ClientHome.at(tmp_path / "home")
    data = TrainingData.split(style_pairs(20, 5))
    config = replace(DEFAULT_TRAIN, steps=4, learning_rate=1e-9, eval_every=2, patience=1, **FAST)
    outcome = Personalizer(base, model, home, config, guard=None).train(PERSONAL, data, [SHARED], progress=False)
    assert not outcome.activated and outcome.train.best_step == 0
    assert "no better than the current adapter" in outcome.reason
    assert not home.adapter_dir(PERSONAL).exists() and not home.kept_aside(PERSONAL).exists()


def _digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_guard_refuses_an_overfit_adapter_and_the_previous_one_keeps_serving(tmp_path):
    """Must-show of the personalization issue: overfit (high lr, many steps, pure DPO) through the real CLI."""
    from fedpal.client.memory import PreferenceMemory

    home = tmp_path / "home"
    with PreferenceMemory.open(home, passphrase="pw") as memory:
        for pair in style_pairs(16, seed=9):
            memory.add_pair(pair.prompt, pair.chosen, pair.rejected)
    env = {**os.environ, "FEDPAL_PASSPHRASE": "pw"}

    def train(*args):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedpal.common.cli",
                "train",
                "--home",
                str(home),
                "--model",
                "tiny",
                "--batch-size",
                "4",
                "--max-length",
                "64",
                *args,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done

    first = json.loads(
        train("--steps", "2", "--learning-rate", "1e-4", "--holdout", "0", "--no-guard", "--json").stdout.splitlines()[
            -1
        ]
    )
    assert first["activated"]
    personal = home / "adapters" / "personal"
    before = _digest(personal)

    overfit = train("--steps", "60", "--learning-rate", "0.05", "--objective", "dpo", "--holdout", "0")
    line = overfit.stdout.strip().splitlines()[-1]
    assert "not activated: its replies degenerate" in line and "kept aside in" in line
    assert _digest(personal) == before  # the previous adapter still serves
    aside = home / "kept-aside" / "personal"
    assert (aside / "adapter_model.safetensors").is_file() and _digest(aside) != before

    report = json.loads(
        train(
            "--steps", "60", "--learning-rate", "0.05", "--objective", "dpo", "--holdout", "0", "--json"
        ).stdout.splitlines()[-1]
    )
    guard = report["runs"][0]["guard"]
    assert not report["activated"] and guard["degenerate"]
    assert guard["after"]["repetition"] > guard["before"]["repetition"] + 0.2
    assert _digest(personal) == before
