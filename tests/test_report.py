"""The simulation report: files written, images valid, numbers and verdicts from the results."""

from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest
from matplotlib.image import imread

from fedpal.simulations.evaluation import (
    cross_user_matrix,
    diagonal_best_fraction,
    evaluate_baseline,
)
from fedpal.simulations.prompts import sample_prompts
from fedpal.simulations.report import REQUIRED_KEYS, validate_results, write_report
from fedpal.simulations.styles import STYLES_BY_NAME, synthetic_reply
from fedpal.simulations.users import make_population

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@cache
def _scored_run() -> dict:
    """Results of a simulated run scored end to end with template replies: base answers
    plainly; 'fedpal' answers each user in their archetype's favourite style."""
    users = make_population(5, seed=11, minority_fraction=0.2)
    prompts = sample_prompts("heldout", 6, seed=0)
    rng = np.random.default_rng(0)
    favourite = {
        "concise": "one_sentence",
        "detailed": "detailed_example",
        "warm": "warm_question",
        "formal": "formal",
        "budget_plain": "budget_simple",
    }
    by_style = {
        name: [synthetic_reply(p, STYLES_BY_NAME[name], rng) for p in prompts]
        for name in {"plain", "bulleted", *favourite.values()}
    }
    base = by_style["plain"]
    personal = [by_style[favourite[u.archetype]] for u in users]
    baselines = {
        "base": evaluate_baseline("base", users, [base] * len(users), base),
        "shared_only": evaluate_baseline("shared_only", users, [by_style["bulleted"]] * len(users), base),
        "fedpal": evaluate_baseline("fedpal", users, personal, base),
    }
    matrix = cross_user_matrix(users, personal)
    results = {
        "preset": "quick",
        "model": "tiny",
        "users": len(users),
        "rounds": 3,
        "epsilon": 4.2,
        "delta": 1e-5,
        "noise_multiplier": 0.9,
        "clients_per_round": 3,
        "bytes_per_client_round": 2048,
        "baselines": {name: r.to_dict() for name, r in baselines.items()},
        "cross_user_diagonal_best_fraction": diagonal_best_fraction(matrix),
        "curves": {
            "rounds": {"x": [1, 2, 3], "series": {"fedpal": [0.5, 0.6, 0.7], "shared_only": [0.5, 0.55, 0.56]}},
            "pairs": {"x": [4, 8, 16], "series": {"fedpal": [0.55, 0.62, 0.7]}},
        },
        "cross_user_matrix": matrix.tolist(),
        "epsilon_per_round": [1.5, 3.0, 4.2],
        "user_ids": [u.user_id for u in users],
        "minority_users": [u.user_id for u in users if u.is_minority],
        "seed": 11,
        "notes": ["template replies stand in for the model"],
    }
    return results


def _results(**overrides) -> dict:
    """A fresh copy of the scored run with some keys replaced."""
    results = copy.deepcopy(_scored_run())
    results.update(overrides)
    return results


def _assert_valid_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something was drawn


def test_report_writes_markdown_and_valid_pngs(tmp_path):
    results = _results()
    files = write_report(results, tmp_path / "out")
    assert files.report.exists()
    for png in files.pngs():
        _assert_valid_png(png)
    text = files.report.read_text()
    for png in files.pngs():
        assert f"]({png.name})" in text
    fedpal = results["baselines"]["fedpal"]
    assert f"{fedpal['mean_utility']:.3f}" in text
    assert f"{100 * fedpal['win_rate_vs_base']:.0f}%" in text
    assert "ε = 4.20" in text and "1 in the minority group" in text
    assert "template replies stand in for the model" in text


def test_report_verdict_follows_the_numbers(tmp_path):
    results = _results()
    assert results["baselines"]["fedpal"]["win_rate_vs_base"] >= 0.7
    text = write_report(results, tmp_path / "good").report.read_text()
    assert "**met**" in text and "win rate is above every other baseline" in text

    weak = copy.deepcopy(results)
    weak["baselines"]["fedpal"]["win_rate_vs_base"] = 0.4
    weak["baselines"]["shared_only"]["win_rate_vs_base"] = 0.6
    weak["baselines"]["fedpal"]["mean_utility"] = 0.0
    text = write_report(weak, tmp_path / "weak").report.read_text()
    assert "**not met**" in text and "win rate is not above: base, shared_only" in text
    assert "mean utility is not above: base, shared_only" in text


def test_report_without_privacy_curves_or_matrix_still_writes_everything(tmp_path):
    results = _results(
        epsilon=None,
        delta=None,
        noise_multiplier=0.0,
        epsilon_per_round=[None, None, None],
        curves={},
        cross_user_matrix=[],
        cross_user_diagonal_best_fraction=0.0,
    )
    files = write_report(results, tmp_path)
    assert "differential privacy **off**" in files.report.read_text()
    for png in files.pngs():
        _assert_valid_png(png)


def test_validate_results_names_each_problem():
    validate_results(_results())
    broken = _results(cross_user_matrix=[[0.1, 0.2]])
    del broken["epsilon"]
    broken["baselines"]["fedpal"].pop("worst_user_utility")
    broken["curves"]["rounds"]["series"]["fedpal"] = [0.5]
    with pytest.raises(ValueError) as err:
        validate_results(broken)
    message = str(err.value)
    for fragment in ("'epsilon'", "'worst_user_utility'", "not square", "rounds/fedpal"):
        assert fragment in message
    assert set(REQUIRED_KEYS) <= set(_results())
