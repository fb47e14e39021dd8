"""``fedpal bench federation``: what the federation costs beyond local training, and what it sends.

Two comparisons, each on the real fedpal federation (``run_federation`` in a Flower
ServerApp, the fedpal ClientApp, Flower's Simulation Engine on Ray):

- transport: plain LoRA (A and B sent) vs FFA-LoRA (only B) vs fp16 updates, at one
  client count: round time, overhead and bytes per client and round;
- SecAgg+: FFA-LoRA with and without SecAgg+ at several client counts (same model, same
  rounds), and the ratio SecAgg+ / none of the round time and overhead.

Round overhead is the round's wall time minus the slowest client's local training time:
what the federation adds to the training itself (memory decryption and adapter I/O on the
client, messaging, SecAgg+ crypto, clipping, DP noise, aggregation, checkpointing).
Bytes are the serialized message contents per client and round, counted by the server
at its Grid (every SecAgg+ stage included), both directions.

All federations of one comparison run inside ONE simulation (Ray starts once, which takes
longer than a tiny round): its ServerApp runs them one after another on the same
SuperNodes, each sampling the clients it needs. Every client of a round has its own Ray
actor, so the slowest local training is on the round's critical path. A warm-up round
with every node loads the model in every actor first (and again when the adapter layout
changes, which makes a client reload its model), so every measured round is a repeat:
figures are the median (min-max) over the rounds of all federations of one contender,
which run interleaved in passes (A B C, then C B A) so a busy moment slows them alike.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fedpal.simulations.benchmarks.core import BenchReport, Spread, benchmark, on_this_machine

PASSPHRASE = "benchmark-passphrase"
PAIRS_PER_USER = 6

TRANSPORT: dict[str, dict] = {
    "plain A/B fp32": {"ffa-lora": False, "fp16-updates": False},
    "plain A/B fp16": {"ffa-lora": False, "fp16-updates": True},
    "FFA-LoRA fp32": {"ffa-lora": True, "fp16-updates": False},
    "FFA-LoRA fp16": {"ffa-lora": True, "fp16-updates": True},
}
"""The transport contenders (no SecAgg+: fp16 updates only go without it)."""
BASELINE = "plain A/B fp32"
SECAGG_ARMS: dict[str, dict] = {"none": {"secagg": False}, "SecAgg+": {"secagg": True}}
"""The SecAgg+ comparison's two arms, both FFA-LoRA fp32 (fedpal's default adapter)."""

TRAINING = {"local-steps": 1, "personal-steps": 0, "batch-size": 2, "max-length": 64}
"""Every federation's local work per round: one DPO/SFT step on the shared adapter, no personal adapter
(overhead is what a round adds beyond training, so more steps would only make the run longer)."""


@dataclass(frozen=True)
class Federation:
    """One federation of a simulation's schedule: ``clients`` sampled per round, ``rounds`` rounds.

    Its rounds are repeats of each of ``contenders`` (two contenders with the same clients
    and settings share one federation); a federation without contenders is a warm-up."""

    contenders: tuple[str, ...]
    clients: int
    rounds: int
    settings: dict = field(default_factory=dict)
    key: str = ""

    @property
    def warmup(self) -> bool:
        return not self.contenders

    @property
    def ffa(self) -> bool:
        return bool(self.settings.get("ffa-lora", True))


@dataclass(frozen=True)
class Part:
    """One comparison's sizes: its model, client counts, rounds per federation and passes."""

    model: str
    clients: tuple[int, ...]
    rounds: int
    passes: int

    @property
    def repeats(self) -> int:
        return self.rounds * self.passes

    def describe(self) -> str:
        if self.passes == 1:
            return f"{self.repeats} rounds per row (one federation)"
        return f"{self.repeats} rounds per row ({self.passes} federations of {self.rounds} rounds, alternating order)"


@dataclass(frozen=True)
class Sizes:
    """How big a run is (``quick``: a smoke test, one simulation of 3 SuperNodes, about a minute on two cores)."""

    transport: Part
    secagg: Part

    @classmethod
    def of(cls, quick: bool) -> "Sizes":
        if quick:
            return cls(Part("tiny", (3,), rounds=2, passes=1), Part("tiny", (3,), rounds=2, passes=1))
        # 20 clients need 20 Ray actors with their own model: the default model (~1.5 GB a
        # trained actor) would not fit this machine 20 times, so SecAgg+ runs on the tiny one
        return cls(Part("default", (5,), rounds=2, passes=2), Part("tiny", (5, 10, 20), rounds=3, passes=2))


def _passes(items: list, passes: int) -> list:
    """``items`` once per pass, every other pass reversed (A B C, C B A, ...)."""
    return [item for p in range(passes) for item in (items if p % 2 == 0 else list(reversed(items)))]


def transport_runs(clients: int, rounds: int, passes: int) -> list[Federation]:
    """The transport contenders (without SecAgg+), those with the same adapter layout next to each other."""
    names = sorted(TRANSPORT, key=lambda n: TRANSPORT[n]["ffa-lora"])
    return [
        Federation((name,), clients, rounds, {**TRANSPORT[name], "secagg": False}) for name in _passes(names, passes)
    ]


def secagg_runs(counts: tuple[int, ...], rounds: int, passes: int) -> list[Federation]:
    """FFA-LoRA fp32 with and without SecAgg+ at each client count."""
    pairs = [(n, arm) for n in counts for arm in SECAGG_ARMS]
    return [
        Federation((f"{arm} @{n}",), n, rounds, {"ffa-lora": True, "fp16-updates": False, **SECAGG_ARMS[arm]})
        for n, arm in _passes(pairs, passes)
    ]


def schedule(federations: list[Federation], nodes: int) -> list[Federation]:
    """One simulation's federations in order, keyed: a federation the same as an earlier one (clients,
    rounds, settings) is folded into it, and a warm-up round with all ``nodes`` goes first and wherever the
    adapter layout changes (a client reloads its model then, which must not count as overhead)."""
    merged: list[Federation] = []
    for fed in federations:
        same = next(
            (
                i
                for i, m in enumerate(merged)
                if (m.clients, m.rounds, m.settings) == (fed.clients, fed.rounds, fed.settings)
                and not set(fed.contenders) & set(m.contenders)
            ),
            None,
        )
        if same is None:
            merged.append(fed)
        else:
            merged[same] = replace(merged[same], contenders=merged[same].contenders + fed.contenders)
    out: list[Federation] = []
    for fed in merged:
        if not out or out[-1].ffa != fed.ffa:
            warm = {"ffa-lora": fed.ffa, "fp16-updates": False, "secagg": False}
            out.append(Federation((), nodes, 1, warm, key=f"{len(out):02d}-warmup"))
        out.append(replace(fed, key=f"{len(out):02d}"))
    return out


def _make_homes(base: Path, nodes: int) -> None:
    """One encrypted preference memory per node, with a few preference pairs to train on."""
    from fedpal.client.memory import PreferenceMemory

    for i in range(nodes):
        with PreferenceMemory.open(base / str(i), passphrase=PASSPHRASE) as memory:
            for j in range(PAIRS_PER_USER):
                memory.add_pair(
                    f"user {i} asks about plan {j}", f"a short warm answer {j}", f"a long formal answer {j} with detail"
                )


def _run_dir(work: Path, fed: Federation) -> Path:
    return work / "runs" / fed.key


def _server_app(model: str, nodes: int, schedule: list[Federation], work: Path):
    """A ServerApp that runs every federation of ``schedule`` in turn, on the same connected nodes."""
    from flwr.serverapp import ServerApp

    from fedpal.common.settings import FederationSettings
    from fedpal.server.federation import run_federation

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        for fed in schedule:
            config = {
                **dict(context.run_config),
                "model": model,
                "home-base": str(work / "nodes"),
                "run-dir": str(_run_dir(work, fed)),
                "num-server-rounds": fed.rounds,
                "min-clients": fed.clients,
                "fraction-train": fed.clients / nodes,
                "final-adapter": False,
                "resume": False,
                **TRAINING,
                **fed.settings,
            }
            run_federation(grid, context, FederationSettings.from_run_config(config))

    return app


@contextmanager
def _environment() -> Iterator[None]:
    """The simulated users' passphrase for the ClientApps (Ray's workers inherit it); restored after."""
    old = os.environ.get("FEDPAL_PASSPHRASE")
    os.environ["FEDPAL_PASSPHRASE"] = PASSPHRASE
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FEDPAL_PASSPHRASE", None)
        else:
            os.environ["FEDPAL_PASSPHRASE"] = old


@contextmanager
def _progress(work: Path, schedule: list[Federation], label: str) -> Iterator[None]:
    """A progress bar on stderr, counting the rounds written to the federations' metrics files."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = sum(f.rounds for f in schedule)
    files = [_run_dir(work, f) / "metrics.jsonl" for f in schedule]
    stop = threading.Event()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{label}: rounds", total=total)

        def poll() -> None:
            while not stop.wait(0.5):
                done = sum(len(p.read_text().splitlines()) for p in files if p.is_file())
                progress.update(task, completed=done)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def simulate(model: str, nodes: int, schedule: list[Federation], work: Path, label: str) -> dict[str, list[dict]]:
    """Run ``schedule`` in one simulation of ``nodes`` SuperNodes; returns each federation's metrics lines."""
    import logging

    from flwr.simulation import run_simulation

    from fedpal.client.client_app import make_client_app
    from fedpal.common.errors import FedpalError
    from fedpal.simulations.privacy.federation import quiet_flower

    _make_homes(work / "nodes", nodes)
    cpus = os.cpu_count() or 2
    backend = {
        # one actor per node: every sampled client trains at once
        "client_resources": {"num_cpus": cpus / nodes, "num_gpus": 0.0},
        "init_args": {
            "address": "local",  # never join a Ray cluster someone else started on this machine
            "num_cpus": cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "object_store_memory": 256 * 1024 * 1024,
        },
    }
    with _environment(), quiet_flower(), _progress(work, schedule, label):
        run_simulation(
            _server_app(model, nodes, schedule, work), make_client_app(), num_supernodes=nodes, backend_config=backend
        )
    lines: dict[str, list[dict]] = {}
    for fed in schedule:
        path = _run_dir(work, fed) / "metrics.jsonl"
        got = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        bad = [line for line in got if not line.get("aggregated") or line.get("clients_replied") != fed.clients]
        if len(got) != fed.rounds or bad:
            what = " and ".join(fed.contenders) or "the warm-up"
            raise FedpalError(
                f"the federation of {what} ({fed.clients} clients) completed {len(got) - len(bad)} of "
                f"{fed.rounds} rounds with every client; see {path}"
            )
        lines[fed.key] = got
    return lines


def _update_values(run_dir: Path) -> int:
    """How many numbers the shared-adapter update holds (the global adapter's size)."""
    from fedpal.server.federation import load_global_adapter

    return int(sum(a.size for a in load_global_adapter(run_dir).values()))


def summarise(schedule: list[Federation], lines: dict[str, list[dict]], work: Path) -> dict[str, dict]:
    """Each contender's spreads over the rounds of all its federations."""
    rounds: dict[str, list[dict]] = {}
    values: dict[str, int] = {}
    for fed in schedule:
        for contender in fed.contenders:
            rounds.setdefault(contender, []).extend(lines[fed.key])
            values[contender] = _update_values(_run_dir(work, fed))
    out = {}
    for contender, got in rounds.items():

        def spread(key, got=got) -> dict:
            return asdict(Spread.of([float(line[key]) for line in got]))

        fit_extra = [max(c["seconds"] - c["train_seconds"] for c in line["clients"].values()) for line in got]
        out[contender] = {
            "rounds": len(got),
            "round_s": spread("seconds"),
            "train_s": spread("slowest_client_train_s"),
            "overhead_s": spread("overhead_s"),
            "client_fit_beyond_training_s": asdict(Spread.of(fit_extra)),
            "bytes_up_per_client_round": spread("bytes_up_per_client"),
            "bytes_down_per_client_round": spread("bytes_down_per_client"),
            "update_values": values[contender],
        }
    return out


def _show(s: dict, digits: int = 2) -> str:
    return Spread(**s).show(digits)


def _kb(s: dict) -> str:
    return f"{s['median'] / 1e3:.1f}"


def _model_name(model: str) -> str:
    if model == "default":
        from fedpal.common.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return "tiny (test model)" if model == "tiny" else model


COLUMNS = [
    "setup",
    "model",
    "clients",
    "round s",
    "slowest local training s",
    "overhead s",
    "up kB/client-round",
    "down kB/client-round",
    "up bytes vs plain A/B fp32",
    "SecAgg+/none round s (overhead)",
]


@benchmark("federation", help="Round overhead and bytes per client-round: plain LoRA vs FFA-LoRA vs fp16, SecAgg+.")
def run(quick: bool) -> BenchReport:
    sizes = Sizes.of(quick)
    tp, sp = sizes.transport, sizes.secagg
    transport = transport_runs(tp.clients[0], tp.rounds, tp.passes)
    secagg = secagg_runs(sp.clients, sp.rounds, sp.passes)
    if tp.model == sp.model:  # one simulation for both (the quick run: Ray starts once)
        nodes = max(*tp.clients, *sp.clients)
        sims = [(sp.model, nodes, schedule(transport + secagg, nodes), "transport and SecAgg+")]
    else:
        sims = [
            (tp.model, max(tp.clients), schedule(transport, max(tp.clients)), "transport"),
            (sp.model, max(sp.clients), schedule(secagg, max(sp.clients)), "SecAgg+"),
        ]
    work = Path(tempfile.mkdtemp(prefix="fedpal-bench-federation-"))
    started = time.perf_counter()
    summary: dict[str, dict] = {}
    with on_this_machine() as machine:
        for i, (model, nodes, federations, label) in enumerate(sims):
            lines = simulate(model, nodes, federations, work / str(i), label)
            summary.update(summarise(federations, lines, work / str(i)))
        report_machine = machine()
    shutil.rmtree(work, ignore_errors=True)  # kept when a federation failed: its metrics say how
    wall = time.perf_counter() - started

    def row(setup: str, model: str, clients: int, s: dict, vs_baseline: str = "", vs_none: str = "") -> list[str]:
        up, down = s["bytes_up_per_client_round"], s["bytes_down_per_client_round"]
        times = [_show(s["round_s"]), _show(s["train_s"]), _show(s["overhead_s"])]
        return [setup, _model_name(model), str(clients), *times, _kb(up), _kb(down), vs_baseline, vs_none]

    rows = []
    base_up = summary[BASELINE]["bytes_up_per_client_round"]["median"]
    transport_figures = {}
    for name in TRANSPORT:
        s = summary[name]
        vs = s["bytes_up_per_client_round"]["median"] / base_up
        transport_figures[name] = {**s, **TRANSPORT[name], "up_bytes_vs_baseline": vs}
        rows.append(row(name, tp.model, tp.clients[0], s, vs_baseline=f"{vs:.2f}"))
    secagg_figures = {}
    for n in sp.clients:
        none, sa = summary[f"none @{n}"], summary[f"SecAgg+ @{n}"]
        ratios = {
            f"ratio_{key}": Spread(**sa[key]).ratio(Spread(**none[key]))
            for key in ("round_s", "overhead_s", "bytes_up_per_client_round", "bytes_down_per_client_round")
        }
        secagg_figures[str(n)] = {"none": none, "secagg": sa, **ratios}
        rows.append(row("FFA-LoRA fp32, no SecAgg+", sp.model, n, none))
        both = f"{ratios['ratio_round_s']:.2f} ({ratios['ratio_overhead_s']:.2f})"
        rows.append(row("FFA-LoRA fp32 + SecAgg+", sp.model, n, sa, vs_none=both))
    notes = [
        f"Times are median (min-max) over {tp.describe()} for transport and {sp.describe()} for SecAgg+: the "
        "rounds within a run are the repeats. Each simulation starts with a warm-up round that loads the model in "
        "every Ray actor (again after a change of adapter layout); it is not counted.",
        "Overhead = round wall time - the slowest client's local training time (memory decryption, adapter I/O, "
        "messaging, clipping, DP noise, SecAgg+ crypto, aggregation, checkpointing). Every sampled client has its "
        f"own Ray actor on {os.cpu_count()} cores, so concurrent clients also slow each other's training.",
        "Bytes are serialized message contents per client and round counted at the server's Grid (all SecAgg+ "
        "stages included); fp16 halves the update, FFA-LoRA sends only B, whose share of the adapter depends on "
        "the model's shapes.",
        f"Local work per round: {TRAINING['local-steps']} step(s), batch {TRAINING['batch-size']}, "
        f"{PAIRS_PER_USER} preference pairs per user; DP on (clipping and server noise); personal adapters off.",
    ]
    if quick:
        notes.append("Quick run: tiny test model and small client counts; a smoke test, not a measurement.")
    elif sp.model != "default":
        notes.append(
            "SecAgg+ rows use the tiny test model: 20 clients need 20 Ray actors each holding the model, which the "
            "default model does not fit here; both arms of each ratio use the same model and rounds."
        )
    settings = {
        "quick": quick,
        "transport": f"{_model_name(tp.model)}, {tp.clients[0]} clients, {tp.repeats} rounds per row",
        "SecAgg+": f"{_model_name(sp.model)}, {'/'.join(map(str, sp.clients))} clients, {sp.repeats} rounds per row",
    }
    figures = {
        "repeats": "rounds within each federation (after a warm-up round); median/min/max over them",
        "wall_s": round(wall, 1),
        "transport": {"model": tp.model, "clients": tp.clients[0], "rows": transport_figures},
        "secagg": {"model": sp.model, "by_clients": secagg_figures},
    }
    return BenchReport(
        name="federation",
        title="Federation: round overhead and bytes per client-round",
        machine=report_machine,
        settings=settings,
        columns=COLUMNS,
        rows=rows,
        figures=figures,
        notes=notes,
    )
