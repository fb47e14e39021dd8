"""Federations on Flower's simulation engine (Ray), tiny model, real DP and SecAgg+.

One module-scoped run (4 clients, 3 rounds, DP + SecAgg+ on, every outgoing client
message captured by a client mod) backs several tests; the resume and dropout tests run
their own federations. Each simulation costs ~30-60 s on 2 cores, mostly Ray start-up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedpal.common.privacy import independent_epsilon

PASSPHRASE = "federation-test-passphrase"
CLIENTS = 4
ROUNDS = 3
BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "include_dashboard": False}}


def _memory_strings(partition: int) -> dict[str, list[str]]:
    """Distinctive texts per user, so a leak of any of them is unambiguous."""
    pairs = [
        (
            f"user{partition} asks question {j} about their kumquat-garden-{partition}-{j}",
            f"zebra-secret-chosen-{partition}-{j}: short friendly answer",
            f"yak-secret-rejected-{partition}-{j}: a very long and formal answer",
        )
        for j in range(4)
    ]
    return {"pairs": pairs, "stated": [f"I-prefer-brief-replies-marker-{partition}"]}


def _make_homes(base: Path, clients: int) -> Path:
    from fedpal.client.memory import PreferenceMemory

    nodes = base / "nodes"
    for i in range(clients):
        memory = PreferenceMemory.open(nodes / str(i), passphrase=PASSPHRASE)
        strings = _memory_strings(i)
        for prompt, chosen, rejected in strings["pairs"]:
            memory.add_pair(prompt, chosen, rejected)
        for text in strings["stated"]:
            memory.add_stated(text)
    return nodes


def _simulate(run_dir: Path, nodes: Path, clients: int, extra_mods=(), **overrides) -> list[dict]:
    from flwr.simulation import run_simulation

    from fedpal.client.client_app import make_client_app
    from fedpal.server.server_app import make_server_app

    settings = {
        "run-dir": str(run_dir),
        "home-base": str(nodes),
        "num-server-rounds": ROUNDS,
        "local-steps": 3,
        "personal-steps": 2,
        "personal-guard": False,  # the random tiny model's adapters rarely pass; this test is about the pipe
        "min-clients": clients,
        "noise-multiplier": 0.5,
        "clipping-norm": 0.05,
        "learning-rate": 0.01,
        "secagg-timeout": 120.0,
        "deterministic": True,
        **overrides,
    }
    old = os.environ.get("FEDPAL_PASSPHRASE")
    os.environ["FEDPAL_PASSPHRASE"] = PASSPHRASE
    try:
        run_simulation(
            make_server_app(settings), make_client_app(extra_mods), num_supernodes=clients, backend_config=BACKEND
        )
    finally:
        if old is None:
            os.environ.pop("FEDPAL_PASSPHRASE", None)
        else:
            os.environ["FEDPAL_PASSPHRASE"] = old
    return _metrics(run_dir)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def make_vanish_mod(plan: dict[int, set[int]]):
    """A client mod that makes the planned partitions die in a round after the key exchange."""

    def vanish(msg, ctxt, call_next):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        stage = configs.get(Key.STAGE) if configs is not None else None
        round_ = int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0  # "final": the last adapter
        if stage == Stage.COLLECT_MASKED_VECTORS and ctxt.node_config["partition-id"] in plan.get(round_, set()):
            raise RuntimeError(f"partition {ctxt.node_config['partition-id']} vanished in round {round_}")
        return call_next(msg, ctxt)

    return vanish


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    base = tmp_path_factory.mktemp("federation")
    nodes = _make_homes(base, CLIENTS)
    pristine = base / "pristine-nodes"
    shutil.copytree(nodes, pristine)
    from fedpal.simulations.privacy.federation import make_capture_mod

    captures = base / "captures"
    captures.mkdir()
    metrics = _simulate(base / "run", nodes, CLIENTS, extra_mods=[make_capture_mod(captures)])
    return {
        "base": base,
        "nodes": nodes,
        "pristine": pristine,
        "captures": captures,
        "run": base / "run",
        "metrics": metrics,
    }


def test_dp_secagg_federation_completes_and_moves_the_global_adapter(federation):
    from safetensors.numpy import load_file

    from fedpal.server.federation import load_global_adapter

    metrics = federation["metrics"]
    assert [m["round"] for m in metrics] == [1, 2, 3]
    for line in metrics:
        assert line["aggregated"] and line["dp"] and line["secagg"] and line["ffa_lora"]
        assert line["clients_summed"] == CLIENTS and not line["failures"] and not line["rejected"]
        assert line["global_change_norm"] > 0
        assert line["bytes_up_per_client"] > 0 and line["bytes_down_per_client"] > 0
        assert all(c["examples"] > 0 and "loss_first" in c for c in line["clients"].values())
    final = load_global_adapter(federation["run"])
    # FFA-LoRA: only B travels, and B starts at zero
    assert final and all(".lora_B." in name for name in final)
    assert sum(float(np.abs(a).sum()) for a in final.values()) > 0
    for i in range(CLIENTS):
        home = federation["nodes"] / str(i)
        assert (home / "adapters" / "personal" / "adapter_model.safetensors").is_file()
        # after the last round the server sent its final aggregate, which every node saved
        shared = load_file(home / "adapters" / "shared" / "adapter_model.safetensors")
        for name, array in final.items():
            np.testing.assert_array_equal(shared[name], array)


def test_no_client_message_carries_its_memory(federation):
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.serde import recorddict_to_proto

    from fedpal.simulations.privacy.leaks import scan

    captures = federation["captures"]
    for i in range(CLIENTS):
        sent = sorted(captures.glob(f"{i}-*.bin"))
        # 4 SecAgg+ stages per round
        assert len(sent) >= 4 * ROUNDS
        strings = _memory_strings(i)
        needles = [s for pair in strings["pairs"] for s in pair] + strings["stated"]
        found = scan(sent, needles)
        assert found.files == len(sent) and found.needles == len(needles)
        assert found.leaks == (), f"memory text of client {i} left the node: {found.leaks[0]}"
    # the detector would see a leak in the same encoding the messages use
    leaky = recorddict_to_proto(RecordDict({"m": ConfigRecord({"x": _memory_strings(0)["pairs"][0][1]})}))
    assert _memory_strings(0)["pairs"][0][1].encode() in leaky.SerializeToString()


def test_reported_epsilon_matches_dp_accounting(federation):
    for line in federation["metrics"]:
        theirs = independent_epsilon(0.5, line["round"], 1e-5, CLIENTS, CLIENTS, "without-replacement")
        assert line["epsilon"] == pytest.approx(theirs, rel=0.05)
    assert federation["metrics"][-1]["epsilon"] > federation["metrics"][0]["epsilon"]


def test_resume_after_a_stop_gives_the_uninterrupted_result(federation, tmp_path):
    from fedpal.server.federation import load_global_adapter

    nodes = tmp_path / "nodes"
    shutil.copytree(federation["pristine"], nodes)
    run = tmp_path / "run"
    # the server stops after round 2 (its checkpoint is what a crash leaves) ...
    first = _simulate(run, nodes, CLIENTS, **{"num-server-rounds": 2, "final-adapter": False})
    assert [m["round"] for m in first] == [1, 2]
    # ... and a restarted one resumes at round 3
    resumed = _simulate(run, nodes, CLIENTS, resume=True, **{"final-adapter": False})
    assert [m["round"] for m in resumed] == [1, 2, 3]
    assert resumed[2]["epsilon"] == pytest.approx(federation["metrics"][2]["epsilon"])
    assert resumed[2]["epsilon"] > resumed[1]["epsilon"]
    got, want = load_global_adapter(run), load_global_adapter(federation["run"])
    assert list(got) == list(want)
    # SecAgg+ rounds stochastically in quantization (steps of ~4e-6); the DP noise is 0.5*0.05/4
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=2e-4)


def test_secagg_dropouts_and_the_privacy_budget(tmp_path):
    """One of five vanishes mid-round: aggregated from four. Two vanish: the round fails
    clearly, costs no privacy, and the run goes on. The first one rejoins with its memory.
    Then max-epsilon stops the run before the round that would pass it."""
    from safetensors.numpy import load_file

    from fedpal.server.federation import load_global_adapter

    clients = 5
    nodes = _make_homes(tmp_path, clients)
    plan = {1: {0}, 2: {1, 2}}
    two, three = (independent_epsilon(0.5, r, 1e-5, clients, clients) for r in (2, 3))
    metrics = _simulate(
        tmp_path / "run",
        nodes,
        clients,
        extra_mods=[make_vanish_mod(plan)],
        **{"secagg-threshold": 0.8, "num-server-rounds": 4, "max-epsilon": (two + three) / 2},
    )
    first, second, third, stop = metrics
    assert first["aggregated"] and first["clients_summed"] == clients - 1
    assert len(first["failures"]) == 1 and first["epsilon"] > 0
    assert not second["aggregated"] and "SecAgg+ aborted the round" in second["error"]
    assert second["epsilon"] == pytest.approx(first["epsilon"])
    assert third["aggregated"] and third["clients_summed"] == clients
    assert third["epsilon"] == pytest.approx(two, rel=0.05)
    assert stop == {**stop, "round": 4, "stopped": "privacy budget"}
    assert stop["epsilon"] <= (two + three) / 2 < stop["epsilon_if_run"]
    # stopped by the budget, the run still sends its last aggregate to every node
    final = load_global_adapter(tmp_path / "run")
    for i in range(clients):
        shared = load_file(nodes / str(i) / "adapters" / "shared" / "adapter_model.safetensors")
        assert all((shared[name] == array).all() for name, array in final.items())
