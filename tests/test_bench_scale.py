"""``fedpal bench scale --quick``: the population simulation at a small size, run as a user runs it.

One real subprocess: one ``flwr run`` of the quick population preset (10 users, DP and SecAgg+
on) against its own simulation SuperLink; about 40 s on 2 cores. How figures grow between
sizes is checked on two sizes' figures as ``measure`` returns them.
"""

from __future__ import annotations

import json

from cli_helpers import fedpal, ok
import pytest
from fedpal.simulations.benchmarks.scale import QUICK_USERS, _row, growth


def test_bench_scale_quick_times_every_round_and_the_peak_memory_at_each_size(tmp_path):
    out = tmp_path / "bench"
    done = ok(fedpal("bench", "scale", "--quick", "--out", str(out), passphrase=None, timeout=600))
    assert f"wrote {out / 'scale.json'}" in " ".join(done.stdout.split())

    report = json.loads((out / "scale.json").read_text())
    assert report["name"] == "scale" and report["settings"]["quick"] is True
    assert report["command"] == "fedpal bench scale --quick"
    sizes = report["figures"]["sizes"]
    assert [s["users"] for s in sizes] == list(QUICK_USERS)  # one entry per size, smallest first
    for size in sizes:
        assert size["rounds"] == len(size["round_seconds"]) >= 2
        assert all(seconds > 0 for seconds in size["round_seconds"])
        spread = size["round_s"]
        assert spread["n"] == size["rounds"] - 1  # the repeats are the rounds after the first
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]
        assert size["first_round_s"] == size["round_seconds"][0]
        assert size["per_client_s"] > 0
        assert size["peak_rss_mib"] > 100  # the SuperLink, the ServerApp and Ray's workers were measured
        assert size["scoring_s"] > 0 and size["wall_s"] > sum(size["round_seconds"])
    assert report["figures"]["growth"] == []  # one size: nothing to grow from
    assert report["machine"]["load_before"] >= 0 and report["machine"]["cores"] >= 1

    table = (out / "scale.md").read_text()
    assert table.startswith("### ") and "`fedpal bench scale --quick`" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(QUICK_USERS)  # header and one row per size
    assert [row.split("|")[1].strip() for row in rows[1:]] == [str(n) for n in QUICK_USERS]


def _size(users: int, clients: int, rounds: list[float], rss: float) -> dict:
    steady = sorted(rounds[1:])
    median = steady[len(steady) // 2]
    return {
        "users": users,
        "clients_per_round": clients,
        "round_seconds": rounds,
        "first_round_s": rounds[0],
        "round_s": {"median": median, "min": steady[0], "max": steady[-1], "n": len(steady)},
        "per_client_s": median / clients,
        "peak_rss_mib": rss,
        "scoring_s": 2.0,
        "other_s": 30.0,
        "wall_s": sum(rounds) + 32.0,
        "load_before": 0.5,
    }


def test_growth_between_two_sizes_is_per_round_and_per_client():
    # the shape of the 100- and 300-user rows of the published table
    small = _size(100, 10, [19.4, 6.3, 6.0, 7.3, 8.2], 2000.0)
    large = _size(300, 30, [27.5, 15.9, 21.4, 13.6, 13.2], 2500.0)
    g = growth(small, large)
    assert (g["from_users"], g["to_users"]) == (100, 300)
    assert g["clients_x"] == 3.0
    assert g["time_x"] == pytest.approx(15.9 / 7.3)  # medians of rounds 2-5
    assert g["per_client_x"] == pytest.approx((15.9 / 30) / (7.3 / 10))
    assert g["memory_pct"] == pytest.approx(25.0)
    first, second = _row(small, small), _row(large, small)
    assert first[5] == "-" and first[6] == "2000"
    assert second[5] == "3.0x -> 2.2x" and second[6] == "2500 (+25.0%)"
