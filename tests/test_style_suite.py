"""The style suite: six single-preference users, `fedpal train` at its defaults, replies to unseen prompts."""

from __future__ import annotations

import json
import random

import pytest

from fedpal.simulations.stylesuite import STYLE_USERS, as_bullets, complete, sentences


def test_each_users_edit_shows_their_preference_and_the_plain_reply_does_not():
    reply = (
        "Start by soaking the beans overnight in plenty of cold water. Then simmer them for an hour "
        "with a pinch of salt and a bay leaf. Taste one before you drain them, and keep the cooking water "
        "for a soup later in the week"
    )
    extra = "Soak a cup of black beans in the evening and cook them for lunch the next day."
    kinds = set()
    for user in STYLE_USERS:
        chosen = user.edit("How do I cook dry beans?", reply, extra, random.Random(0))
        assert user.shows(chosen) and not user.shows(reply), user.name
        kinds.add(user.kind)
    assert len(STYLE_USERS) >= 6 and len(kinds) == len(STYLE_USERS)  # six different kinds of preference


def test_text_helpers():
    assert complete("One. Two! Three") == "One. Two!"
    assert sentences("- a.\n- b. c?") == ["a.", "b.", "c?"]
    assert as_bullets("One thing. Another thing.") == "- One thing.\n- Another thing."


def test_quick_suite_runs_fedpal_train_and_generate_end_to_end(tmp_path):
    from fedpal.simulations.benchmarks.style import main

    report = main(["--quick", "--json", "--out", str(tmp_path)])
    assert set(report["users"]) == {"bullets", "summary"}
    for user in report["users"].values():
        assert user["pairs"] >= 8 and user["train"]["heldout_pairs"] > 0
        assert 0.0 <= user["base_rate"] <= 1.0 and 0.0 <= user["personalized_rate"] <= 1.0
        assert set(user["base_fluency"]) == {"repetition", "distinct2", "collapsed"}
    checks = report["checks"]
    assert set(checks) == {"mean_rise", "min_rise", "fluency", "train_seconds"}
    assert checks["min_rise"]["measured"] == report["min_rise"]
    assert checks["min_rise"]["holds"] == (report["min_rise"] >= 0.3)
    saved = json.loads((tmp_path / "style.json").read_text())
    assert saved["mean_rise"] == report["mean_rise"]
    assert (tmp_path / "style.png").read_bytes()[:4] == b"\x89PNG" and "Style suite" in (
        tmp_path / "style.md"
    ).read_text()


@pytest.mark.slow
def test_fedpal_train_defaults_personalize_every_style_user_on_the_default_model(tmp_path):
    """The personalization issue's must-show (~40 min on 2 CPU cores): at `fedpal train`'s defaults the
    preference rate rises by >= 0.5 on average and >= 0.3 for every user, fluency stays within 0.05
    of the base model's, and training takes <= 5 minutes per user."""
    from fedpal.simulations.benchmarks.style import main

    report = main(["--json", "--out", str(tmp_path)])
    assert report["mean_rise"] >= 0.5 and report["min_rise"] >= 0.3
    for name, user in report["users"].items():
        base, tuned = user["base_fluency"], user["personalized_fluency"]
        assert tuned["repetition"] <= base["repetition"] + 0.05, name
        assert tuned["distinct2"] >= base["distinct2"] - 0.05, name
        assert user["train_seconds"] <= 300, name
    assert all(check["holds"] for check in report["checks"].values()), report["checks"]
