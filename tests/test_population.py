"""``fedpal population``: simulated users on their own client nodes of one Flower app.

The module's fixture runs ``fedpal population run --preset quick`` as a user runs it: one
``flwr run`` against a simulation SuperLink started (and stopped) for it, Flower's
Simulation Engine on Ray, DP and SecAgg+ on; about 40 s on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedpal.common.errors import FedpalError
from fedpal.common.privacy import PrivacyBudget, epsilon_after, noise_for_epsilon
from fedpal.simulations.population.settings import PRESETS, load_population_config
from fedpal.simulations.population.study import HeldoutScore, StudyPlan
from ray_cluster import ActorParents, two_node_cluster

QUICK = PRESETS["quick"]


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpal.common.cli", "population", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("population") / "quick"
    done = _cli("run", "--preset", "quick", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert json.loads(done.stdout) == results  # progress bars on stderr, one JSON document on stdout
    return results, out


def test_the_quick_preset_runs_every_round_as_one_flwr_run_and_every_user_scores_it(quick):
    results, out = quick
    assert results["rounds"] == QUICK.rounds and len(results["round_seconds"]) == QUICK.rounds
    log = (out / "flwr-run.log").read_text()
    assert log.count("Successfully started run") == 1  # one app, one run: no per-round restart
    assert f"({QUICK.users} simulated SuperNodes)" in log
    score = results["score"]
    assert score["users"] == QUICK.eval_users
    assert score["pairs"] == QUICK.eval_users * QUICK.heldout_prompts * QUICK.pairs_per_prompt
    assert 0 <= score["base_accuracy"] <= 1 and 0 <= score["shared_accuracy"] <= 1
    assert score["gain_ci95"][0] <= score["gain"] <= score["gain_ci95"][1]
    assert results["peak_memory_mb"] > 100  # the SuperLink, the ServerApp and Ray's workers were measured


def test_the_accountant_spent_what_the_settings_say(quick):
    results, _ = quick
    budget = PrivacyBudget(
        QUICK.noise_multiplier, QUICK.clipping_norm, QUICK.delta, QUICK.users, QUICK.clients_per_round
    )
    assert results["epsilon"] == pytest.approx(epsilon_after(budget, QUICK.rounds))
    assert results["noise_stddev_on_mean"] == pytest.approx(
        QUICK.noise_multiplier * QUICK.clipping_norm / QUICK.clients_per_round
    )


def test_sampled_users_stored_their_choices_encrypted_on_their_own_node(quick):
    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PreferenceMemory

    _, out = quick
    homes = sorted((out / "users").iterdir(), key=lambda p: int(p.name))
    assert len(homes) == QUICK.users  # every node saved the final adapter it scored
    stored, leaked = 0, []
    for home in homes:
        if not ClientHome(home).memory_db.exists():
            continue
        with PreferenceMemory.open(home, passphrase=f"fedpal-simulation-{QUICK.seed}") as memory:
            pairs = memory.records("pair")
        stored += len(pairs)
        raw = ClientHome(home).memory_db.read_bytes()
        leaked += [p.fields["chosen"] for p in pairs if p.fields["chosen"].encode() in raw]
    # each sampled user labels prompts_per_round new prompts (pairs_per_prompt pairs each) per round it trains
    assert stored == QUICK.rounds * QUICK.clients_per_round * QUICK.prompts_per_round * QUICK.pairs_per_prompt
    assert leaked == []


def test_noise_for_epsilon_is_the_smallest_noise_within_the_target():
    budget = PrivacyBudget(1.0, 0.5, 1e-5, 1000, 100)
    z = noise_for_epsilon(budget, 8.0, 3)
    assert epsilon_after(PrivacyBudget(z, 0.5, 1e-5, 1000, 100), 3) <= 8.0
    assert epsilon_after(PrivacyBudget(z * 0.98, 0.5, 1e-5, 1000, 100), 3) > 8.0
    with pytest.raises(FedpalError, match="positive"):
        noise_for_epsilon(budget, 0.0, 3)


def test_the_held_out_gain_beats_the_base_only_when_its_interval_is_above_zero():
    def evaluation(gains):
        return {
            "users": [{"user": i, "pairs": 10, "base_right": 5, "shared_right": 5 + g} for i, g in enumerate(gains)]
        }

    clear = HeldoutScore.of(evaluation([1, 2, 1, 2, 1, 2]))
    assert clear.beats_base and clear.gain == pytest.approx(0.15)
    mixed = HeldoutScore.of(evaluation([2, -2, 1, -1, 0, 1]))
    assert not mixed.beats_base and mixed.gain_low < 0 < mixed.gain_high
    with pytest.raises(FedpalError, match="no interval"):
        HeldoutScore.of(evaluation([1]))


def test_a_study_plan_runs_each_distinct_setting_once_with_clients_growing_with_users():
    plan = StudyPlan()
    runs = plan.runs()
    assert [runs[plan.sizes_key(n)].clients_per_round for n in plan.sizes] == [3, 5, 10, 30, 100]  # SecAgg+ needs 3
    assert f"users={plan.sweep_users} no DP" in runs and not runs[f"users={plan.sweep_users} no DP"].dp
    # every size with each of its seeds, and a noise-only twin of each; 300 users at epsilon 8 (seed 0) is
    # in two sweeps and runs once
    repeats = sum(len(plan.seeds_for(n)) for n in plan.sizes)
    assert repeats == 2 * len(plan.sizes) - 1  # 1000 users: one seed
    assert len(runs) == 2 * repeats + len(plan.epsilons) - 1 + len(plan.adapters) - 1
    assert runs[plan.sizes_key(100, 1)].seed == 1 and runs[plan.control_key(100, 1)].seed == 1
    hundred, largest = runs[plan.sizes_key(100)], runs[plan.sizes_key(1000)]
    assert largest.target_epsilon == hundred.target_epsilon == 8.0
    assert largest.clients_per_round / largest.users == hundred.clients_per_round / hundred.users  # same noise
    for n in plan.sizes:
        twin, learner = runs[plan.control_key(n)], runs[plan.sizes_key(n)]
        assert twin.learning_rate == 1e-12 and replace(twin, learning_rate=learner.learning_rate, preset="") == replace(
            learner, preset=""
        )


@pytest.mark.parametrize(
    "setting, error",
    [
        ({"users": "abc"}, "users must be an integer, not 'abc'"),
        ({"dp": "maybe"}, "dp must be true or false, not 'maybe'"),
        ({"clients_per_round": "500"}, "clients_per_round (500) cannot exceed users (12)"),
        ({"colour": "red"}, "unknown setting 'colour'"),
        (
            {"secagg_shares": "2.5"},
            "secagg_shares must be a fraction of the round's clients in (0, 1] or a whole number",
        ),
    ],
)
def test_a_bad_setting_is_one_clear_line(setting, error):
    with pytest.raises(FedpalError) as raised:
        load_population_config("quick", setting)
    assert str(raised.value).startswith(error) and "\n" not in str(raised.value)


def test_the_command_refuses_a_bad_setting_in_one_line_and_writes_nothing(tmp_path):
    done = _cli("run", "--preset", "quick", "--out", str(tmp_path / "out"), "--set", "users=abc", timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["error: users must be an integer, not 'abc'"]
    assert not (tmp_path / "out").exists()


def test_settings_read_each_field_as_its_type():
    config = load_population_config("p100", {"target_epsilon": "4", "styles": "plain,bulleted", "secagg": "false"})
    assert config.target_epsilon == 4.0 and config.styles == ("plain", "bulleted") and config.secagg is False
    assert np.isclose(
        config.noise(), noise_for_epsilon(PrivacyBudget(1.0, config.clipping_norm, config.delta, 100, 10), 4.0, 3)
    )


@pytest.mark.slow
def test_the_same_app_on_a_two_node_ray_cluster_gives_the_same_results(quick, tmp_path):
    """A Ray cluster of two nodes on this machine (``ray start --head`` plus ``ray start
    --address``); only the Ray address changes, and the results match the single-node run's."""
    from fedpal.server.federation import load_global_adapter

    single, single_out = quick
    out = tmp_path / "two-nodes"
    with two_node_cluster() as (address, raylets), ActorParents() as parents:
        done = _cli("run", "--preset", "quick", "--out", str(out), "--ray-address", address, "--json")
        assert done.returncode == 0, done.stderr[-3000:]
    # Ray's workers are their node's raylet's children: the clients ran on both nodes, and on no Ray of their own
    assert parents.seen == raylets, (parents.seen, raylets)
    cluster = json.loads((out / "results.json").read_text())
    for key in ("rounds", "epsilon", "noise_multiplier", "score", "scored_users", "adapter_numbers"):
        assert cluster[key] == single[key], key
    assert cluster["global_change_norm"] == pytest.approx(single["global_change_norm"], abs=1e-6)
    ours, theirs = load_global_adapter(out / "run"), load_global_adapter(single_out / "run")
    for name in ours:
        assert np.allclose(ours[name], theirs[name], atol=1e-6), name


def test_secagg_shares_are_a_fraction_or_a_fixed_number_of_neighbours():
    from fedpal.common.settings import FederationSettings
    from fedpal.server.strategy import secagg_shares

    fixed = FederationSettings.from_run_config({"secagg-shares": 7.0})
    assert secagg_shares(fixed, 100) == 7 and isinstance(secagg_shares(fixed, 100), int)
    assert secagg_shares(fixed, 5) == 1.0  # a round smaller than the neighbourhood: everyone
    assert secagg_shares(FederationSettings.from_run_config({"secagg-shares": 0.1}), 100) == 0.1
    with pytest.raises(FedpalError, match="secagg-shares must be a fraction"):
        FederationSettings.from_run_config({"secagg-shares": 2.0})


def test_a_seeded_round_samples_the_same_users_whatever_node_ids_flower_drew():
    import random

    from flwr.server.client_proxy import ClientProxy

    from fedpal.common.flower_internals import OrderedClientManager

    abstract = ("get_properties", "get_parameters", "fit", "evaluate", "reconnect")
    Node = type("Node", (ClientProxy,), {name: lambda *args, **kwargs: None for name in abstract})
    drawn = []
    for ids in (random.Random(1).sample(range(10**12), 12), random.Random(2).sample(range(10**12), 12)):
        users = {node: partition for partition, node in enumerate(ids)}
        manager = OrderedClientManager(node_order=users.__getitem__)
        for node in reversed(ids):
            manager.register(Node(str(node)))
        random.seed(7)
        drawn.append(sorted(users[int(proxy.cid)] for proxy in manager.sample(4)))
    assert drawn[0] == drawn[1]


def test_a_node_whose_update_is_zero_sends_it_instead_of_failing_the_round(monkeypatch):
    """Flower's fixedclipping_mod divides by the update's norm; fedpal's guard lets a zero
    update (nothing learned) through unclipped, and still clips a real one."""
    from flwr.app import Context, Message, RecordDict
    from flwr.common import FitIns, FitRes, Status, Code, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
    from flwr.supercore.task_identity import TaskIdentity

    from fedpal.client.client_app import when_clipping

    for name in ("_run_id", "_node_id", "_task_id"):  # what a SuperNode sets before a ClientApp runs
        monkeypatch.setattr(TaskIdentity, name, 1)
    sent = [np.full(4, 0.25, dtype=np.float32)]
    message = Message(
        compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(sent), {KEY_CLIPPING_NORM: 0.5}), keep_input=True),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def node(returned):
        def train(msg, ctxt):
            fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(returned), 1, {})
            return Message(compat.fitres_to_recorddict(fit_res, keep_input=True), reply_to=msg)

        return train

    def update(reply):
        return (
            parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)[0] - sent[0]
        )

    assert np.all(update(when_clipping(message, context, node([sent[0].copy()]))) == 0)
    big = when_clipping(message, context, node([sent[0] + 3.0]))
    assert np.linalg.norm(update(big)) == pytest.approx(0.5, rel=1e-5)


def test_an_unreachable_ray_cluster_is_one_line_and_writes_nothing(tmp_path):
    from fedpal.simulations.engine import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = _cli("run", "--preset", "quick", "--out", str(tmp_path / "out"), "--ray-address", address, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no Ray cluster answers at {address}"), lines
    assert not (tmp_path / "out").exists()
