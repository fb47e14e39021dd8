"""What every ``fedpal bench`` benchmark shares: repeats, spreads, the machine, the report.

The machine is noisy (two cores, shared), so a benchmark never compares numbers from two
runs: the contenders run side by side, their repeats interleaved (a busy moment slows them
alike), and a figure is the median of its repeats with the min and max beside it. The
one-minute load average before and after says how busy the machine was.

A benchmark is a function ``(quick: bool) -> BenchReport`` registered under its name with
:func:`benchmark`; ``quick`` swaps the default model for the tiny test model and shrinks
every size, which CI runs as a smoke test.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fedpal.common.errors import FedpalError


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements with their min and max."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)), len(values))

    def show(self, digits: int = 1, unit: str = "") -> str:
        """``median (min-max)`` for a table cell."""
        fmt = f"{{:.{digits}f}}"
        return f"{fmt.format(self.median)}{unit} ({fmt.format(self.min)}-{fmt.format(self.max)})"

    def ratio(self, other: "Spread") -> float:
        """This median over ``other``'s."""
        return self.median / other.median if other.median else float("nan")


def interleaved(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, Spread]:
    """Run each contender ``repeats`` times, round-robin, reversing the order every other round.

    Each callable returns its own figure (a rate, a time); the result is each one's spread.
    """
    values: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            values[name].append(float(contenders[name]()))
    return {name: Spread.of(v) for name, v in values.items()}


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Machine:
    """Where and when a benchmark ran, and how busy the machine was meanwhile."""

    date: str
    cpu: str
    cores: int
    system: str
    python: str
    load_before: float
    load_after: float

    def describe(self) -> str:
        return (
            f"{self.cpu}, {self.cores} cores, {self.system}, Python {self.python}; "
            f"load average {self.load_before:.2f} before, {self.load_after:.2f} after; {self.date}"
        )


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextmanager
def on_this_machine() -> Iterator[Callable[[], Machine]]:
    """Record the load average around a measurement; yields a function giving the ``Machine``."""
    before = os.getloadavg()[0]
    start = datetime.now(timezone.utc)

    def machine() -> Machine:
        return Machine(
            date=start.strftime("%Y-%m-%d %H:%M UTC"),
            cpu=cpu_name(),
            cores=os.cpu_count() or 1,
            system=platform.system(),
            python=platform.python_version(),
            load_before=round(before, 2),
            load_after=round(os.getloadavg()[0], 2),
        )

    yield machine


@dataclass
class BenchReport:
    """One benchmark's table and figures, as printed, written to JSON and pasted into docs."""

    name: str
    title: str
    machine: Machine
    settings: dict
    columns: list[str]
    rows: list[list[str]]
    figures: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def __post_init__(self) -> None:
        if not self.command:
            self.command = f"fedpal bench {self.name}" + (" --quick" if self.settings.get("quick") else "")
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"row {row} has {len(row)} cells for {len(self.columns)} columns")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["machine"] = asdict(self.machine)
        return data

    def markdown(self) -> str:
        """The table as Markdown, headed by what made it."""
        settings = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        lines = [
            f"### {self.title}",
            "",
            f"`{self.command}` ({settings}); {self.machine.describe()}",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in self.rows),
        ]
        if self.notes:
            lines += ["", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines) + "\n"

    def rich_table(self):
        from rich.table import Table

        table = Table(title=self.title, caption=self.machine.describe(), title_justify="left")
        for column in self.columns:
            table.add_column(column)
        for row in self.rows:
            table.add_row(*(str(cell) for cell in row))
        return table

    def write(self, folder: Path) -> tuple[Path, Path]:
        """``<name>.json`` and ``<name>.md`` in ``folder``; returns both paths."""
        from fedpal.common.files import write_atomic

        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / f"{self.name}.json", folder / f"{self.name}.md"
        write_atomic(json_path, json.dumps(self.to_dict(), indent=2).encode())
        write_atomic(md_path, self.markdown().encode())
        return json_path, md_path


Benchmark = Callable[[bool], BenchReport]


@dataclass(frozen=True)
class Registered:
    name: str
    help: str
    run: Benchmark


BENCHMARKS: dict[str, Registered] = {}
"""Benchmarks by name, in the order ``fedpal bench all`` runs them."""


def benchmark(name: str, help: str) -> Callable[[Benchmark], Benchmark]:
    """Register ``fn(quick) -> BenchReport`` as ``fedpal bench <name>``."""

    def register(fn: Benchmark) -> Benchmark:
        if name in BENCHMARKS:
            raise FedpalError(f"a benchmark named '{name}' is already registered")
        BENCHMARKS[name] = Registered(name, help, fn)
        return fn

    return register
