"""``fedpal bench scale``: what a population simulation costs at 100, 300 and 1000 users.

Each size is one ``fedpal population run`` of its preset (``p100``, ``p300``, ``p1000``:
the tiny model, DP and SecAgg+ on, one ``flwr run`` against a simulation SuperLink), run
through the population code itself (:func:`~fedpal.simulations.population.engine.run_population`
and :func:`~fedpal.simulations.population.study.run_results`). Per size it reports the
wall time of a round and the peak memory (summed RSS of the SuperLink and every process
it started, Ray's workers included: the runner's own sampler), then how both grow with
the population: time per sampled client, time and clients against the smallest size,
memory growth in %.

A size is a run of minutes, so sizes are not interleaved: the repeats are a run's rounds
after the first (median, min and max); round 1 is reported apart, as it includes each Ray
worker's start-up. The scoring of the final adapter that ends every population run is
not part of a round: the benchmark asks only a few users to score (the presets ask 100)
and reports its time in a column of its own, like the start-up before round 1 (SuperLink,
Ray, the roll call of every node). The one-minute load average before each size is kept.

``--quick``: the quick preset at 10 users, 2 rounds (a smoke test, ~40 s: one run, so no growth row;
:func:`growth` is the same arithmetic at any size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpal.simulations.benchmarks.core import BenchReport, Spread, benchmark, on_this_machine

if TYPE_CHECKING:
    from fedpal.simulations.population.settings import PopulationConfig

PRESETS = ("p100", "p300", "p1000")
"""The population presets measured, smallest first."""
ROUNDS = 5
"""Rounds per run: round 1 plus four repeats (the presets run 3; rounds do not change a round's work)."""
QUICK_USERS = (10,)
"""``--quick``: the quick preset at these sizes (its own 2 rounds and half the users per round); one size
keeps the smoke test to one ``flwr run`` (each costs ~25 s of start-up on 2 cores)."""
SCORED_USERS = 3
"""Users who score the final adapter at the end of each run (every population run scores; 2 is the least)."""

HELP = (
    "Population simulation (DP + SecAgg+) at 100, 300 and 1000 users: seconds per round, "
    "peak memory, and how both grow with the population."
)


def configs(quick: bool) -> list["PopulationConfig"]:
    """The runs, smallest first: the presets as they are, but for the rounds and the users who score."""
    from dataclasses import replace

    from fedpal.simulations.population.settings import PRESETS as POPULATION

    if quick:
        base = POPULATION["quick"]
        rate = base.clients_per_round / base.users
        return [
            replace(
                base,
                preset=f"quick-{users}",
                users=users,
                clients_per_round=max(3, round(rate * users)),
                eval_users=SCORED_USERS,
            )
            for users in QUICK_USERS
        ]
    return [replace(POPULATION[name], rounds=ROUNDS, eval_users=SCORED_USERS) for name in PRESETS]


def measure(config: "PopulationConfig", work, progress=None) -> dict[str, Any]:
    """One ``flwr run`` of ``config`` under ``work``: its rounds' seconds, peak memory and the rest."""
    import os

    from fedpal.common.errors import FedpalError
    from fedpal.simulations.population.engine import run_population
    from fedpal.simulations.population.study import run_results

    load = os.getloadavg()[0]
    run = run_population(config, work, progress)
    results = run_results(config, run)
    rounds = [m for m in run.metrics() if "stopped" not in m]
    failed = [m["round"] for m in rounds if not m.get("aggregated")]
    if failed or len(rounds) != config.rounds:
        raise FedpalError(
            f"the {config.users}-user run aggregated {len(rounds) - len(failed)} of {config.rounds} rounds "
            f"(not aggregated: {failed or 'none'}); a failed round is not a timing; see {work / 'flwr-run.log'}"
        )
    seconds = [float(s) for s in results["round_seconds"]]
    steady = Spread.of(seconds[1:] or seconds)
    return {
        "preset": config.preset,
        "users": config.users,
        "clients_per_round": config.clients_per_round,
        "rounds": len(seconds),
        "round_seconds": seconds,
        "first_round_s": seconds[0],
        "round_s": {"median": steady.median, "min": steady.min, "max": steady.max, "n": steady.n},
        "per_client_s": steady.median / config.clients_per_round,
        "peak_rss_mib": run.peak_memory_bytes / 2**20,
        "scoring_s": float(results["evaluation_seconds"]),
        "scored_users": results["score"]["users"],
        "wall_s": run.wall_seconds,
        "other_s": run.wall_seconds - sum(seconds) - float(results["evaluation_seconds"]),
        "load_before": round(load, 2),
        "epsilon": results["epsilon"],
    }


def growth(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """How a round's time and the peak memory grow from one size to a larger one."""
    return {
        "from_users": small["users"],
        "to_users": large["users"],
        "clients_x": large["clients_per_round"] / small["clients_per_round"],
        "time_x": large["round_s"]["median"] / small["round_s"]["median"],
        "per_client_x": large["per_client_s"] / small["per_client_s"],
        "memory_pct": 100.0 * (large["peak_rss_mib"] / small["peak_rss_mib"] - 1.0),
    }


def _row(size: dict[str, Any], first: dict[str, Any]) -> list[str]:
    spread = Spread(**size["round_s"])
    if size is first:
        versus, memory = "-", f"{size['peak_rss_mib']:.0f}"
    else:
        g = growth(first, size)
        versus = f"{g['clients_x']:.1f}x -> {g['time_x']:.1f}x"
        memory = f"{size['peak_rss_mib']:.0f} ({g['memory_pct']:+.1f}%)"
    return [
        str(size["users"]),
        str(size["clients_per_round"]),
        f"{size['first_round_s']:.1f}",
        spread.show(1),
        f"{size['per_client_s']:.3f}",
        versus,
        memory,
        f"{size['scoring_s']:.1f}",
        f"{size['other_s']:.1f}",
        f"{size['wall_s']:.0f}",
        f"{size['load_before']:.2f}",
    ]


def _note(g: dict[str, Any], sizes: dict[int, dict[str, Any]]) -> str:
    small, large = sizes[g["from_users"]], sizes[g["to_users"]]
    return (
        f"{g['from_users']} -> {g['to_users']} users: {g['clients_x']:.1f}x clients per round, "
        f"{g['time_x']:.2f}x time per round ({small['per_client_s']:.3f} -> {large['per_client_s']:.3f} s per "
        f"sampled client, {g['per_client_x']:.2f}x), peak memory {g['memory_pct']:+.1f}%"
    )


@benchmark("scale", help=HELP)
def scale(quick: bool) -> BenchReport:
    import shutil
    import tempfile
    from pathlib import Path

    from fedpal.simulations.cli import progress_bars

    runs = configs(quick)
    work = Path(tempfile.mkdtemp(prefix="fedpal-bench-scale-"))
    with on_this_machine() as machine, progress_bars() as progress:
        sizes = [measure(config, work / f"users-{config.users}", progress) for config in runs]
    shutil.rmtree(work, ignore_errors=True)  # kept (logs, homes) when a run failed: its error names it

    first = sizes[0]
    steps = [growth(a, b) for a, b in zip(sizes, sizes[1:])]
    if len(sizes) > 2:
        steps.append(growth(first, sizes[-1]))
    by_users = {s["users"]: s for s in sizes}
    base = runs[0]
    rounds = sizes[0]["rounds"]
    repeats = f"rounds 2-{rounds}" if rounds > 2 else "round 2"
    return BenchReport(
        name="scale",
        title="Population simulation against users: seconds per round and peak memory (DP + SecAgg+)",
        machine=machine(),
        settings={
            "quick": quick,
            "presets": ", ".join(c.preset for c in runs),
            "model": base.model,
            "rounds": base.rounds,
            "DP noise multiplier": base.noise(),
            "clipping": base.clipping_norm,
            "SecAgg+ neighbours": f"{base.secagg_shares:g}",
            "CPUs per client": base.node_cpus,
            "users scoring": SCORED_USERS,
        },
        columns=[
            "users",
            "clients per round",
            "round 1 (s)",
            f"{repeats} (s): median (min-max)",
            "s per sampled client",
            "vs smallest: clients -> time",
            "peak RSS MiB (vs smallest)",
            "scoring (s)",
            "start-up + stop (s)",
            "wall (s)",
            "load before",
        ],
        rows=[_row(size, first) for size in sizes],
        figures={"sizes": sizes, "growth": steps},
        notes=[
            *(_note(g, by_users) for g in steps),
            "each size is one `flwr run` of its population preset (one after the other, not interleaved); the "
            "repeats are its rounds after the first; round 1 includes each Ray worker's start-up",
            "peak RSS is summed over the SuperLink and every process it started (Ray's workers included): shared "
            "pages count once per process, the same measure at every size",
            f"scoring: {SCORED_USERS} users score the final adapter after the rounds (the presets ask 100), timed "
            "apart; start-up + stop is the rest of the wall time (SuperLink, Ray, the roll call of every node)",
        ],
    )
