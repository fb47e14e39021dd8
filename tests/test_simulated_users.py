"""Simulated users, their attributes, prompts, styles and the evaluation arithmetic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedpal.common.types import PreferencePair
from fedpal.simulations.attributes import (
    ATTRIBUTE_NAMES,
    attribute_matrix,
    attribute_vector,
    flesch_kincaid_grade,
    measure,
)
from fedpal.simulations.evaluation import (
    BaselineResult,
    candidate_headroom,
    cross_user_matrix,
    diagonal_best,
    diagonal_best_fraction,
    diagonal_margin,
    evaluate_baseline,
    summarize_baseline,
    win_rates,
)
from fedpal.simulations.prompts import load_prompt_records, load_prompts, sample_prompts
from fedpal.simulations.styles import (
    STYLES,
    STYLES_BY_NAME,
    candidate_generation_prompts,
    prompt_topic,
    synthetic_reply,
)
from fedpal.simulations.users import (
    ARCHETYPES,
    SimulatedUser,
    choose_favourite,
    label_candidates,
    make_population,
)

PROSE = (
    "Boil salted water, add the pasta, stir once and cook it until it is tender, "
    "then drain it and toss it with the sauce."
)
BULLETS = "Steps:\n- Boil salted water.\n- Add the pasta.\n- Cook until tender.\n- Drain it."
PROMPTS = load_prompts("train")[::24]


def _user(targets: dict[str, float], weights: dict[str, float], temperature=0.05) -> SimulatedUser:
    w = np.array([weights.get(n, 0.0) for n in ATTRIBUTE_NAMES])
    t = np.array([targets.get(n, 0.5) for n in ATTRIBUTE_NAMES])
    return SimulatedUser("u", "custom", w, t, temperature=temperature)


def _style_replies(seed: int = 0) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    return {s.name: [synthetic_reply(p, s, rng) for p in PROMPTS] for s in STYLES}


# --- attributes -------------------------------------------------------------------------


def test_bulleted_reply_scores_higher_on_structure_than_prose():
    assert measure(BULLETS)["structure"] > 0.6
    assert measure(PROSE)["structure"] == 0.0


def test_longer_text_has_larger_length():
    assert measure(PROSE + " " + PROSE)["length"] > measure(PROSE)["length"] > measure("Yes.")["length"]


def test_formal_text_is_more_formal_than_casual_text():
    formal = (
        "Regarding your request, it is advisable to ensure the form is complete. Furthermore, please note the deadline."
    )
    casual = "Hey, you're gonna wanna fill out the form, it's pretty easy! No worries."
    assert measure(formal)["formality"] > 0.7 > 0.3 > measure(casual)["formality"]
    assert measure(PROSE)["formality"] == pytest.approx(0.5)


def test_warmth_questions_examples_and_topics_respond_to_their_markers():
    warm = "Great idea, I love it! Enjoy the trip and good luck!"
    assert measure(warm)["warmth"] > 0.8 and measure(PROSE)["warmth"] == 0.0
    assert measure("Which sauce do you like? And how spicy?")["questions"] == 1.0
    assert measure("Cook it. Which sauce do you like?")["questions"] == 0.5
    assert measure(PROSE)["questions"] == 0.0
    assert measure("Use a strong spice, for example cumin.")["examples"] == 0.5
    assert measure(PROSE)["examples"] == 0.0
    budget = measure("Buy the cheap brand to save money and stay on budget.")
    assert budget["topic_budget"] == 1.0 and budget["topic_safety"] == 0.0
    assert measure("Be careful, it is a safety risk.")["topic_safety"] == 1.0


def test_reading_level_rises_with_long_words_and_sentences():
    simple = "The cat sat. It was fun. We ran home."
    hard = (
        "Institutional considerations regarding computational methodologies necessitate "
        "comprehensive evaluation of organizational infrastructure and interoperability."
    )
    assert flesch_kincaid_grade(hard) > flesch_kincaid_grade(PROSE) > flesch_kincaid_grade(simple)
    assert measure(hard)["reading_level"] > measure(simple)["reading_level"]


def test_attributes_are_normalized_and_vectorised():
    texts = [r for replies in _style_replies().values() for r in replies] + ["", "!!!", "?"]
    matrix = attribute_matrix(texts)
    assert matrix.shape == (len(texts), len(ATTRIBUTE_NAMES))
    assert np.all((matrix >= 0.0) & (matrix <= 1.0))
    np.testing.assert_array_equal(matrix[0], attribute_vector(texts[0]))
    assert attribute_matrix([]).shape == (0, len(ATTRIBUTE_NAMES))


# --- users ------------------------------------------------------------------------------


def test_utility_prefers_the_reply_matching_the_targets():
    weights = {n: 1.0 for n in ATTRIBUTE_NAMES}
    user = _user(dict(zip(ATTRIBUTE_NAMES, attribute_vector(BULLETS))), weights)
    assert user.utility(BULLETS) == pytest.approx(1.0)
    assert user.utility(PROSE) < 1.0
    short_fan = _user({"length": 0.3}, {"length": 1.0})
    assert short_fan.utility("Boil the pasta.") > short_fan.utility(PROSE + " " + PROSE)


def test_opposed_archetypes_disagree_on_style():
    attributes = {style: attribute_matrix(r) for style, r in _style_replies().items()}
    users = make_population(20, seed=3, minority_fraction=0.2)

    def mean_utility(archetype: str, style: str) -> float:
        group = [u for u in users if u.archetype == archetype]
        return float(np.mean([u.utility_of_attributes(attributes[style]).mean() for u in group]))

    assert mean_utility("concise", "one_sentence") > mean_utility("concise", "detailed_example")
    assert mean_utility("detailed", "detailed_example") > mean_utility("detailed", "one_sentence")
    assert mean_utility("warm", "warm_question") > mean_utility("warm", "formal")
    assert mean_utility("formal", "formal") > mean_utility("formal", "warm_question")
    minority_best = max(attributes, key=lambda s: mean_utility("budget_plain", s))
    assert minority_best == "budget_simple"


@pytest.mark.parametrize("temperature", [0.02, 0.1])
def test_bradley_terry_choice_rate_matches_temperature(temperature):
    user = _user({"length": 0.3}, {"length": 1.0}, temperature=temperature)
    short, long = "Boil the pasta.", PROSE
    delta = user.utility(short) - user.utility(long)
    expected = 1.0 / (1.0 + math.exp(-delta / temperature))
    assert user.preference_probability(short, long) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    n = 1500
    rate = np.mean([user.prefers(short, long, rng) for _ in range(n)])
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3
    assert 0.5 < expected < 1.0


def test_ratings_are_in_range_and_track_utility():
    user = _user({"length": 0.3}, {"length": 1.0}, temperature=0.05)
    rng = np.random.default_rng(1)
    good = [user.rate("Boil the pasta.", rng) for _ in range(300)]
    bad = [user.rate(PROSE * 2, rng) for _ in range(300)]
    assert set(good + bad) <= {1, 2, 3, 4, 5}
    assert np.mean(good) > np.mean(bad) + 1.0


def test_population_is_deterministic_from_the_seed():
    a, b, c = make_population(12, seed=7), make_population(12, seed=7), make_population(12, seed=8)
    for ua, ub in zip(a, b):
        np.testing.assert_array_equal(ua.weights, ub.weights)
        np.testing.assert_array_equal(ua.targets, ub.targets)
        assert (ua.archetype, ua.stated_preference) == (ub.archetype, ub.stated_preference)
    assert any(not np.allclose(ua.targets, uc.targets) for ua, uc in zip(a, c))
    profile = a[0].to_dict()
    assert json.loads(json.dumps(profile)) == profile
    assert profile["targets"]["length"] == pytest.approx(a[0].targets[ATTRIBUTE_NAMES.index("length")])


def test_population_mixes_archetypes_and_a_minority():
    users = make_population(10, seed=0, minority_fraction=0.2)
    assert sum(u.is_minority for u in users) == 2
    assert all(u.archetype == "budget_plain" for u in users if u.is_minority)
    majority = [u.archetype for u in users if not u.is_minority]
    assert {"concise", "detailed", "warm", "formal"} <= set(majority)
    assert len({u.user_id for u in users}) == 10
    assert sum(u.is_minority for u in make_population(3, seed=0, minority_fraction=0.1)) == 1


def test_stated_preferences_can_be_full_partial_or_absent():
    silent = make_population(8, seed=1, stated_fraction=0.0)
    assert all(u.stated_preference is None for u in silent)
    full = make_population(8, seed=1, stated_fraction=1.0)
    for u in full:
        for sentence in ARCHETYPES[u.archetype].statements.values():
            assert sentence in u.stated_preference
    partial = make_population(40, seed=1, stated_fraction=0.5)
    lengths = [len(u.stated_attributes) for u in partial]
    assert min(lengths) < max(lengths)


def test_label_candidates_makes_pairs_and_ratings():
    user = make_population(4, seed=2)[0]
    prompt = PROMPTS[0]
    rng = np.random.default_rng(0)
    candidates = [synthetic_reply(prompt, s, rng) for s in STYLES]
    candidates.append(candidates[0])
    labelled = label_candidates(user, prompt, candidates, np.random.default_rng(5))
    k = len(candidates)
    assert len(labelled.pairs) == k * (k - 1) // 2 - 1  # the duplicate is never paired with itself
    assert all(isinstance(p, PreferencePair) and p.chosen != p.rejected for p in labelled.pairs)
    assert [r.reply for r in labelled.ratings] == candidates
    again = label_candidates(user, prompt, candidates, np.random.default_rng(5))
    assert again == labelled
    limited = label_candidates(user, prompt, candidates, np.random.default_rng(5), max_pairs=4)
    assert len(limited.pairs) == 4


def test_choose_favourite_pairs_the_best_candidate_against_the_others():
    base = make_population(6, seed=4)[1]
    sharp = SimulatedUser("u", base.archetype, base.weights, base.targets, temperature=1e-4)
    rng = np.random.default_rng(0)
    prompt = PROMPTS[1]
    candidates = [synthetic_reply(prompt, s, rng) for s in STYLES]
    candidates.append(candidates[1])
    best = candidates[int(np.argmax(sharp.utilities(candidates)))]
    labelled = choose_favourite(sharp, prompt, candidates, np.random.default_rng(3))
    assert {p.chosen for p in labelled.pairs} == {best}
    assert sorted(p.rejected for p in labelled.pairs) == sorted(set(candidates) - {best})
    assert [r.reply for r in labelled.ratings] == candidates
    assert choose_favourite(sharp, prompt, candidates, np.random.default_rng(3)) == labelled
    assert len(choose_favourite(sharp, prompt, candidates, np.random.default_rng(3), max_pairs=2).pairs) == 2
    noisy = SimulatedUser("v", base.archetype, base.weights, base.targets, temperature=10.0)
    picks = {choose_favourite(noisy, prompt, candidates, np.random.default_rng(i)).pairs[0].chosen for i in range(40)}
    assert len(picks) > 1  # Luce's choice rule: a noisy user does not always pick the best


def test_labels_follow_utility_when_noise_is_low():
    base = make_population(6, seed=4)[1]
    user = SimulatedUser("u", base.archetype, base.weights, base.targets, temperature=1e-3)
    rng = np.random.default_rng(0)
    agree = total = 0
    for prompt in PROMPTS:
        candidates = [synthetic_reply(prompt, s, rng) for s in STYLES]
        utility = dict(zip(candidates, user.utilities(candidates)))
        for pair in label_candidates(user, prompt, candidates, rng).pairs:
            gap = utility[pair.chosen] - utility[pair.rejected]
            agree += gap > 0
            total += abs(gap) > 1e-9
    assert agree / total > 0.95


# --- prompts and styles -----------------------------------------------------------------


def test_prompt_pool_is_large_with_disjoint_splits():
    train, heldout = load_prompts("train"), load_prompts("heldout")
    assert len(train) + len(heldout) >= 300 and len(heldout) >= 50
    assert not set(train) & set(heldout)
    assert len(set(train)) == len(train)
    train_categories = {p.category for p in load_prompt_records("train")}
    assert len(train_categories) >= 10
    assert train_categories == {p.category for p in load_prompt_records("heldout")}
    sample = sample_prompts("heldout", 10, seed=3)
    assert sample == sample_prompts("heldout", 10, seed=3) and set(sample) <= set(heldout)
    with pytest.raises(ValueError):
        load_prompts("test")


def test_candidate_prompts_carry_the_style_instruction():
    prompt = "How do I store fresh herbs?"
    built = candidate_generation_prompts(prompt)
    assert len(built) == len(STYLES)
    for style, text in zip(STYLES, built):
        assert text.startswith(prompt) and text.endswith(style.instruction)
    assert built[0] == prompt
    assert prompt_topic("How do I store fresh herbs so they last longer?") == "store fresh herbs so they last longer"


def test_synthetic_replies_are_deterministic_and_have_their_style():
    prompt = PROMPTS[3]
    one = [synthetic_reply(prompt, s, np.random.default_rng(9)) for s in STYLES]
    two = [synthetic_reply(prompt, s, np.random.default_rng(9)) for s in STYLES]
    assert one == two
    attrs = {s.name: measure(synthetic_reply(prompt, s, np.random.default_rng(1))) for s in STYLES}
    assert attrs["bulleted"]["structure"] > attrs["plain"]["structure"]
    assert attrs["one_sentence"]["length"] == min(a["length"] for a in attrs.values())
    assert attrs["detailed_example"]["examples"] > 0
    assert attrs["warm_question"]["questions"] > 0 and attrs["warm_question"]["warmth"] > 0.5
    assert attrs["formal"]["formality"] > attrs["casual"]["formality"]
    assert attrs["budget_simple"]["topic_budget"] == 1.0
    with pytest.raises(ValueError):
        synthetic_reply(prompt, "shouting", np.random.default_rng(0))
    assert STYLES_BY_NAME["plain"].instruction == ""


# --- evaluation -------------------------------------------------------------------------


def test_win_rates_count_ties_as_half():
    utilities = np.array([[0.9, 0.5, 0.1, 0.7], [0.2, 0.2, 0.2, 0.2]])
    base = np.array([[0.5, 0.5, 0.5, 0.5], [0.1, 0.3, 0.2, 0.2]])
    np.testing.assert_allclose(win_rates(utilities, base), [(1 + 0.5 + 0 + 1) / 4, (1 + 0 + 0.5 + 0.5) / 4])
    with pytest.raises(ValueError):
        win_rates(utilities, base[:, :3])


def test_candidate_headroom_scores_best_style_and_best_candidate_against_plain():
    users = make_population(4, seed=3)
    rng = np.random.default_rng(1)
    candidates = [[synthetic_reply(p, s, rng) for s in STYLES] for p in PROMPTS[:6]]
    names = [s.name for s in STYLES]
    headroom = candidate_headroom(users, candidates, names)
    table = np.stack([np.array([u.utilities(row) for row in candidates]) for u in users])
    plain = table[:, :, names.index("plain")]
    for i, style in enumerate(headroom["best_style_per_user"]):
        assert table[i, :, names.index(style)].mean() == pytest.approx(table[i].mean(axis=0).max())
    assert headroom["best_candidate_win_rate_vs_base"] == pytest.approx(win_rates(table.max(axis=2), plain).mean())
    assert headroom["best_style_win_rate_vs_base"] <= headroom["best_candidate_win_rate_vs_base"] <= 1.0
    assert (
        headroom["base_mean_utility"] <= headroom["best_style_mean_utility"] <= headroom["best_candidate_mean_utility"]
    )
    only_plain = candidate_headroom(users, [[row[0]] * 2 for row in candidates], ["plain", "copy"])
    assert only_plain["best_candidate_win_rate_vs_base"] == 0.5  # nothing better on offer: all ties
    assert candidate_headroom(users, candidates, [f"s{i}" for i in range(len(names))]) is None


def test_summarize_baseline_reports_mean_worst_and_minority():
    utilities = np.array([[0.8, 0.6], [0.4, 0.2], [0.9, 0.7]])
    base = np.full((3, 2), 0.5)
    result = summarize_baseline("fedpal", utilities, base, [False, True, False])
    assert isinstance(result, BaselineResult)
    assert result.per_user_utility == pytest.approx((0.7, 0.3, 0.8))
    assert result.mean_utility == pytest.approx(0.6)
    assert result.worst_user_utility == pytest.approx(0.3)
    assert result.minority_utility == pytest.approx(0.3)
    assert result.win_rate_vs_base == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert summarize_baseline("x", utilities, base, [False] * 3).minority_utility is None
    assert result.to_dict()["per_user_utility"] == pytest.approx([0.7, 0.3, 0.8])


def test_diagonal_best_is_strict_and_margin_measures_the_gap():
    matrix = np.array([[0.9, 0.5, 0.4], [0.6, 0.6, 0.3], [0.2, 0.8, 0.7]])
    assert diagonal_best(matrix).tolist() == [True, False, False]
    assert diagonal_best_fraction(matrix) == pytest.approx(1 / 3)
    np.testing.assert_allclose(diagonal_margin(matrix), [0.45, 0.15, 0.2])
    assert diagonal_best_fraction(np.full((4, 4), 0.5)) == 0.0
    with pytest.raises(ValueError):
        diagonal_best_fraction(np.ones((2, 3)))


def test_cross_user_matrix_peaks_on_the_diagonal_when_replies_match_each_user():
    users = make_population(10, seed=5, minority_fraction=0.2)
    replies = _style_replies(seed=2)
    favourite = {
        "concise": "one_sentence",
        "detailed": "detailed_example",
        "warm": "warm_question",
        "formal": "formal",
        "budget_plain": "budget_simple",
    }
    per_user = [replies[favourite[u.archetype]] for u in users]
    matrix = cross_user_matrix(users, per_user)
    assert matrix.shape == (10, 10)
    assert matrix[0, 0] == pytest.approx(users[0].utilities(per_user[0]).mean())
    # Users sharing an archetype get identical replies, so they tie: no strict diagonal.
    own_best = [matrix[i, i] >= matrix[i].max() - 1e-12 for i in range(10)]
    assert all(own_best)
    result = evaluate_baseline("matched", users, per_user, replies["plain"])
    assert result.win_rate_vs_base > 0.8
    same = evaluate_baseline("base", users, [replies["plain"]] * 10, replies["plain"])
    assert same.win_rate_vs_base == 0.5
    assert result.minority_utility is not None and result.minority_utility > same.minority_utility
