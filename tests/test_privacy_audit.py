"""The privacy attacks on planted leaks whose answer is known: a one-run epsilon audit of a
Gaussian mechanism with canaries, and a server inverting a client's FFA-LoRA update."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedpal.common.errors import FedpalError
from fedpal.common.privacy import independent_epsilon
from fedpal.simulations.privacy.audit import (
    audit,
    canary_directions,
    canary_scores,
    canary_update,
    one_shot_epsilon,
    steinke_epsilon,
    steinke_lower_bound,
    steinke_p_value,
)
from fedpal.simulations.privacy.inversion import invert_update, rouge1_f1, score_inversion, trained_token_ids

DELTA = 1e-5


def gaussian_epsilon(noise_multiplier: float) -> float:
    """Tight epsilon (PLD) of ONE release of a sum with sensitivity C and noise N(0, (zC)^2)."""
    return independent_epsilon(noise_multiplier, 1, DELTA, 1, 1, sampling="none", method="pld")


def canary_run(noise_multiplier: float, seed: int, canaries: int = 200, dim: int = 2000, clip: float = 1.0):
    """One release of the Gaussian mechanism: sum of the included canaries' updates (norm C) plus noise.

    Each canary is included with probability 1/2; returns its cosine score and inclusion flag.
    """
    rng = np.random.default_rng(seed + 1000)
    directions = canary_directions({"a": (dim // 2,), "b": (2, dim // 4)}, canaries, seed)
    included = rng.random(canaries) < 0.5
    initial = {"a": np.zeros(dim // 2, np.float32), "b": np.zeros((2, dim // 4), np.float32)}
    final = {name: array.astype(np.float64) for name, array in initial.items()}
    for direction, inside in zip(directions, included):
        if inside:  # the server sums the canary's update: what it sent minus what it received
            sent = canary_update(initial, direction, clip)
            final = {name: final[name] + sent[name] - initial[name] for name in final}
    final = {name: array + rng.normal(0.0, noise_multiplier * clip, array.shape) for name, array in final.items()}
    return canary_scores(initial, final, directions), included


# ------------------------------------------------------------------ canaries


def test_canary_directions_are_seeded_unit_vectors_and_canary_updates_have_the_clip_norm():
    shapes = {"x": (3, 4), "y": (5,)}
    first, again, other = (canary_directions(shapes, 3, seed) for seed in (7, 7, 8))
    for direction in first:
        assert [(k, v.shape, v.dtype) for k, v in direction.items()] == [
            ("x", (3, 4), np.float32),
            ("y", (5,), np.float32),
        ]
        flat = np.concatenate([v.astype(np.float64).ravel() for v in direction.values()])
        assert np.linalg.norm(flat) == pytest.approx(1, abs=1e-6)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in shapes)
    assert not np.array_equal(first[0]["x"], other[0]["x"]) and not np.array_equal(first[0]["x"], first[1]["x"])
    received = {"x": np.ones((3, 4), np.float32), "y": np.zeros(5, np.float32)}
    sent = canary_update(received, first[0], 0.5)
    update = np.concatenate([(sent[k] - received[k]).ravel() for k in shapes])
    assert list(sent) == ["x", "y"] and sent["x"].dtype == np.float32
    assert np.linalg.norm(update) == pytest.approx(0.5, abs=1e-6)
    scores = canary_scores(received, sent, first)
    assert scores[0] == pytest.approx(1, abs=1e-6) and abs(scores[1]) < 0.99
    with pytest.raises(FedpalError, match="did not change"):
        canary_scores(received, received, first)


# ------------------------------------------------------------------ Steinke et al.


def test_steinke_p_value_is_the_binomial_tail_for_pure_dp_and_delta_only_loosens_it():
    q = 1 / (1 + math.exp(-1.0))
    assert steinke_p_value(100, 10, 10, 1.0, 0.0) == pytest.approx(q**10, rel=1e-9)
    assert steinke_p_value(100, 10, 9, 1.0, 0.0) == pytest.approx(q**10 + 10 * q**9 * (1 - q), rel=1e-9)
    assert steinke_p_value(100, 10, 9, 1.0, 1e-3) > steinke_p_value(100, 10, 9, 1.0, 0.0)
    # all r guesses right under pure DP: the bound solves q^r = significance exactly
    bound = steinke_epsilon(100, 20, 20, 0.0, 0.05)
    q_needed = 0.05 ** (1 / 20)
    assert bound == pytest.approx(math.log(q_needed / (1 - q_needed)), abs=1e-6)
    assert 0 < steinke_epsilon(100, 20, 20, 1e-3, 0.05) < bound
    assert steinke_epsilon(100, 20, 10, DELTA, 0.05) == 0.0  # a coin flip's accuracy proves nothing


def test_steinke_bound_is_large_without_noise_and_below_the_true_epsilon_with_it():
    scores, included = canary_run(0.0, seed=0)
    leaky = steinke_lower_bound(scores, included, DELTA)
    print("no noise:", leaky)
    assert leaky.epsilon >= 2.5 and leaky.correct == leaky.guesses >= 100
    assert leaky.canaries == 200 and leaky.included == int(included.sum()) and leaky.confidence == 0.95
    for noise, seeds in ((1.0, range(4)), (3.0, range(4))):
        true_epsilon = gaussian_epsilon(noise)  # 4.38 and 1.27
        bounds = [steinke_lower_bound(*canary_run(noise, seed), DELTA).epsilon for seed in seeds]
        print(f"z={noise}: epsilon {true_epsilon:.2f}, audited lower bounds {np.round(bounds, 3)}")
        assert max(bounds) <= true_epsilon
        assert max(bounds) < leaky.epsilon / 2
    with pytest.raises(FedpalError):
        steinke_lower_bound(scores, included[:-1], DELTA)


# ------------------------------------------------------------------ Andrew et al.


def test_one_shot_epsilon_is_exact_for_two_gaussians_and_tracks_the_gaussian_mechanism():
    # Unit-variance Gaussians a distance 1/z apart are exactly the Gaussian mechanism.
    samples = np.random.default_rng(0).standard_normal(1000)
    samples = (samples - samples.mean()) / samples.std(ddof=1)  # fitted exactly as N(0, 1)
    assert one_shot_epsilon(samples + 0.5, samples, DELTA) == pytest.approx(gaussian_epsilon(2.0), rel=1e-4)
    assert one_shot_epsilon(samples, samples, DELTA) == 0.0

    without_noise = audit(*canary_run(0.0, seed=0, canaries=1000, dim=10000), DELTA)
    print("no noise one-shot:", without_noise.one_shot_epsilon)
    for noise in (1.0, 2.0):
        true_epsilon = gaussian_epsilon(noise)
        estimates = [
            audit(*canary_run(noise, seed, canaries=1000, dim=10000), DELTA).one_shot_epsilon for seed in range(3)
        ]
        print(f"z={noise}: epsilon {true_epsilon:.2f}, one-shot estimates {np.round(estimates, 2)}")
        assert all(true_epsilon / 2 <= e <= 2 * true_epsilon for e in estimates)
        assert without_noise.one_shot_epsilon > 4 * max(estimates)


# ------------------------------------------------------------------ update inversion

SECRET = "garden music travel budget recipe sleep health movie python email weekend morning".split()
PROBES = [
    "Can you help me with something?",
    "What do you think?",
    "Tell me more.",
    "Please explain.",
    "Any advice?",
    "Hello!",
    "Write something for me.",
    "What should I do today?",
]


def test_rouge1_is_clipped_unigram_f1():
    assert rouge1_f1("the cat the cat", "the cat sat") == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert rouge1_f1("Music, travel!", "music travel") == 1.0 and rouge1_f1("dog", "cat") == 0.0


def test_server_recovers_the_tokens_of_an_ffa_lora_update_and_nothing_from_noise(tiny_base):
    from fedpal.client.trainer import LocalTrainer, TrainConfig
    from fedpal.common.adapters import SHARED, AdapterConfig, adapter_to_arrays, attach_adapters
    from fedpal.common.tiny_model import _WORDS
    from fedpal.common.types import PreferencePair

    rng = random.Random(0)
    others = [w for w in _WORDS if w not in SECRET]
    pairs = [
        PreferencePair(
            prompt=" ".join(rng.choice(others) for _ in range(5)) + "?",
            chosen=" ".join(rng.choice(SECRET) for _ in range(12)),
            rejected=" ".join(rng.choice(others) for _ in range(12)),
        )
        for _ in range(16)
    ]
    replies = [pair.chosen for pair in pairs]
    tokenizer = tiny_base.tokenizer
    peft = attach_adapters(tiny_base.model, AdapterConfig(freeze_a=True))
    before, a_before = adapter_to_arrays(peft, SHARED, "B"), adapter_to_arrays(peft, SHARED, "AB")
    config = TrainConfig(objective="both", steps=10, batch_size=8, max_length=64, learning_rate=5e-3)
    LocalTrainer(tiny_base, peft, config).train(SHARED, pairs, progress=False)
    after, a_after = adapter_to_arrays(peft, SHARED, "B"), adapter_to_arrays(peft, SHARED, "AB")
    assert all(np.array_equal(a_before[k], a_after[k]) for k in a_before if ".lora_A." in k)  # FFA: A frozen
    assert not all(np.array_equal(before[k], after[k]) for k in before)

    top_k = len(trained_token_ids(tokenizer, replies))  # K = number of distinct trained tokens
    inversion = invert_update(peft, tokenizer, SHARED, before, after, "B", PROBES, top_k=top_k, text_tokens=16)
    score = score_inversion(inversion, replies, tokenizer)
    print("trained update:", score.to_dict(), repr(inversion.text))
    assert len(inversion.token_ids) == top_k and list(inversion.scores) == sorted(inversion.scores, reverse=True)
    assert score.token_precision >= 5 * score.chance_precision and score.token_recall >= 0.2
    assert sum(tokenizer.decode([t]).strip() in SECRET for t in inversion.token_ids) >= 5
    assert all(np.array_equal(adapter_to_arrays(peft, SHARED, "B")[k], after[k]) for k in after)  # weights restored

    noise = np.random.default_rng(0)
    length = math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))
    random_update = {k: noise.standard_normal(v.shape).astype(np.float32) for k, v in before.items()}
    scale = length / math.sqrt(sum(float((v**2).sum()) for v in random_update.values()))
    random_after = {k: before[k] + scale * random_update[k] for k in before}
    control = score_inversion(
        invert_update(peft, tokenizer, SHARED, before, random_after, "B", PROBES, top_k=top_k, text_tokens=4),
        replies,
        tokenizer,
    )
    print("random update of the same norm:", control.to_dict())
    assert control.token_precision <= 2.5 * control.chance_precision < score.token_precision
    with pytest.raises(FedpalError, match="zero"):
        invert_update(peft, tokenizer, SHARED, before, before, "B", PROBES, top_k=top_k)
