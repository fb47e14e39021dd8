"""Server pieces without a federation: update checks, noise placement, checkpoints, settings.

The strategy gets real Flower ``FitRes`` objects, as the fit workflows hand them over.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedpal.common.errors import FedpalError
from fedpal.common.settings import DEFAULTS, FederationSettings
from fedpal.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpal.common.flower_internals import restore_strategy_state, strategy_state
from fedpal.server.strategy import FedpalStrategy
from fedpal.common.adapters import FINGERPRINT_KEY, adapter_fingerprint
from fedpal.server.validation import UpdateSpec, check_update

ROOT = Path(__file__).resolve().parents[1]


def _named(seed: int = 0, scale: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q_proj.lora_B.shared.weight": (scale * rng.standard_normal((64, 8))).astype(np.float32),
        "layers.0.k_proj.lora_B.shared.weight": (scale * rng.standard_normal((32, 8))).astype(np.float32),
        "layers.0.v_proj.lora_B.shared.weight": (scale * rng.standard_normal((32, 8))).astype(np.float32),
    }


def _result(node_id: int, arrays: list[np.ndarray], fingerprint: str, examples: int = 3):
    proxy = GridClientProxy(node_id=node_id, grid=None, run_id=0)
    return proxy, FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(arrays),
        examples,
        {FINGERPRINT_KEY: fingerprint, "examples": examples},
    )


def _settings(**overrides) -> FederationSettings:
    return FederationSettings.from_run_config({"secagg": False, "min-clients": 2, **overrides})


def _step(global_arrays, seed, norm):
    rng = np.random.default_rng(seed)
    delta = [rng.standard_normal(a.shape).astype(np.float32) for a in global_arrays]
    total = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta))
    return [g + d * (norm / total) for g, d in zip(global_arrays, delta)]


def test_bad_updates_are_rejected_by_node_and_the_round_goes_on(caplog):
    named = _named()
    initial = list(named.values())
    spec = UpdateSpec.of(named, max_norm=10.0)
    strategy = FedpalStrategy(_settings(dp=False), spec, initial)
    fp = spec.fingerprint
    good_a, good_b = _step(initial, 1, 1.0), _step(initial, 2, 1.0)
    nan = _step(initial, 3, 1.0)
    nan[1][0, 0] = np.nan
    inf = _step(initial, 4, 1.0)
    inf[0][3, 3] = np.inf
    wrong_shape = [initial[0], initial[1][:, :4], initial[2]]
    huge = _step(initial, 5, 1e6)
    swapped_fp = adapter_fingerprint(
        {"layers.0.k_proj.x": initial[1], "layers.0.q_proj.x": initial[0], "v": initial[2]}
    )
    results = [
        _result(11, good_a, fp),
        _result(12, nan, fp),
        _result(13, inf, fp),
        _result(14, wrong_shape, fp),
        _result(15, huge, fp),
        _result(16, good_b, swapped_fp),
        _result(17, good_b, fp),
    ]
    with caplog.at_level(logging.WARNING, logger="fedpal.server"):
        params, _ = strategy.aggregate_fit(1, results, [RuntimeError("node 18 vanished")])
    assert params is not None
    rejected = {r["node"]: r["reason"] for r in strategy.report.rejected}
    assert set(rejected) == {"12", "13", "14", "15", "16"}
    assert "NaN or Inf" in rejected["12"] and "NaN or Inf" in rejected["13"]
    assert "shape" in rejected["14"] and "norm" in rejected["15"] and "fingerprint" in rejected["16"]
    for node in rejected:
        assert f"node {node}" in caplog.text
    expected = [(a + b) / 2 for a, b in zip(good_a, good_b)]
    for got, want in zip(parameters_to_ndarrays(params), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert strategy.report.clients_summed == 2 and strategy.report.failures == ["node 18 vanished"]


def test_with_dp_an_unclipped_update_is_rejected_and_noise_is_z_c_on_the_sum():
    named = {"b": np.zeros((400, 250), dtype=np.float32)}
    initial = list(named.values())
    z, c = 1.3, 0.5
    spec = UpdateSpec.of(named, max_norm=c * 1.01)
    strategy = FedpalStrategy(_settings(dp=True, **{"noise-multiplier": z, "clipping-norm": c}), spec, initial)
    np.random.seed(0)
    clipped = [_result(i, _step(initial, i, c), spec.fingerprint, examples=100 * i) for i in range(1, 5)]
    unclipped = _result(9, _step(initial, 9, 3 * c), spec.fingerprint)
    params, _ = strategy.aggregate_fit(1, [*clipped, unclipped], [])
    assert [r["node"] for r in strategy.report.rejected] == ["9"]
    k = 4
    # uniform weights under DP (example counts would change the sensitivity)
    mean = sum(parameters_to_ndarrays(fr.parameters)[0] for _, fr in clipped) / k
    noise = parameters_to_ndarrays(params)[0] - mean
    assert np.std(noise) == pytest.approx(z * c / k, rel=0.02)
    assert abs(float(np.mean(noise))) < 0.01 * z * c / k * 10
    assert strategy.report.noise_stddev_on_mean == pytest.approx(z * c / k)


def test_fedadam_steps_on_the_noisy_mean_and_its_state_round_trips(tmp_path):
    named = _named()
    initial = list(named.values())
    spec = UpdateSpec.of(named, max_norm=1.01)
    settings = _settings(dp=True, strategy="fedadam", **{"clipping-norm": 1.0})
    strategy = FedpalStrategy(settings, spec, initial)
    results = [_result(i, _step(initial, i, 1.0), spec.fingerprint) for i in (1, 2, 3)]
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is not None
    state = strategy_state(strategy.inner)
    assert {"current_weights", "m_t", "v_t"} <= set(state)
    save_checkpoint(tmp_path / "ck", Checkpoint(1, strategy.global_arrays, state, None, settings.locked()))
    loaded = load_checkpoint(tmp_path / "ck")
    again = FedpalStrategy(settings, spec, loaded.global_arrays)
    restore_strategy_state(again.inner, loaded.strategy_state)
    round_two = [_result(i, _step(strategy.global_arrays, 10 + i, 1.0), spec.fingerprint) for i in (1, 2, 3)]
    np.random.seed(5)
    a, _ = strategy.aggregate_fit(2, round_two, [])
    np.random.seed(5)
    b, _ = again.aggregate_fit(2, round_two, [])
    assert a is not None
    for x, y in zip(parameters_to_ndarrays(a), parameters_to_ndarrays(b)):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_replaces_atomically_and_keeps_the_ledger(tmp_path):
    folder = tmp_path / "checkpoint"
    assert load_checkpoint(folder) is None
    arrays = list(_named(1, 1.0).values())
    save_checkpoint(folder, Checkpoint(1, arrays, {}, {"ledger": 1}, {"seed": 0}))
    save_checkpoint(folder, Checkpoint(2, [a * 2 for a in arrays], {}, {"ledger": 2}, {"seed": 0}, rounds_skipped=1))
    loaded = load_checkpoint(folder)
    assert loaded.round == 2 and loaded.accountant_state == {"ledger": 2} and loaded.rounds_skipped == 1
    np.testing.assert_array_equal(loaded.global_arrays[0], arrays[0] * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # a server killed between the two renames (where the one-step exchange is missing) left the old one aside
    folder.rename(tmp_path / ".checkpoint-killed-old")
    assert load_checkpoint(folder).round == 2
    (tmp_path / ".checkpoint-killed-old").rename(folder)
    (folder / "global.npz").write_bytes(b"not a zip")
    with pytest.raises(FedpalError, match="corrupt checkpoint"):
        load_checkpoint(folder)


def test_check_update_accepts_a_fine_update():
    named = _named()
    spec = UpdateSpec.of(named, max_norm=2.0)
    assert check_update(spec, list(named.values()), _step(list(named.values()), 0, 1.0), spec.fingerprint) is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"strategy": "fedsgd"}, "strategy must be one of"),
        ({"noise-multiplier": "lots"}, "noise-multiplier"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"no-such-key": 1}, "unknown run-config key 'no-such-key'"),
        ({"secagg": True, "min-clients": 2}, "SecAgg\\+ needs at least 3"),
        ({"preferences-in": "footer"}, "preferences-in must be one of prompt, system"),
        ({"lora-top-layers": -1}, "lora-top-layers"),
    ],
)
def test_bad_settings_are_one_clear_error(overrides, message):
    with pytest.raises(FedpalError, match=message):
        FederationSettings.from_run_config({"secagg": False, **overrides})


def test_pyproject_run_config_lists_exactly_the_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == DEFAULTS


def test_one_settings_class_the_client_reads_back_from_its_train_message():
    """The server derives the train message from FederationSettings; the client reads the same
    class back from it (typed, checked: no hand casts), and every setting says what it does."""
    import json
    import subprocess

    settings = FederationSettings.from_run_config(
        {"lora-rank": 4, "learning-rate": 1, "personal-from-round": 3, "secagg": "false", "min-clients": 2}
    )
    assert settings.learning_rate == 1.0 and isinstance(settings.learning_rate, float) and settings.secagg is False
    for server_round, personal in ((2, 0), (3, settings.personal_steps)):
        message = settings.train_config(server_round)
        received = FederationSettings.from_message(message)
        assert received.personal_steps == personal and received.lora_rank == 4 and received.learning_rate == 1.0
    with pytest.raises(FedpalError, match="lora-rank = 'four' must be a whole number"):
        FederationSettings.from_message({**settings.train_config(1), "lora-rank": "four"})
    listed = subprocess.run(["fedpal", "server", "settings", "--json"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {key: row["default"] for key, row in rows.items()} == DEFAULTS
    assert all(len(row["help"]) > 10 for row in rows.values())


def test_server_cli_reports_a_run_and_refuses_unknown_settings(tmp_path):
    import json
    import subprocess

    lines = [
        {
            "round": 1,
            "aggregated": True,
            "clients_summed": 4,
            "epsilon": 4.73,
            "seconds": 1.5,
            "bytes_up_per_client": 28875.0,
            "bytes_down_per_client": 18190.0,
        },
        {
            "round": 2,
            "aggregated": False,
            "error": "SecAgg+ aborted the round",
            "clients_summed": 0,
            "epsilon": 4.73,
            "seconds": 1.0,
            "bytes_up_per_client": 100.0,
            "bytes_down_per_client": 100.0,
        },
        {"round": 3, "stopped": "privacy budget", "epsilon": 4.73, "epsilon_if_run": 7.1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    shown = subprocess.run(["fedpal", "server", "status", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "round 1: ok; 4 clients, epsilon 4.730" in shown.stdout
    assert "round 2: NOT AGGREGATED: SecAgg+ aborted the round" in shown.stdout
    assert "stopped before round 3: privacy budget" in shown.stdout
    bad = subprocess.run(["fedpal", "server", "run", "--set", "noise=2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "unknown setting 'noise'" in bad.stderr


def test_round_randomness_is_secret_unless_deterministic(tmp_path):
    """DP noise drawn from a public seed could be subtracted: by default each run draws a
    128-bit secret, keeps it in the server's checkpoint and replays it on resume."""
    from fedpal.server.federation import round_secret, seed_round

    private = _settings()
    first, second = round_secret(private, None), round_secret(private, None)
    assert first != second and max(first, second) > 2**64
    assert round_secret(_settings(deterministic=True, seed=7), None) == 7

    arrays = [np.zeros(2, np.float32)]
    save_checkpoint(tmp_path / "ckpt", Checkpoint(1, arrays, {}, None, {}, round_secret=first))
    restored = load_checkpoint(tmp_path / "ckpt")
    assert restored.round_secret == first
    assert round_secret(private, restored) == first, "a resumed round replays the interrupted one's noise"

    def noise(secret: int, server_round: int) -> np.ndarray:
        seed_round(secret, server_round)
        return np.random.normal(size=4)

    assert np.array_equal(noise(first, 3), noise(first, 3))
    assert not np.array_equal(noise(first, 3), noise(first, 4))
    same_low_bits = first ^ (1 << 100)
    assert not np.array_equal(noise(first, 3), noise(same_low_bits, 3)), "all 128 bits of the secret matter"


def test_a_strategy_added_through_the_registry_runs_under_fedpals_checks():
    """A researcher's strategy (Flower's FedMedian here) registered by name: the settings accept
    the name, the server builds it, and fedpal's wrapper still rejects a bad update and aggregates."""
    from flwr.server.strategy import FedMedian

    from fedpal.common.strategies import STRATEGIES, flower_strategy

    @flower_strategy("fedmedian-test")
    def fedmedian(settings, common):
        return FedMedian(**common)

    try:
        named = _named()
        initial = list(named.values())
        spec = UpdateSpec.of(named, max_norm=2.0)
        strategy = FedpalStrategy(_settings(strategy="fedmedian-test", dp=False), spec, initial)
        assert isinstance(strategy.inner, FedMedian)
        steps = [_step(initial, seed, 1.0) for seed in (1, 2, 3)]
        results = [_result(i + 1, arrays, spec.fingerprint) for i, arrays in enumerate(steps)]
        results.append(_result(9, [a + 50.0 for a in initial], spec.fingerprint))  # far over max-update-norm
        params, _ = strategy.aggregate_fit(1, results, [])
        assert strategy.report.rejected and strategy.report.clients_summed == 3
        expected = [np.median(np.stack(column), axis=0) for column in zip(*steps)]
        for got, want in zip(parameters_to_ndarrays(params), expected):
            np.testing.assert_allclose(got, want, atol=1e-6)  # the median, not the mean
    finally:
        del STRATEGIES["fedmedian-test"]
    with pytest.raises(FedpalError, match="strategy must be one of"):
        _settings(strategy="fedmedian-test")
