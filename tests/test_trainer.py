"""Local adapter training: the DPO maths, and what training does to the tiny model's adapters."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedpal.client.device_profile import CPU_MAX_BATCH, CPU_MAX_LENGTH, profile_device
from fedpal.client.dpo import IGNORE, dpo_loss, encode_reply, sequence_logprobs
from fedpal.client.trainer import LocalTrainer, TrainConfig
from fedpal.common.adapters import PERSONAL, SHARED, AdapterConfig, adapter_to_arrays, attach_adapters
from fedpal.common.errors import FedpalError
from fedpal.common.models import load_base_model
from fedpal.common.tiny_model import _WORDS
from fedpal.common.types import PreferencePair, SFTExample

FAST = dict(batch_size=8, max_length=96, learning_rate=5e-3)


def style_pairs(n: int, seed: int) -> list[PreferencePair]:
    """A synthetic preference: the same content, chosen as a bullet list, rejected as prose."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        topic = " ".join(rng.choice(_WORDS) for _ in range(3))
        items = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 5))) for _ in range(3)]
        pairs.append(
            PreferencePair(
                prompt=f"Tell me about {topic}?",
                chosen="\n".join(f"- {item}" for item in items),
                rejected=" ".join(f"{item.capitalize()}." for item in items),
            )
        )
    return pairs


def fresh(device: str = "cpu"):
    base = load_base_model("tiny", device=device)
    return base, attach_adapters(base.model, AdapterConfig())


def lora(peft_model, name: str) -> dict[str, np.ndarray]:
    return adapter_to_arrays(peft_model, name)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ DPO maths


def test_dpo_loss_matches_hand_computed_values():
    # beta * ((pc - rc) - (pr - rr)) = 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5
    out = dpo_loss(
        torch.tensor([-1.0, -3.0]),
        torch.tensor([-2.0, -3.0]),
        torch.tensor([-1.5, -3.0]),
        torch.tensor([-1.5, -3.0]),
        beta=0.5,
    )
    assert out.losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)  # 0.474077
    assert out.losses[1].item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.0])
    assert out.margins.tolist() == pytest.approx([0.5, 0.0])


def test_dpo_loss_and_gradient_follow_the_formula_on_random_inputs():
    gen = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (torch.randn(64, generator=gen, dtype=torch.float64) * 20 for _ in range(4))
    pc.requires_grad_(True)
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta)
    z = beta * ((pc.detach() - rc) - (pr - rr))
    expected = np.log1p(np.exp(-z.numpy()))  # -log sigmoid(z)
    np.testing.assert_allclose(out.losses.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    out.losses.sum().backward()
    np.testing.assert_allclose(pc.grad.numpy(), (-beta / (1 + np.exp(z.numpy()))), rtol=1e-10, atol=1e-12)


def test_sequence_logprobs_sums_only_labelled_next_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE]])  # position 0 predicts token 1, position 1 predicts token 2
    assert sequence_logprobs(logits, labels).item() == pytest.approx(math.log(0.25) + math.log(0.3), abs=1e-6)


def test_encode_reply_labels_only_the_reply_and_respects_max_length(tiny_base):
    tok = tiny_base.tokenizer
    prompt = list(range(3, 43))
    ids, labels = encode_reply(tok, prompt, "a short reply", max_length=1000)
    n_prompt = len(prompt)
    assert ids[:n_prompt] == prompt and labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    ids, labels = encode_reply(tok, prompt, "the answer is " + "very " * 50 + "long", max_length=32)
    assert len(ids) == len(labels) == 32
    assert labels[:16] == [IGNORE] * 16 and IGNORE not in labels[16:]  # half the budget kept for the prompt


def test_reply_logprobs_match_a_plain_full_forward():
    """The trainer scores only reply positions (logits_to_keep); the sums must not change."""
    from fedpal.common.generation import chat_input_ids

    base, model = fresh()
    trainer = LocalTrainer(base, model, TrainConfig(batch_size=3, max_length=64))
    pairs = style_pairs(4, seed=20) + [PreferencePair("hi", "a", "b")]
    chosen, rejected = trainer._pair_logprobs(trainer._encode_pairs(pairs))
    for pair, got_c, got_r in zip(pairs, chosen, rejected):
        for reply, got in ((pair.chosen, got_c), (pair.rejected, got_r)):
            ids, labels = encode_reply(base.tokenizer, chat_input_ids(base.tokenizer, pair.prompt), reply, 64)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits
            logp = torch.log_softmax(logits[0, :-1], -1)
            want = sum(logp[t, labels[t + 1]].item() for t in range(len(ids) - 1) if labels[t + 1] != IGNORE)
            assert got.item() == pytest.approx(want, abs=1e-3)


# ------------------------------------------------------------- device profile


def test_device_profile_fits_memory_and_honours_overrides(tiny_base):
    roomy = profile_device(tiny_base.model, "cpu", free_bytes=64 << 30)
    assert (roomy.max_length, roomy.batch_size) == (CPU_MAX_LENGTH, CPU_MAX_BATCH)  # capped on CPU for step time
    tight = profile_device(tiny_base.model, "cpu", free_bytes=1 << 20)
    assert (tight.max_length, tight.batch_size) == (128, 1) and "may not fit" in tight.reason
    mid = profile_device(tiny_base.model, "cpu", free_bytes=64 << 20)
    assert mid.batch_size * mid.max_length < roomy.batch_size * roomy.max_length
    forced = profile_device(tiny_base.model, "cpu", free_bytes=1 << 20, batch_size=3, max_length=77)
    assert (forced.batch_size, forced.max_length) == (3, 77)


# ------------------------------------------------------------------ training


def test_dpo_raises_reward_margin_on_training_and_held_out_pairs():
    base, model = fresh()
    train, held_out = style_pairs(16, seed=1), style_pairs(8, seed=2)
    trainer = LocalTrainer(base, model, TrainConfig(steps=12, **FAST))
    before = trainer.reward_margins(PERSONAL, held_out, [SHARED])
    result = trainer.train(PERSONAL, train, reference_adapters=[SHARED], progress=False)
    assert result.stopped == "steps" and result.steps == 12 and result.pairs == 16
    assert result.loss_first == pytest.approx(math.log(2), abs=1e-4)  # fresh adapter == reference
    assert result.loss_last < result.loss_first - 0.1
    assert result.reward_margin_last > result.reward_margin_first + 0.1
    on_train = trainer.reward_margins(PERSONAL, train, [SHARED])
    on_held_out = trainer.reward_margins(PERSONAL, held_out, [SHARED])
    assert max(abs(m) for m in before) < 1e-4
    assert np.mean(on_train) > 0.2 and min(on_train) > 0
    assert np.mean(on_held_out) > 0.2 and sum(m > 0 for m in on_held_out) >= 7


def test_system_message_is_part_of_what_the_adapter_learns_from():
    base, model = fresh()
    pairs = style_pairs(4, seed=5)
    system = "The user has stated these preferences; follow them when they apply:\n- Use bullet lists."
    in_context = [dataclasses.replace(p, system=system) for p in pairs]
    trainer = LocalTrainer(base, model, TrainConfig(steps=1, **FAST))
    bare_rows, context_rows = trainer._encode_pairs(pairs), trainer._encode_pairs(in_context)
    for (bare, _), (context, _) in zip(bare_rows, context_rows):
        assert "Use bullet lists" in base.tokenizer.decode(context[0]) and "bullet" not in base.tokenizer.decode(
            bare[0]
        )
        assert [t for t in context[1] if t != IGNORE] == [t for t in bare[1] if t != IGNORE]  # same reply scored
    margins = trainer.reward_margins(PERSONAL, in_context, [SHARED])
    trainer.train(PERSONAL, in_context, reference_adapters=[SHARED], progress=False)
    assert trainer.reward_margins(PERSONAL, in_context, [SHARED]) != margins


def test_reference_is_cached_one_forward_per_step():
    base, model = fresh()
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    LocalTrainer(base, model, TrainConfig(steps=5, batch_size=4, max_length=64)).train(
        PERSONAL, style_pairs(10, seed=3), reference_adapters=[SHARED], progress=False
    )
    handle.remove()
    assert len(calls) == math.ceil(10 / 4) + 5  # reference once per pair (3 batches), then 1 per step


def test_training_one_adapter_leaves_the_other_and_the_base_bit_identical():
    base, model = fresh()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    pairs = style_pairs(8, seed=4)
    trainer = LocalTrainer(base, model, TrainConfig(steps=3, **FAST))

    personal_before = lora(model, PERSONAL)
    trainer.train(SHARED, pairs, progress=False)
    shared_trained = lora(model, SHARED)
    assert same(lora(model, PERSONAL), personal_before)
    assert not same(shared_trained, personal_before)

    result = trainer.train(PERSONAL, pairs, reference_adapters=[SHARED], progress=False)
    assert same(lora(model, SHARED), shared_trained)
    assert not same(lora(model, PERSONAL), personal_before)
    # the reference includes the trained shared adapter, so a fresh personal adapter starts at margin 0
    assert abs(result.reward_margin_first) < 1e-4

    personal_trained = lora(model, PERSONAL)
    trainer.train(SHARED, pairs, progress=False)
    assert same(lora(model, PERSONAL), personal_trained)
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters() if "lora_" not in n)


def test_same_seed_same_adapter_other_seed_other_adapter():
    pairs = style_pairs(12, seed=5)
    results = []
    for seed in (3, 3, 4):
        base, model = fresh()
        LocalTrainer(base, model, TrainConfig(steps=4, seed=seed, batch_size=4, max_length=64)).train(
            PERSONAL, pairs, reference_adapters=[SHARED], progress=False
        )
        results.append(lora(model, PERSONAL))
    assert same(results[0], results[1])
    assert not same(results[0], results[2])


class Killed(Exception):
    pass


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    pairs = style_pairs(12, seed=6)
    config = TrainConfig(steps=6, checkpoint_every=2, batch_size=4, max_length=64, learning_rate=5e-3)

    base, model = fresh()
    LocalTrainer(base, model, config, checkpoint_dir=tmp_path / "a").train(
        PERSONAL, pairs, reference_adapters=[SHARED], progress=False
    )
    uninterrupted = lora(model, PERSONAL)

    def kill_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise Killed

    base, model = fresh()
    with pytest.raises(Killed):
        LocalTrainer(base, model, config, checkpoint_dir=tmp_path / "b").train(
            PERSONAL, pairs, reference_adapters=[SHARED], progress=False, callback=kill_at_5
        )
    assert (tmp_path / "b" / "personal.ckpt.pt").is_file()

    base, model = fresh()  # a new process: the adapter is back at its starting weights
    result = LocalTrainer(base, model, config, checkpoint_dir=tmp_path / "b").train(
        PERSONAL, pairs, reference_adapters=[SHARED], progress=False
    )
    assert result.resumed_from == 4 and result.steps == 6 and "resumed" in result.note
    assert same(lora(model, PERSONAL), uninterrupted)
    assert not (tmp_path / "b" / "personal.ckpt.pt").exists()  # a finished run leaves no checkpoint


def test_checkpoint_of_other_data_is_not_resumed(tmp_path):
    config = TrainConfig(steps=4, checkpoint_every=1, batch_size=4, max_length=64)

    def kill_at_2(step: int, loss: float) -> None:
        if step == 2:
            raise Killed

    base, model = fresh()
    with pytest.raises(Killed):
        LocalTrainer(base, model, config, checkpoint_dir=tmp_path).train(
            PERSONAL, style_pairs(8, seed=7), progress=False, callback=kill_at_2
        )
    base, model = fresh()
    result = LocalTrainer(base, model, config, checkpoint_dir=tmp_path).train(
        PERSONAL, style_pairs(8, seed=8), progress=False
    )
    assert result.resumed_from == 0 and result.steps == 4


def test_nan_loss_stops_and_keeps_the_last_good_adapter():
    pairs = style_pairs(8, seed=9)
    config = TrainConfig(steps=6, batch_size=4, max_length=64, learning_rate=5e-3)

    base, model = fresh()
    LocalTrainer(base, model, replace_steps(config, 2)).train(PERSONAL, pairs, progress=False)
    after_two = lora(model, PERSONAL)

    def poison(step: int, loss: float) -> None:
        if step == 2:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if ".lora_A.personal." in n)[0, 0] = float("nan")

    base, model = fresh()
    result = LocalTrainer(base, model, config).train(PERSONAL, pairs, progress=False, callback=poison)
    assert result.stopped == "nan" and result.steps == 2
    assert "non-finite" in result.note and "kept the weights of step 2" in result.note
    assert math.isfinite(result.loss_last)
    assert same(lora(model, PERSONAL), after_two)


def test_absurd_learning_rate_never_returns_a_broken_adapter():
    base, model = fresh()
    result = LocalTrainer(base, model, TrainConfig(steps=8, batch_size=4, max_length=64, learning_rate=1e30)).train(
        PERSONAL, style_pairs(8, seed=10), progress=False
    )
    assert result.stopped == "nan" and result.steps >= 1
    assert all(np.isfinite(a).all() for a in lora(model, PERSONAL).values())


def replace_steps(config: TrainConfig, steps: int) -> TrainConfig:
    from dataclasses import replace

    return replace(config, steps=steps)


def test_fedprox_keeps_the_adapter_near_the_received_weights():
    pairs = style_pairs(8, seed=11)
    deltas = []
    for mu in (0.0, 50.0):
        base, model = fresh()
        start = lora(model, SHARED)
        LocalTrainer(base, model, TrainConfig(steps=6, proximal_mu=mu, **FAST)).train(SHARED, pairs, progress=False)
        end = lora(model, SHARED)
        deltas.append(math.sqrt(sum(float(((end[k] - start[k]) ** 2).sum()) for k in start)))
    assert 0 < deltas[1] < 0.5 * deltas[0]


def test_sft_and_both_objectives_learn():
    pairs = style_pairs(8, seed=12)
    examples = [SFTExample("Say hi?", "- hi\n- hello"), SFTExample(pairs[0].prompt, pairs[0].chosen)]
    base, model = fresh()
    sft = LocalTrainer(base, model, TrainConfig(objective="sft", steps=8, **FAST)).train(
        PERSONAL, [], examples, progress=False
    )
    assert sft.examples == 2 and sft.loss_last < sft.loss_first and sft.reward_margin_last == 0.0
    base, model = fresh()
    both = LocalTrainer(base, model, TrainConfig(objective="both", steps=8, sft_weight=0.5, **FAST)).train(
        PERSONAL, pairs, examples, progress=False
    )
    assert both.loss_last < both.loss_first and both.reward_margin_last > 0


def test_no_pairs_or_bad_settings_are_clear_errors():
    base, model = fresh()
    with pytest.raises(FedpalError, match="no preference pairs.*add"):
        LocalTrainer(base, model, TrainConfig(steps=1, **FAST)).train(PERSONAL, [], progress=False)
    with pytest.raises(FedpalError, match="nothing to train on"):
        LocalTrainer(base, model, TrainConfig(objective="sft", steps=1, **FAST)).train(PERSONAL, [], [], progress=False)
    with pytest.raises(FedpalError, match="objective must be one of"):
        LocalTrainer(base, model, TrainConfig(objective="ppo"))
    with pytest.raises(FedpalError, match="unknown adapter 'global'"):
        LocalTrainer(base, model, TrainConfig(**FAST)).train("global", style_pairs(2, 0), progress=False)
    with pytest.raises(FedpalError, match="its own DPO reference"):
        LocalTrainer(base, model, TrainConfig(**FAST)).train(PERSONAL, style_pairs(2, 0), reference_adapters=[PERSONAL])


def test_time_budget_stops_early():
    base, model = fresh()
    result = LocalTrainer(base, model, TrainConfig(steps=50, time_budget_s=0.001, **FAST)).train(
        PERSONAL, style_pairs(8, seed=13), progress=False
    )
    assert result.stopped == "time" and result.steps == 1 and "time budget" in result.note


# ------------------------------------------------------------------ CLI


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpal.common.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_trains_from_the_memory_and_saves_adapters(tmp_path):
    memory_module = pytest.importorskip("fedpal.client.memory")
    home = tmp_path / "home"
    memory = memory_module.PreferenceMemory.open(home, passphrase="correct horse")
    for pair in style_pairs(6, seed=14):
        memory.add_pair(pair.prompt, pair.chosen, pair.rejected)
    env = {**os.environ, "FEDPAL_PASSPHRASE": "correct horse"}
    common = [
        "--home",
        str(home),
        "--model",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--learning-rate",
        "0.005",
        "--objective",
        "dpo",
        "--holdout",
        "0",
        "--no-guard",
        "--json",
    ]

    first = cli(*common, "--adapter", "both", env=env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert {"pairs", "steps", "device", "loss_first", "loss_last", "seconds", "adapter_dir"} <= summary.keys()
    assert summary["pairs"] == 6 and summary["steps"] == 6 and summary["device"] == "cpu"
    assert [r["adapter"] for r in summary["runs"]] == ["shared", "personal"] and summary["activated"]
    for name in ("shared", "personal"):
        assert (home / "adapters" / name / "adapter_model.safetensors").is_file()
    assert summary["adapter_dir"] == str(home / "adapters" / "personal")

    second = cli(*common, env=env)  # personal again, continuing from the saved adapter
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout.strip().splitlines()[-1])
    assert again["runs"][0]["adapter"] == "personal"
    assert again["loss_first"] < math.log(2) - 1e-3  # started from the saved, trained adapter


def test_cli_with_an_empty_memory_says_what_to_add(tmp_path):
    memory_module = pytest.importorskip("fedpal.client.memory")
    memory_module.PreferenceMemory.open(tmp_path, passphrase="pw")
    result = cli("--home", str(tmp_path), "--model", "tiny", env={**os.environ, "FEDPAL_PASSPHRASE": "pw"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no preference pairs") and "add" in lines[0]


@pytest.mark.slow
def test_personal_adapter_makes_bullet_lists_more_frequent_on_the_default_model():
    """32 pairs preferring the same reply as a bullet list; greedy replies to unseen prompts (~4 min on 2 CPU cores)."""
    from fedpal.simulations.benchmarks.style import main

    report = main(["--model", "default", "--json"])
    assert report["pairs"] >= 16 and report["stopped"] == "steps"
    assert report["reward_margin_last"] > report["reward_margin_first"]
    assert report["tuned_bulleted_rate"] >= report["base_bulleted_rate"] + 0.5  # measured: 0/24 -> 23/24
