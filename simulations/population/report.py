"""``report.md`` and PNG plots of a population study's ``results.json``.

Plots: the shared adapter's held-out gain over the base model (with its 95% interval)
against the number of users at a fixed epsilon, and against epsilon at a fixed
population; the cost of a round and the peak memory against the number of users.
matplotlib's object API only (no ``pyplot`` state), like the other reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedpal.simulations.population.study import over_noise

USERS_PNG = "dp_vs_users.png"
EPSILON_PNG = "epsilon_vs_utility.png"
SCALING_PNG = "scaling.png"


def write_study_report(results: Mapping[str, Any], out: Path) -> list[Path]:
    """Write ``report.md`` and the three plots into ``out``; returns the files written."""
    plan, runs = results["plan"], results["runs"]
    sizes = [runs[_per_size(plan, "sizes", n)[0]] for n in plan["sizes"]]
    budgets = [runs[name] for name in plan["run_names"]["budgets"]]
    twins = [runs[_per_size(plan, "twins", n)[0]] for n in plan["sizes"]] if plan["control"] else []
    _plot_gain(
        out / USERS_PNG,
        [r["users"] for r in sizes],
        sizes,
        "simulated users (log)",
        f"shared adapter vs base at epsilon {plan['epsilon']:g}",
        log_x=True,
        twins=twins,
    )
    dp = [(e, r) for e, r in zip(plan["epsilons"], budgets) if e > 0]
    _plot_gain(
        out / EPSILON_PNG,
        [e for e, _ in dp],
        [r for _, r in dp],
        "epsilon (delta 1e-5)",
        f"shared adapter vs base, {plan['sweep_users']} users",
        log_x=True,
        no_dp=next((r for e, r in zip(plan["epsilons"], budgets) if e == 0), None),
    )
    _plot_scaling(out / SCALING_PNG, sizes)
    (out / "report.md").write_text(_markdown(results, sizes, budgets))
    return [out / "report.md", out / USERS_PNG, out / EPSILON_PNG, out / SCALING_PNG]


def _per_size(plan: Mapping[str, Any], part: str, users: int) -> list[str]:
    """The names of the runs (one per seed) of ``part`` ("sizes" or "twins") at ``users``; JSON
    keeps the sizes as strings."""
    names = plan["run_names"][part]
    return names[users] if users in names else names[str(users)]


def _gain(run: Mapping[str, Any]) -> str:
    s = run["score"]
    low, high = s["gain_ci95"]
    return f"{s['gain']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _eps(run: Mapping[str, Any]) -> str:
    return "no DP" if run["epsilon"] is None else f"{run['epsilon']:.2f}"


def _markdown(results: Mapping[str, Any], sizes: list[Mapping[str, Any]], budgets: list[Mapping[str, Any]]) -> str:
    plan, runs = results["plan"], results["runs"]
    base = plan["base"]
    first = results["first_size_beating_base"]
    lines = [
        "# fedpal population study",
        "",
        f"Model {base['model']}, {base['rounds']} rounds, {plan['sampling_rate']:.0%} of the users sampled per round, "
        f"clipping norm {base['clipping_norm']}, delta {base['delta']}, SecAgg+ {'on' if base['secagg'] else 'off'}; "
        f"seed {base['seed']}. Every run is one `flwr run` of the population app on a simulation SuperLink.",
        "",
        "**Score.** Held-out preference accuracy: each scored user labels the candidates of "
        f"{base['heldout_prompts']} held-out prompts (never stored, never trained on) and the node counts the pairs "
        "the base model and the final shared adapter rank that user's way. Generating and judging replies for "
        "hundreds of users is out of reach of two cores, so pair ranking stands in for reply utility. Gain = mean "
        "over users of (shared - base), with a normal 95% interval over the scored users (one seed: the interval "
        "covers which users were scored, not the training's own randomness).",
        "",
        f"## Where DP stops hurting: users at epsilon {plan['epsilon']:g}",
        "",
        "| users | seed | clients/round | noise multiplier | noise std on the mean | epsilon | base | shared | "
        "gain [95% CI] "
        "| noise-only gain [95% CI] | gain over noise [95% CI] | learned |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sizes:
        seeds = zip(
            _per_size(plan, "sizes", r["users"]),
            _per_size(plan, "twins", r["users"])
            if plan["control"]
            else [None] * len(_per_size(plan, "sizes", r["users"])),
        )
        for name, twin in seeds:
            run = runs[name]
            control = runs[twin] if twin else None
            over = over_noise(run, control) if control else None
            learned = run["score"]["beats_base"] and (over is None or over[0] > 0)
            lines.append(
                f"| {run['users']} | {run['config']['seed']} | {run['clients_per_round']} | "
                f"{run['noise_multiplier']:.3f} | "
                f"{run['noise_stddev_on_mean'] or 0:.4f} | {_eps(run)} | {run['score']['base_accuracy']:.3f} | "
                f"{run['score']['shared_accuracy']:.3f} | {_gain(run)} | {_gain(control) if control else '-'} | "
                f"{f'{over[0]:+.3f} .. {over[1]:+.3f}' if over else '-'} | {'yes' if learned else 'no'} |"
            )
    lines += [
        "",
        (
            "Noise-only twins: each size again with learning switched off (learning rate 1e-12), so the "
            "global adapter is the DP noise alone. *Learned* means the gain's interval is above zero and "
            "above the twin's (unpaired: different users were scored). A size counts as learned when every seed run "
            "at it learned (the seed also draws the DP noise)."
        )
        if plan["control"]
        else "",
        "",
        (
            f"The shared adapter first beats the base model beyond its 95% interval (and its noise-only twin), "
            "with every seed, "
            f"at **{first} users**."
            if first
            else "The shared adapter does not beat the base model beyond its 95% interval at any size run."
        ),
        "",
    ]
    lines += [
        f"![gain vs users]({USERS_PNG})",
        "",
        f"## Epsilon against utility, {plan['sweep_users']} users",
        "",
        "| epsilon | noise multiplier | gain [95% CI] | beats base |",
        "|---|---|---|---|",
    ]
    for r in budgets:
        lines.append(
            f"| {_eps(r)} | {r['noise_multiplier']:.3f} | {_gain(r)} | {'yes' if r['score']['beats_base'] else 'no'} |"
        )
    lines += [
        "",
        f"![gain vs epsilon]({EPSILON_PNG})",
        "",
        f"## Shared adapter size, {plan['sweep_users']} users, epsilon {plan['epsilon']:g}",
        "",
        "| adapter | numbers sent | gain [95% CI] | beats base |",
        "|---|---|---|---|",
    ]
    adapters = plan["run_names"]["adapters"]
    for name, key in adapters.items():
        r = runs[key]
        lines.append(
            f"| {name} | {r['adapter_numbers']} | {_gain(r)} | {'yes' if r['score']['beats_base'] else 'no'} |"
        )
    best = max(adapters, key=lambda name: runs[adapters[name]]["score"]["gain"])
    lines += [
        "",
        f"Best gain: {best}.",
        "",
        "## Cost against users",
        "",
        "| users | clients/round | median round (s) | scoring (s) | wall (s) | peak memory (MiB, summed RSS) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sizes:
        lines.append(
            f"| {r['users']} | {r['clients_per_round']} | {r['median_round_seconds']:.1f} | "
            f"{r['evaluation_seconds']:.1f} | {r['wall_seconds']:.0f} | {r['peak_memory_mb']:.0f} |"
        )
    lines += ["", f"![cost vs users]({SCALING_PNG})", ""]
    return "\n".join(lines)


def _plot_gain(
    path: Path,
    xs: list[float],
    runs: list[Mapping[str, Any]],
    xlabel: str,
    title: str,
    log_x: bool,
    no_dp: Mapping[str, Any] | None = None,
    twins: list[Mapping[str, Any]] = (),
) -> None:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    gains = [r["score"]["gain"] for r in runs]
    lows = [r["score"]["gain"] - r["score"]["gain_ci95"][0] for r in runs]
    highs = [r["score"]["gain_ci95"][1] - r["score"]["gain"] for r in runs]
    axes.errorbar(xs, gains, yerr=[lows, highs], marker="o", capsize=4, label="shared adapter - base (95% CI)")
    if twins:
        axes.errorbar(
            [r["users"] for r in twins],
            [r["score"]["gain"] for r in twins],
            yerr=[
                [r["score"]["gain"] - r["score"]["gain_ci95"][0] for r in twins],
                [r["score"]["gain_ci95"][1] - r["score"]["gain"] for r in twins],
            ],
            marker="x",
            capsize=3,
            linestyle=":",
            color="tab:grey",
            label="DP noise alone (no learning)",
        )
    if no_dp is not None:
        axes.axhline(no_dp["score"]["gain"], color="tab:green", linestyle="--", label="no DP")
    axes.axhline(0.0, color="grey", linewidth=0.8)
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("held-out preference accuracy gain")
    axes.set_title(title)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _plot_scaling(path: Path, runs: list[Mapping[str, Any]]) -> None:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    users = [r["users"] for r in runs]
    axes.plot(users, [r["median_round_seconds"] for r in runs], marker="o", label="median round (s)")
    axes.set_xlabel("simulated users")
    axes.set_ylabel("seconds per round")
    other = axes.twinx()
    other.plot(users, [r["peak_memory_mb"] for r in runs], marker="s", color="tab:red", label="peak memory (MiB)")
    other.set_ylabel("peak memory (MiB, summed RSS)")
    other.set_ylim(bottom=0)
    axes.set_ylim(bottom=0)
    handles = axes.get_lines() + other.get_lines()
    axes.legend(handles, [h.get_label() for h in handles], loc="center left", fontsize="small")
    axes.set_title("cost of a round against the population (2 cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
