"""Throughput of the encrypted preference memory at 10k records.

``python -m fedpal.simulations.benchmarks.memory [--records 10000] [--out FILE.json]``
measures, on a scratch home with the default (OWASP) Argon2id settings:
- opening a memory (key derivation dominates),
- inserts one transaction per record (how the chat agent writes) and as one JSONL import,
- a full decrypting read of every record,
- retrieval: the first query (decrypt all + build the BM25 index), then warm queries,
  and a query right after a write (the index is rebuilt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

TOPICS = (
    "hiking",
    "python",
    "cooking",
    "budget",
    "travel",
    "music",
    "garden",
    "fitness",
    "email",
    "history",
    "chess",
    "coffee",
    "sleep",
    "rust",
    "painting",
    "physics",
    "taxes",
    "cycling",
    "poetry",
    "movies",
)
WORDS = (
    "please",
    "short",
    "answer",
    "explain",
    "simple",
    "steps",
    "example",
    "list",
    "detailed",
    "friendly",
    "formal",
    "tips",
    "plan",
    "weekly",
    "quick",
    "honest",
    "summary",
    "why",
    "how",
    "best",
    "avoid",
    "beginner",
    "advanced",
    "compare",
    "review",
    "ideas",
    "schedule",
    "bullet",
    "points",
    "table",
)


def _sentence(rng: random.Random, n: int) -> str:
    topic = rng.choice(TOPICS)
    return " ".join([topic] + [rng.choice(WORDS) for _ in range(n)] + [rng.choice(TOPICS)])


def synthetic_lines(count: int, seed: int = 0) -> list[dict]:
    """A user's worth of records in JSONL form: 5% stated, the rest pairs, ratings, edits, turns."""
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        roll = rng.random()
        tags = [rng.choice(TOPICS)] if rng.random() < 0.3 else []
        if roll < 0.05:
            line = {"kind": "stated", "text": f"I prefer {_sentence(rng, 6)}"}
        elif roll < 0.40:
            line = {
                "kind": "pair",
                "prompt": _sentence(rng, 10),
                "chosen": _sentence(rng, 40),
                "rejected": _sentence(rng, 40),
            }
        elif roll < 0.65:
            line = {
                "kind": "rating",
                "prompt": _sentence(rng, 10),
                "response": _sentence(rng, 40),
                "score": rng.randint(1, 5),
            }
        elif roll < 0.80:
            line = {
                "kind": "edit",
                "prompt": _sentence(rng, 10),
                "response": _sentence(rng, 40),
                "edited": _sentence(rng, 30),
            }
        else:
            line = {"kind": "turn", "role": rng.choice(["user", "assistant"]), "text": _sentence(rng, 20)}
        lines.append({**line, "tags": tags, "id": f"r{i:06d}"})
    return lines


def _add(memory, line: dict) -> str:
    fields = {k: v for k, v in line.items() if k not in ("kind", "tags", "id")}
    return getattr(memory, f"add_{line['kind']}")(**fields, tags=line["tags"])


def run(records: int = 10_000, queries: int = 200, k: int = 5, seed: int = 0) -> dict:
    """Measure and return the figures (printed as a table by ``main``)."""
    with tempfile.TemporaryDirectory(prefix="fedpal-memory-bench-") as scratch:
        return _measure(Path(scratch), records, queries, k, seed)


def _measure(scratch: Path, records: int, queries: int, k: int, seed: int) -> dict:
    from fedpal.client.memory import PreferenceMemory

    lines = synthetic_lines(records, seed)
    rng = random.Random(seed + 1)
    prompts = [_sentence(rng, 8) for _ in range(queries)]
    source = scratch / "records.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    passphrase = "benchmark passphrase"

    start = time.perf_counter()
    PreferenceMemory.open(scratch / "single", passphrase).close()
    create_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    single = PreferenceMemory.open(scratch / "single", passphrase)
    open_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    for line in lines:
        _add(single, line)
    single_s = time.perf_counter() - start
    single.close()

    with PreferenceMemory.open(scratch / "bulk", passphrase) as bulk:
        start = time.perf_counter()
        bulk.import_jsonl(source)
        import_s = time.perf_counter() - start
    db_bytes = (scratch / "bulk" / "memory.sqlite").stat().st_size

    with PreferenceMemory.open(scratch / "bulk", passphrase) as memory:
        start = time.perf_counter()
        cold_hits = memory.retrieve(prompts[0], k)
        cold_ms = (time.perf_counter() - start) * 1000
        latencies = []
        for prompt in prompts:
            start = time.perf_counter()
            memory.retrieve(prompt, k)
            latencies.append((time.perf_counter() - start) * 1000)
        others = ["pair", "rating", "edit", "turn"]
        ranked = []
        for prompt in prompts:
            start = time.perf_counter()
            memory.retrieve(prompt, k, kinds=others)
            ranked.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        everything = memory.records()
        read_cached_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        memory.verify()
        read_s = time.perf_counter() - start
        memory.add_turn("user", "one more turn about hiking")
        start = time.perf_counter()
        memory.retrieve(prompts[1], k)
        after_write_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        pairs = memory.preference_pairs()
        pairs_ms = (time.perf_counter() - start) * 1000
    assert len(everything) == records and len(cold_hits) == k

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "records": records,
        "queries": queries,
        "k": k,
        "create_ms": round(create_ms, 1),
        "open_ms": round(open_ms, 1),
        "insert_single_records_per_s": round(records / single_s),
        "insert_import_records_per_s": round(records / import_s),
        "read_decrypt_all_records_per_s": round(records / read_s),
        "read_cached_ms": round(read_cached_ms, 2),
        "retrieve_cold_ms": round(cold_ms, 1),
        "retrieve_warm_median_ms": round(statistics.median(latencies), 2),
        "retrieve_warm_p95_ms": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 2),
        "retrieve_warm_queries_per_s": round(1000 * len(latencies) / sum(latencies), 1),
        "retrieve_ranked_median_ms": round(statistics.median(ranked), 2),
        "retrieve_ranked_queries_per_s": round(1000 * len(ranked) / sum(ranked), 1),
        "retrieve_after_write_ms": round(after_write_ms, 1),
        "preference_pairs": len(pairs),
        "preference_pairs_ms": round(pairs_ms, 1),
        "file_bytes_per_record": round(db_bytes / records),
    }


ROWS = [
    ("create memory (Argon2id 19 MiB, t=2)", "create_ms", "ms"),
    ("open memory (Argon2id 19 MiB, t=2)", "open_ms", "ms"),
    ("insert, one transaction per record", "insert_single_records_per_s", "records/s"),
    ("insert, one JSONL import", "insert_import_records_per_s", "records/s"),
    ("read + decrypt every record", "read_decrypt_all_records_per_s", "records/s"),
    ("read, nothing changed (cached)", "read_cached_ms", "ms"),
    ("retrieve, first query (decrypt + index)", "retrieve_cold_ms", "ms"),
    ("retrieve, warm (stated first), median", "retrieve_warm_median_ms", "ms"),
    ("retrieve, warm (stated first), p95", "retrieve_warm_p95_ms", "ms"),
    ("retrieve, warm (stated first)", "retrieve_warm_queries_per_s", "queries/s"),
    ("retrieve, BM25 over non-stated kinds, median", "retrieve_ranked_median_ms", "ms"),
    ("retrieve, BM25 over non-stated kinds", "retrieve_ranked_queries_per_s", "queries/s"),
    ("retrieve right after a write", "retrieve_after_write_ms", "ms"),
    ("preference pairs (all views)", "preference_pairs_ms", "ms"),
    ("file size", "file_bytes_per_record", "bytes/record"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000, help="Records per memory.")
    parser.add_argument("--queries", type=int, default=200, help="Warm retrieval queries.")
    parser.add_argument("-k", type=int, default=5, help="Records per retrieval.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args(argv)
    result = run(args.records, args.queries, args.k, args.seed)
    print(f"preference memory, {result['records']} records, k={result['k']} ({result['machine']}, {result['date']})")
    width = max(len(label) for label, _, _ in ROWS)
    for label, key, unit in ROWS:
        print(f"  {label:<{width}}  {result[key]:>10}  {unit}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
