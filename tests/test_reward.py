"""The user's reward model and reward-guided decoding (rerank) on the tiny model's real ONNX session."""

from __future__ import annotations

import numpy as np
import pytest

from fedpal.client.reward import RewardModel, accuracy, fit_reward
from fedpal.common.errors import FedpalError


def _planted(n: int, d: int, seed: int, noise: float = 0.3, draw: int = 0):
    """Pairs whose chosen reply is the one further along a hidden direction (plus label noise);
    the direction comes from ``seed``, the replies from ``draw``."""
    direction = np.random.default_rng(seed).normal(size=d)
    rng = np.random.default_rng([seed, draw])
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    better = (a - b) @ direction + noise * rng.normal(size=n) * np.linalg.norm(direction) > 0
    chosen = np.where(better[:, None], a, b)
    rejected = np.where(better[:, None], b, a)
    return chosen, rejected, [f"prompt {i // 3}" for i in range(n)], direction


def test_reward_learns_a_planted_preference_and_says_how_well_on_unseen_prompts():
    chosen, rejected, groups, direction = _planted(150, 20, seed=1)
    model = fit_reward(chosen, rejected, groups, fingerprint="x")
    assert model.pairs == 150 and model.prompts == 50
    assert model.cv_accuracy is not None and model.cv_accuracy > 0.8
    fresh = _planted(400, 20, seed=1, draw=1)  # unseen replies, same user
    assert accuracy(model, fresh[0], fresh[1]) > 0.8
    cosine = (
        model.weights
        @ (direction * model.scale)
        / np.linalg.norm(model.weights)
        / np.linalg.norm(direction * model.scale)
    )
    assert cosine > 0.8


def test_random_labels_give_chance_accuracy_not_a_confident_model():
    rng = np.random.default_rng(3)
    chosen, rejected = rng.normal(size=(120, 30)), rng.normal(size=(120, 30))
    model = fit_reward(chosen, rejected, [f"p{i // 3}" for i in range(120)])
    assert 0.3 < model.cv_accuracy < 0.7


def test_reward_round_trips_and_refuses_bad_input(tmp_path):
    chosen, rejected, groups, _ = _planted(30, 5, seed=2)
    model = fit_reward(chosen, rejected, groups, fingerprint="abc")
    loaded = RewardModel.load(model.save(tmp_path / "r" / "reward.npz"))
    assert loaded.fingerprint == "abc" and loaded.l2 == model.l2 and loaded.cv_accuracy == model.cv_accuracy
    assert np.allclose(loaded.scores(chosen), model.scores(chosen))
    with pytest.raises(FedpalError, match="at least 4 preference pairs"):
        fit_reward(chosen[:3], rejected[:3], groups[:3])
    with pytest.raises(FedpalError, match="expects 5 features"):
        model.scores(np.zeros((1, 6)))
    (tmp_path / "broken.npz").write_bytes(b"not numpy")
    with pytest.raises(FedpalError, match="unreadable reward model"):
        RewardModel.load(tmp_path / "broken.npz")


# ------------------------------------------------------------------ rerank through ONNX (tiny model)


@pytest.fixture(scope="module")
def generator():
    from fedpal.client.generator import PersonalizedGenerator
    from fedpal.client.onnx_export import export_model

    return PersonalizedGenerator(export_model("tiny", precision="fp32"))


def _home_preferring(tmp_path, longer: bool):
    """A user whose every pair prefers the longer (or the shorter) of two replies."""
    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PreferenceMemory

    home = ClientHome.at(tmp_path / ("long" if longer else "short"))
    words = "river stone bread light window garden paper music".split()
    with PreferenceMemory.open(home.root) as memory:
        for i in range(12):
            short = " ".join(words[i % 8 : i % 8 + 2])
            long = " ".join(words * 3)
            chosen, rejected = (long, short) if longer else (short, long)
            memory.add_pair(f"question {i}?", chosen, rejected)
    return home


def test_rerank_answers_with_the_draft_the_users_reward_scores_highest(generator, tmp_path, monkeypatch):
    """The random tiny model writes no readable text, so the drafts' texts are fixed here (by
    register, of clearly different lengths); drafting, features (the real ONNX session),
    the reward fitted from the memory and the choice are fedpal's own."""
    import dataclasses

    from fedpal.client.generator import REGISTERS, DecodeOptions

    monkeypatch.setenv("FEDPAL_PASSPHRASE", "pw")
    prompt, options = "How do I plan a trip?", DecodeOptions(max_new_tokens=24)
    texts = {prompt: "paper light window garden"}
    for k, register in enumerate(REGISTERS):
        texts[f"{prompt}\n\n{register}"] = " ".join(["river stone bread music"] * (1 + 3 * k)) if k % 2 else "bread"
    real = generator.generate
    monkeypatch.setattr(
        generator, "generate", lambda q, *a, **kw: dataclasses.replace(real(q, *a, **kw), text=texts.get(q, ""))
    )
    picks = {}
    for longer in (True, False):
        home = _home_preferring(tmp_path, longer)
        reply = generator.generate_for(home, prompt, mode="rerank", options=options)
        assert reply.mode == "rerank" and reply.draft in (["base"] + list(REGISTERS))
        reward = generator.user_reward(home)
        assert reward is not None and reward.pairs == 12 and reward.cv_accuracy > 0.9
        assert (home.runtime / generator.export.key / "reward.npz").is_file()
        scores = {q: reward.scores(generator.reply_features(prompt, t))[0] for q, t in texts.items()}
        assert reply.text == texts[max(scores, key=scores.get)]
        picks[longer] = reply.text
    assert len(picks[True]) > len(picks[False])  # opposite users, opposite choices


def test_rerank_without_enough_pairs_answers_like_merge(generator, tmp_path, monkeypatch):
    from fedpal.client.generator import DecodeOptions
    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PreferenceMemory

    monkeypatch.setenv("FEDPAL_PASSPHRASE", "pw")
    home = ClientHome.at(tmp_path / "new")
    with PreferenceMemory.open(home.root) as memory:
        memory.add_pair("q?", "a long answer here", "no")
    options = DecodeOptions(max_new_tokens=8)
    reply = generator.generate_for(home, "How do I plan a trip?", mode="rerank", options=options)
    assert reply.draft == "base"  # no adapters and no reward yet: the base model's own reply
    assert reply.token_ids == generator.generate("How do I plan a trip?", None, options).token_ids
    assert generator.user_reward(home) is None
