"""``fedpal bench federation --quick``: round overhead and bytes per client-round, run as a user runs it.

One real subprocess: one Flower simulation on the tiny model (3 SuperNodes, Ray started
once) running every federation of the quick schedule, plain A/B, FFA-LoRA and fp16 and
SecAgg+ against none, all at 3 clients (SecAgg+'s "none" arm is the FFA-LoRA fp32 run).
"""

from __future__ import annotations

import json

import pytest
from cli_helpers import fedpal, ok
from fedpal.simulations.benchmarks.federation import TRANSPORT, Sizes

SPREADS = ("round_s", "train_s", "overhead_s", "bytes_up_per_client_round", "bytes_down_per_client_round")
ENVELOPE = 8_000
"""Bytes a reply carries besides the update's values (config, metrics, names): a few kB."""


def _up(row: dict) -> float:
    return row["bytes_up_per_client_round"]["median"]


def _down(row: dict) -> float:
    return row["bytes_down_per_client_round"]["median"]


def test_bench_federation_quick_compares_transports_and_secagg(tmp_path):
    out = tmp_path / "bench"
    done = ok(fedpal("bench", "federation", "--quick", "--out", str(out), passphrase=None, timeout=600))
    assert f"wrote {out / 'federation.json'}" in " ".join(done.stdout.split())

    report = json.loads((out / "federation.json").read_text())
    assert report["name"] == "federation" and report["settings"]["quick"] is True
    assert report["command"] == "fedpal bench federation --quick"
    sizes = Sizes.of(quick=True)
    figures = report["figures"]
    transport = figures["transport"]["rows"]
    secagg = figures["secagg"]["by_clients"]
    assert list(transport) == list(TRANSPORT)
    assert list(secagg) == [str(n) for n in sizes.secagg.clients] == ["3"]

    rows = [(row, sizes.transport) for row in transport.values()]
    rows += [(arm, sizes.secagg) for pair in secagg.values() for arm in (pair["none"], pair["secagg"])]
    for row, part in rows:
        assert row["rounds"] == part.repeats  # the rounds are the repeats
        for key in SPREADS:
            spread = row[key]
            assert spread["n"] == row["rounds"], key
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (key, spread)
        # the slowest client's training is part of the round, and the federation adds to it
        assert row["round_s"]["median"] > row["overhead_s"]["median"] > 0
        assert row["update_values"] > 0

    for name, row in transport.items():
        # what goes up is the update, 4 or 2 bytes a value, plus a small envelope
        per_value = 2 if row["fp16-updates"] else 4
        assert row["update_values"] * per_value < _up(row) < row["update_values"] * per_value + ENVELOPE, name
        assert row["up_bytes_vs_baseline"] == pytest.approx(_up(row) / _up(transport["plain A/B fp32"]))
    ab, ab16 = transport["plain A/B fp32"], transport["plain A/B fp16"]
    ffa, ffa16 = transport["FFA-LoRA fp32"], transport["FFA-LoRA fp16"]
    # FFA-LoRA sends B only (B is at most as big as A for every module of a Llama): about half or less
    assert ffa["update_values"] <= ab["update_values"] / 2
    assert 0.25 < _up(ffa) / _up(ab) < 0.6
    # fp16 halves the values, not the envelope
    assert 0.5 < _up(ab16) / _up(ab) < 0.6 and 0.5 < _up(ffa16) / _up(ffa) < 0.65
    # the global adapter comes down in fp32 whatever precision the replies had
    assert _down(ab16) == pytest.approx(_down(ab), rel=0.01) and _down(ffa16) == pytest.approx(_down(ffa), rel=0.01)
    assert _down(ffa) < _down(ab)

    for n, pair in secagg.items():
        none, with_secagg = pair["none"], pair["secagg"]
        assert none["update_values"] == with_secagg["update_values"] == ffa["update_values"]
        # SecAgg+ adds key exchange, shares and a masked (quantized) vector: more bytes each way
        assert pair["ratio_bytes_up_per_client_round"] == pytest.approx(_up(with_secagg) / _up(none))
        assert _up(with_secagg) > _up(none)
        assert _down(with_secagg) > _down(none)
        assert pair["ratio_round_s"] == pytest.approx(with_secagg["round_s"]["median"] / none["round_s"]["median"])
        assert pair["ratio_overhead_s"] > 0
    assert report["machine"]["load_before"] >= 0 and report["machine"]["cores"] >= 1

    table = (out / "federation.md").read_text()
    assert table.startswith("### ") and "`fedpal bench federation --quick`" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(TRANSPORT) + 2 * len(secagg)  # header, transports, two arms per client count
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[1:]]
    assert [c[0] for c in cells[: len(TRANSPORT)]] == list(TRANSPORT)
    assert [c[2] for c in cells[len(TRANSPORT) :]] == ["3", "3"]  # SecAgg+ and none at 3 clients
    assert all(len(c) == len(report["columns"]) for c in cells)
