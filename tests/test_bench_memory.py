"""``fedpal bench memory --quick``: the encrypted memory's insert and retrieve throughput at 100 and 1000
records, run as a user runs it (one real subprocess, a few seconds)."""

from __future__ import annotations

import json

from cli_helpers import fedpal, ok
from fedpal.simulations.benchmarks.memory import Sizes

RATES = ("insert_single_records_per_s", "insert_import_records_per_s")
QUERIES = ("retrieve_warm_queries_per_s", "retrieve_ranked_queries_per_s")
LATENCIES = ("retrieve_first_after_open_ms", "retrieve_after_write_ms")


def test_bench_memory_quick_measures_inserts_and_retrieval_at_each_size(tmp_path):
    out, scratch = tmp_path / "bench", tmp_path / "tmp"
    scratch.mkdir()
    done = ok(fedpal("bench", "memory", "--quick", "--out", str(out), passphrase=None, env={"TMPDIR": str(scratch)}))
    assert f"wrote {out / 'memory.json'}" in " ".join(done.stdout.split())
    assert list(scratch.iterdir()) == []  # the scratch memories are gone

    report = json.loads((out / "memory.json").read_text())
    assert report["name"] == "memory" and report["settings"]["quick"] is True
    assert report["command"] == "fedpal bench memory --quick"
    sizes = Sizes.of(quick=True)
    figures = report["figures"]["sizes"]
    assert list(figures) == [str(n) for n in sizes.records] == ["100", "1000"]
    for records, size in zip(sizes.records, figures.values()):
        assert size["records"] == records
        repeats = {**dict.fromkeys(RATES, sizes.chunks), **dict.fromkeys(QUERIES, sizes.batches)}
        repeats.update(dict.fromkeys(LATENCIES, sizes.reopen))
        for key, n in repeats.items():
            spread = size[key]
            assert spread["n"] == n, key
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (key, spread)
        # sealed records carry a nonce, a tag and padding: more than the ~60 words of an average record
        assert size["file_bytes_per_record"] > 300
        warm_query_ms = 1000 / size["retrieve_warm_queries_per_s"]["median"]
        if records >= 1000:
            # decrypting every record and building the index, or rebuilding it after a write, is far
            # more work than one query on a built index; one transaction per record is slower than one per chunk
            assert size["retrieve_first_after_open_ms"]["median"] > 5 * warm_query_ms
            assert size["retrieve_after_write_ms"]["median"] > 5 * warm_query_ms
            assert size["insert_import_records_per_s"]["median"] > size["insert_single_records_per_s"]["median"]
    assert report["machine"]["load_before"] >= 0 and report["machine"]["cores"] >= 1

    table = (out / "memory.md").read_text()
    assert table.startswith("### ") and "`fedpal bench memory --quick`" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(sizes.records)  # header and one row per size
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["100", "1,000"]
    assert all(len(row.split("|")) == len(report["columns"]) + 2 for row in rows)
