"""``fedpal bench scale --quick``: the population simulation at two small sizes, run as a user runs it.

One real subprocess: two ``flwr run``s of the quick population preset (10 and 20 users, DP
and SecAgg+ on), each against its own simulation SuperLink; about 1.5 min on 2 cores.
"""

from __future__ import annotations

import json

from cli_helpers import fedpal, ok
from fedpal.simulations.benchmarks.scale import QUICK_USERS


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
    (growth,) = report["figures"]["growth"]
    assert (growth["from_users"], growth["to_users"]) == QUICK_USERS
    assert growth["clients_x"] == sizes[1]["clients_per_round"] / sizes[0]["clients_per_round"] > 1
    assert growth["time_x"] > 0
    assert report["machine"]["load_before"] >= 0 and report["machine"]["cores"] >= 1

    table = (out / "scale.md").read_text()
    assert table.startswith("### ") and "`fedpal bench scale --quick`" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(QUICK_USERS)  # header and one row per size
    assert [row.split("|")[1].strip() for row in rows[1:]] == [str(n) for n in QUICK_USERS]
