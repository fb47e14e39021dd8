"""``fedpal bench memory``: insert and retrieve throughput of the encrypted preference memory.

At each size (1k, 10k and 100k records; ``--quick``: 100 and 1k) two fresh memories on
a scratch folder, with the default (OWASP) Argon2id settings, are filled with the same
synthetic user's records, side by side and interleaved chunk by chunk:

- one transaction per record (``add_pair``, ``add_turn``...: how the chat agent writes),
- one JSONL import per chunk (``import_jsonl``: how ``fedpal memory import`` writes).

Each chunk's records/s is one repeat. Then, on the filled memory:

- retrieve, warm: ``retrieve(prompt, k)`` (stated preferences first, then BM25 over the
  rest) on an index already built; each batch of queries (about a second's worth) is
  one repeat of queries/s, alternating with
- retrieve, BM25 over the non-stated kinds only (``kinds=...``), the same way;
- the first retrieve after opening the memory: decrypt every record and build the index;
- a retrieve right after a write (a chat turn): the index is rebuilt (records already
  decrypted are not decrypted again).

Figures are medians (min-max) of the repeats.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpal.simulations.benchmarks.core import BenchReport, Spread, benchmark, interleaved, on_this_machine

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
PASSPHRASE = "benchmark passphrase"
K = 5
NON_STATED = ("pair", "rating", "edit", "turn")


def _sentence(rng: random.Random, n: int) -> str:
    topic = rng.choice(TOPICS)
    return " ".join([topic] + [rng.choice(WORDS) for _ in range(n)] + [rng.choice(TOPICS)])


def synthetic_lines(count: int, seed: int = 0) -> list[dict]:
    """A user's worth of records in JSONL form: 5% stated, the rest pairs, ratings, edits, turns."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
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
        lines.append({**line, "tags": tags})
    return lines


def _add(memory, line: dict) -> str:
    fields = {k: v for k, v in line.items() if k not in ("kind", "tags")}
    return getattr(memory, f"add_{line['kind']}")(**fields, tags=line["tags"])


@dataclass(frozen=True)
class Sizes:
    """What one run measures (``quick``: a smoke test of a few seconds)."""

    records: tuple[int, ...]
    chunks: int
    """Insert repeats: each size is inserted in this many chunks, each one timed."""
    batches: int
    """Warm-retrieve repeats per contender."""
    batch_s: float
    """About how long one batch of warm queries runs."""
    reopen: int
    """Repeats of the first retrieve after opening and of the retrieve after a write."""

    @classmethod
    def of(cls, quick: bool) -> "Sizes":
        if quick:
            return cls((100, 1000), chunks=4, batches=3, batch_s=0.2, reopen=2)
        return cls((1000, 10_000, 100_000), chunks=5, batches=5, batch_s=1.0, reopen=3)


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def measure_size(scratch: Path, records: int, sizes: Sizes, advance: Callable[[], None], seed: int = 0) -> dict:
    """Every figure at one size; ``advance`` is called after each timed step (progress)."""
    from fedpal.client.memory import PreferenceMemory

    lines = synthetic_lines(records, seed)
    bounds = [records * i // sizes.chunks for i in range(sizes.chunks + 1)]
    chunks = [lines[a:b] for a, b in zip(bounds, bounds[1:])]
    files = []
    for i, chunk in enumerate(chunks):
        path = scratch / f"chunk-{i}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in chunk), encoding="utf-8")
        files.append(path)

    single = PreferenceMemory.open(scratch / "single", PASSPHRASE)
    bulk = PreferenceMemory.open(scratch / "bulk", PASSPHRASE)
    try:
        next_single, next_bulk = iter(chunks), iter(zip(chunks, files))

        def insert_single() -> float:
            chunk = next(next_single)
            start = time.perf_counter()
            for line in chunk:
                _add(single, line)
            seconds = time.perf_counter() - start
            advance()
            return _rate(len(chunk), seconds)

        def insert_import() -> float:
            chunk, path = next(next_bulk)
            start = time.perf_counter()
            added = bulk.import_jsonl(path)
            seconds = time.perf_counter() - start
            assert added == len(chunk), (added, len(chunk))
            advance()
            return _rate(len(chunk), seconds)

        inserts = interleaved(
            {"insert, one transaction per record": insert_single, "insert, one JSONL import per chunk": insert_import},
            sizes.chunks,
        )
        assert len(single) == len(bulk) == records
    finally:
        single.close()
        bulk.close()
    db_bytes = (scratch / "bulk" / "memory.sqlite").stat().st_size

    rng = random.Random(seed + 1)
    prompts = [_sentence(rng, 8) for _ in range(1000)]
    with PreferenceMemory.open(scratch / "bulk", PASSPHRASE) as memory:
        memory.retrieve(prompts[0], K)  # load the code and build the index once: the warm queries below reuse it
        first: list[float] = []
        for i in range(sizes.reopen):  # the first query of a freshly opened memory: decrypt all, build the index
            with PreferenceMemory.open(scratch / "bulk", PASSPHRASE) as fresh:
                start = time.perf_counter()
                hits = fresh.retrieve(prompts[i], K)
                first.append((time.perf_counter() - start) * 1000)
            assert len(hits) == K
            advance()
        queries = itertools.cycle(prompts)

        def batch(kinds: tuple[str, ...] | None) -> Callable[[], float]:
            def run() -> float:
                done, start = 0, time.perf_counter()
                while True:
                    memory.retrieve(next(queries), K, kinds=kinds)
                    done += 1
                    seconds = time.perf_counter() - start
                    if seconds >= sizes.batch_s and done >= 3:
                        break
                advance()
                return _rate(done, seconds)

            return run

        warm = interleaved(
            {"retrieve, warm": batch(None), "retrieve, warm, BM25 over non-stated kinds": batch(NON_STATED)},
            sizes.batches,
        )
        after_write: list[float] = []
        for i in range(sizes.reopen):  # a chat turn: write, then retrieve for the next prompt
            memory.add_turn("user", f"one more turn about {TOPICS[i % len(TOPICS)]}")
            start = time.perf_counter()
            memory.retrieve(prompts[i + 1], K)
            after_write.append((time.perf_counter() - start) * 1000)
            advance()
    return {
        "records": records,
        "k": K,
        "insert_single_records_per_s": asdict(inserts["insert, one transaction per record"]),
        "insert_import_records_per_s": asdict(inserts["insert, one JSONL import per chunk"]),
        "retrieve_warm_queries_per_s": asdict(warm["retrieve, warm"]),
        "retrieve_ranked_queries_per_s": asdict(warm["retrieve, warm, BM25 over non-stated kinds"]),
        "retrieve_first_after_open_ms": asdict(Spread.of(first)),
        "retrieve_after_write_ms": asdict(Spread.of(after_write)),
        "file_bytes_per_record": round(db_bytes / records),
    }


def _steps(sizes: Sizes) -> int:
    return 2 * sizes.chunks + 2 * sizes.batches + 2 * sizes.reopen


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], Callable[[], None]]]:
    """A progress bar on stderr; yields ``start(description) -> advance()``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("memory", total=total)

        def start(description: str) -> Callable[[], None]:
            progress.update(task, description=description)
            return lambda: progress.advance(task)

        yield start


def _cell(s: dict, digits: int = 0) -> str:
    return Spread(**s).show(digits)


COLUMNS = [
    "records",
    "insert, 1 transaction/record (records/s)",
    "insert, JSONL import (records/s)",
    "retrieve, warm (queries/s)",
    "retrieve, BM25 non-stated (queries/s)",
    "first retrieve after open (ms)",
    "retrieve after a write (ms)",
]


@benchmark("memory", help="Encrypted preference memory: insert and retrieve throughput at 1k, 10k and 100k records.")
def run(quick: bool) -> BenchReport:
    sizes = Sizes.of(quick)
    results = []
    started = time.perf_counter()
    with on_this_machine() as machine, _progress(_steps(sizes) * len(sizes.records)) as progress:
        for records in sizes.records:
            scratch = Path(tempfile.mkdtemp(prefix="fedpal-bench-memory-"))
            try:
                results.append(measure_size(scratch, records, sizes, progress(f"memory, {records} records")))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        report_machine = machine()
    rows = [
        [
            f"{r['records']:,}",
            _cell(r["insert_single_records_per_s"]),
            _cell(r["insert_import_records_per_s"]),
            _cell(r["retrieve_warm_queries_per_s"]),
            _cell(r["retrieve_ranked_queries_per_s"]),
            _cell(r["retrieve_first_after_open_ms"], 1),
            _cell(r["retrieve_after_write_ms"], 1),
        ]
        for r in results
    ]
    notes = [
        f"Median (min-max) of repeats: inserts in {sizes.chunks} chunks per size (each chunk's rate is a repeat; "
        "the two ways of writing alternate chunk by chunk, and the memory grows from empty to the size); "
        f"warm retrieves in {sizes.batches} batches of about {sizes.batch_s:g} s per kind (alternating); "
        f"{sizes.reopen} first retrieves after opening and {sizes.reopen} retrieves after a write.",
        "Every record is sealed with AES-256-GCM under a data key wrapped with a passphrase key (Argon2id, "
        "19 MiB, t=2); a synthetic user: "
        "5% stated preferences (~10 words), 35% pairs, 25% ratings and 15% edits (55-95 words), 20% turns (~20 words); "
        f"retrieve returns k={K} records.",
        "The first retrieve decrypts every record and builds the BM25 index; after a write the index is rebuilt "
        "(decrypted records are cached), which is what a chat turn pays before the next retrieval.",
    ]
    if quick:
        notes.append("Quick run: small sizes; a smoke test, not a measurement.")
    return BenchReport(
        name="memory",
        title="Encrypted preference memory: insert and retrieve throughput",
        machine=report_machine,
        settings={
            "quick": quick,
            "records": "/".join(f"{n:,}" for n in sizes.records),
            "k": K,
            "insert chunks": sizes.chunks,
            "query batches": sizes.batches,
        },
        columns=COLUMNS,
        rows=rows,
        figures={"wall_s": round(time.perf_counter() - started, 1), "sizes": {str(r["records"]): r for r in results}},
        notes=notes,
    )
