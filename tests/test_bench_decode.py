"""``fedpal bench``: the shared report and registry, and ``fedpal bench decode --quick`` run as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import fedpal, ok, user_error
from fedpal.common.errors import FedpalError
from fedpal.simulations.benchmarks.core import BenchReport, Machine, Spread, benchmark, interleaved
from fedpal.simulations.benchmarks.decode import agreement


def test_interleaved_repeats_each_contender_and_reports_its_spread():
    calls = []
    values = {"a": iter([3.0, 1.0, 2.0]), "b": iter([10.0, 30.0, 20.0])}
    spreads = interleaved({name: (lambda n=name: calls.append(n) or next(values[n])) for name in values}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # round-robin, the order reversed every other round
    assert spreads["a"] == Spread(2.0, 1.0, 3.0, 3) and spreads["b"] == Spread(20.0, 10.0, 30.0, 3)
    assert spreads["b"].ratio(spreads["a"]) == 10.0 and spreads["a"].show() == "2.0 (1.0-3.0)"


def test_agreement_counts_the_reference_tokens_the_model_ranks_first():
    def model(prompt):
        def step(token):
            logits = np.zeros(10)
            logits[5 if token is None else (token + 1) % 10] = 1.0  # predicts "previous + 1"
            return logits

        return step

    references = [([1, 2], [5, 6, 7, 9]), ([3], [5, 0])]  # 5, 6, 7 hit, 9 misses; 5 hits, 0 misses
    assert agreement(model, references) == pytest.approx(4 / 6)


def test_a_report_is_a_table_json_and_markdown_and_refuses_a_ragged_row(tmp_path):
    machine = Machine("2026-12-02 05:00 UTC", "cpu", 2, "Linux", "3.11", 0.5, 0.7)
    report = BenchReport("demo", "Demo", machine, {"quick": True}, ["a", "b"], [["x", "1"]], {"k": 1}, ["a note"])
    json_path, md_path = report.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert data["machine"]["load_after"] == 0.7 and data["figures"] == {"k": 1}
    assert data["command"] == "fedpal bench demo --quick"
    assert "| x | 1 |" in md_path.read_text() and "- a note" in md_path.read_text()
    with pytest.raises(ValueError, match="2 columns"):
        BenchReport("demo", "Demo", machine, {}, ["a", "b"], [["only one"]])
    with pytest.raises(FedpalError, match="already registered"):
        benchmark("decode", "again")(lambda quick: report)


def test_bench_help_lists_every_benchmark():
    from fedpal.simulations.benchmarks.cli import load_benchmarks
    from fedpal.simulations.benchmarks.core import BENCHMARKS

    load_benchmarks()
    done = ok(fedpal("bench", "--help", passphrase=None))
    for name in [*BENCHMARKS, "all"]:
        assert f" {name} " in done.stdout, name
    assert set(BENCHMARKS) == {"decode", "train", "federation", "memory", "scale"}
    user_error(fedpal("bench", "decoder", passphrase=None), "decoder")


def test_bench_decode_quick_times_every_engine_and_checks_the_targets(tmp_path):
    out = tmp_path / "bench"
    done = ok(fedpal("bench", "decode", "--quick", "--out", str(out), passphrase=None, timeout=600))
    assert f"wrote {out / 'decode.json'}" in " ".join(done.stdout.split())
    report = json.loads((out / "decode.json").read_text())
    assert report["command"] == "fedpal bench decode --quick" and report["settings"]["model"] == "tiny"
    rates = report["figures"]["tokens_per_s"]
    names = " | ".join(rates)
    for engine in ("PyTorch eager", "plain ORT GenAI int4", "fedpal ONNX int4 + personal adapter", "fusion", "rank-16"):
        assert engine in names, engine
    wider = "plain ORT GenAI int4 export, block 64 (no adapter slots)"  # the block-size lever, with its quality
    assert wider in rates and wider in report["figures"]["agreement_with_fp32"]
    for spread in rates.values():
        assert spread["n"] == report["settings"]["repeats"] and 0 < spread["min"] <= spread["median"] <= spread["max"]
    after_first = report["figures"]["tokens_per_s_after_first"]
    assert set(after_first) == {name for name in rates if "rank-" not in name}
    for spread in after_first.values():  # the first timed repeat is left out, as for the first-token time
        assert spread["n"] == report["settings"]["repeats"] - 1 and 0 < spread["min"] <= spread["max"]
    assert all(0 <= share <= 1 for share in report["figures"]["agreement_with_fp32"].values())
    checks = report["figures"]["checks"]
    assert checks["adapter_vs_pytorch"] > 0 and -1 < checks["slots_cost_vs_plain"] < 1
    assert checks["adapter_vs_pytorch_after_first"] > 0
    assert "adapter_vs_llama_cpp" not in checks  # the tiny model has no GGUF: llama.cpp says so in its row
    assert "| llama.cpp | no GGUF for this model |" in (out / "decode.md").read_text()
