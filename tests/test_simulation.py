"""``fedpal simulate``: the whole experiment on the tiny model, through real Flower rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from fedpal.common.errors import FedpalError
from fedpal.simulations.config import PRESETS, load_config
from fedpal.simulations.report import REQUIRED_KEYS
from fedpal.server.federation import load_global_adapter
from fedpal.simulations.experiment.results import BASELINES
from fedpal.simulations.runner import simulate

SMALL = replace(
    PRESETS["quick"],
    users=3,
    clients_per_round=3,
    rounds=1,
    train_prompts=4,
    heldout_prompts=3,
    curve_prompts=2,
    local_steps=2,
    personal_steps=2,
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    result = subprocess.run(
        [sys.executable, "-m", "fedpal.common.cli", "simulate", "--preset", "quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_quick_preset_writes_results_report_and_plots(quick_run):
    out, result = quick_run
    results = json.loads((out / "results.json").read_text())
    assert set(REQUIRED_KEYS) <= set(results)
    assert results["preset"] == "quick" and results["users"] == 4 and results["rounds"] == 2
    assert set(results["baselines"]) == set(BASELINES), "merge mode: no merge ablation repeating fedpal"
    for row in results["baselines"].values():
        assert 0.0 <= row["mean_utility"] <= 1.0 and 0.0 <= row["win_rate_vs_base"] <= 1.0
    assert results["baselines"]["base"]["win_rate_vs_base"] == pytest.approx(0.5)
    assert len(results["epsilon_per_round"]) == 2
    assert 0 < results["epsilon_per_round"][0] < results["epsilon_per_round"][1] == results["epsilon"]
    assert results["bytes_per_client_round"] > 0
    assert len(results["cross_user_matrix"]) == 4 and all(len(row) == 4 for row in results["cross_user_matrix"])
    assert len(results["curves"]["rounds"]["series"]["fedpal"]) == 2
    assert results["curves"]["pairs"]["x"][0] < results["curves"]["pairs"]["x"][1], "memories grow between rounds"
    for name in ("report.md", "learning_curves.png", "win_rates.png", "cross_user_heatmap.png", "epsilon.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fedpal" in (out / "report.md").read_text()
    assert "mean utility" in result.stdout


def test_quick_preset_really_federated(quick_run):
    out, _ = quick_run
    rounds = [json.loads(line) for line in (out / "federation" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_summed"] == 4 and r["secagg"] and r["dp"] for r in rounds)
    assert all(r["global_change_norm"] > 0 for r in rounds)


def test_the_whole_experiment_is_one_flwr_run_with_each_user_on_its_node(quick_run):
    """One app, one ``flwr run`` on a simulation SuperLink: no per-round restart; the users'
    phases between rounds were the ServerApp's, reported to the launcher's progress bars."""
    out, result = quick_run
    log = (out / "flwr-run.log").read_text()
    assert log.count("Successfully started run") == 1
    assert "(4 simulated SuperNodes)" in log
    assert (
        "run_simulation" not in log and "Successfully started run" not in result.stderr
    )  # Flower's logs stay in the file
    phases = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    started = [line["phase"] for line in phases if "total" in line]
    assert started[0] == "users join and answer round 1's prompts" and len(started) == 4  # join, rounds, 2 x between
    assert all(
        max(line["done"] for line in phases if line["phase"] == name and "done" in line)
        == next(line["total"] for line in phases if line["phase"] == name and "total" in line)
        for name in started
    )
    from fedpal.client.memory import PreferenceMemory

    for index in range(4):  # each node kept both of its user's homes, federated and local-only, with the same pairs
        pairs = []
        for home in (out / "users" / str(index), out / "local" / str(index)):
            assert (home / "runtime" / "export.json").is_file()
            with PreferenceMemory.open(home, passphrase="fedpal-simulation-0") as memory:
                pairs.append(sorted((r.fields["prompt"], r.fields["chosen"]) for r in memory.records("pair")))
        assert pairs[0] == pairs[1] and len(pairs[0]) > 0


def test_fedpal_replies_are_what_fedpal_generate_gives_the_user(quick_run):
    """The simulation measures the code users run: `fedpal generate --retrieval` at its defaults,
    in a separate process, answers user 1's held-out prompts exactly as results.json scored them."""
    import os

    from fedpal.simulations.config import PRESETS

    out, _ = quick_run
    stored = json.loads((out / "replies.json").read_text())
    env = {**os.environ, "FEDPAL_PASSPHRASE": "fedpal-simulation-0"}
    for prompt, expected in list(zip(stored["prompts"], stored["replies"]["fedpal"][1]))[:2]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedpal.common.cli",
                "generate",
                "--home",
                str(out / "users" / "1"),
                "--prompt",
                prompt,
                "--retrieval",
                "--max-new-tokens",
                str(PRESETS["quick"].reply_tokens),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["text"] == expected


def test_memories_are_encrypted_and_hold_the_interactions(quick_run):
    out, _ = quick_run
    replies = json.loads((out / "candidates.json").read_text())["candidates"]
    some_reply = next(iter(replies.values()))[0]
    database = (out / "users" / "0" / "memory.sqlite").read_bytes()
    assert some_reply.encode()[:40] not in database


@pytest.mark.slow
def test_the_experiment_on_a_two_node_ray_cluster_gives_the_same_results(quick_run, tmp_path):
    """Only the Ray address changes (``--ray-address``): the users' nodes run on both Ray nodes,
    and results.json scores what the single-node run scored."""
    from ray_cluster import ActorParents, two_node_cluster

    single_out, _ = quick_run
    out = tmp_path / "two-nodes"
    with two_node_cluster() as (address, raylets), ActorParents() as parents:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedpal.common.cli",
                "simulate",
                "--preset",
                "quick",
                "--out",
                str(out),
                "--ray-address",
                address,
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert parents.seen == raylets, (parents.seen, raylets)
    single, cluster = (json.loads((folder / "results.json").read_text()) for folder in (single_out, out))
    for key in ("baselines", "cross_user_matrix", "curves", "epsilon_per_round", "headroom", "users_detail"):
        assert json.dumps(cluster[key], sort_keys=True) == json.dumps(single[key], sort_keys=True), key
    assert json.loads((out / "replies.json").read_text()) == json.loads((single_out / "replies.json").read_text())
    ours, theirs = load_global_adapter(out / "federation"), load_global_adapter(single_out / "federation")
    for name in ours:
        assert np.allclose(ours[name], theirs[name], atol=1e-6), name


@pytest.mark.slow
def test_same_seed_same_results(tmp_path):
    """Slow (suite time: two runs); the default suite checks that a population run samples the
    same users from the same seed (test_population)."""
    first = simulate(SMALL, tmp_path / "a")
    second = simulate(SMALL, tmp_path / "b")
    for key in ("baselines", "cross_user_matrix", "epsilon_per_round", "curves"):
        assert json.dumps(first[key], sort_keys=True) == json.dumps(second[key], sort_keys=True), key
    # SecAgg+ masks are fresh random numbers, so their protobuf encoding varies by a few bytes
    assert first["bytes_per_client_round"] == pytest.approx(second["bytes_per_client_round"], rel=0.01)
    adapters = [load_global_adapter(tmp_path / run / "federation") for run in ("a", "b")]
    assert adapters[0].keys() == adapters[1].keys()
    # deterministic runs replay the DP noise and the clients' SecAgg+ stochastic rounding
    for name in adapters[0]:
        assert np.allclose(adapters[0][name], adapters[1][name], atol=1e-6), f"global adapter differs at {name}"


def test_bad_settings_are_one_clear_line(tmp_path):
    with pytest.raises(FedpalError, match="unknown preset"):
        load_config("enormous")
    bad = tmp_path / "bad.toml"
    bad.write_text("users = 'many'\n")
    with pytest.raises(FedpalError, match="'users' must be int"):
        load_config("quick", bad)
    bad.write_text("userz = 3\n")
    with pytest.raises(FedpalError, match="unknown setting 'userz'"):
        load_config("quick", bad)
    bad.write_text("users = 1\n")
    with pytest.raises(FedpalError, match="at least 2 users"):
        load_config("quick", bad)
    for setting, message in (
        ("labelling = 'vibes'", "labelling must be"),
        ("retrieval_in = 'footer'", "retrieval_in must be"),
        ("lora_top_layers = -1", "lora_top_layers must be 0"),
        ("strategy = 'fedmagic'", "strategy must be one of"),
    ):
        bad.write_text(setting + "\n")
        with pytest.raises(FedpalError, match=message):
            load_config("quick", bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"users": 5, "rounds": 3, "learning_rate": 1}))
    config = load_config("quick", good)
    assert (config.users, config.rounds, config.learning_rate) == (5, 3, 1.0)


def test_personal_adapters_train_from_the_configured_round(tmp_path):
    """Before ``personal_from_round`` clients send shared updates only; the local-only baseline
    then catches up with every step a client trained until then."""
    from fedpal.simulations.experiment.node import local_only_steps

    config = replace(SMALL, rounds=3, train_prompts=6, local_steps=2, personal_steps=3, personal_from_round=3)
    settings = config.federation(tmp_path)
    assert [settings.train_config(r)["personal-steps"] for r in (1, 2, 3)] == [0, 0, 3]
    assert local_only_steps(config, 3) == 3 * 2 + 3
    assert not settings["final-adapter"], "the between-rounds message brings each round's aggregate"
    every = replace(config, personal_from_round=1)
    assert [local_only_steps(every, r) for r in (1, 2, 3)] == [5, 5, 5]
    settings = every.federation(tmp_path)
    assert [settings.train_config(r)["personal-steps"] for r in (1, 2, 3)] == [3, 3, 3]
    for bad in (0, 4):
        with pytest.raises(FedpalError, match="personal_from_round must be between 1 and rounds"):
            replace(config, personal_from_round=bad).check()
