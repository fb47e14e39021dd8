"""``report.md`` and PNG plots from a simulation's ``results.json`` dictionary.

Required keys (:data:`REQUIRED_KEYS`)::

    preset                        str    quick | default | large | custom
    model                         str    base model name or path
    users                         int    number of simulated users
    rounds                        int    federated rounds run
    epsilon                       float | None   final epsilon; None when DP is off
    delta                         float | None   the fixed delta of the accountant
    noise_multiplier              float  server noise std / clipping norm (0 when off)
    clients_per_round             int
    bytes_per_client_round        int    bytes one client uploads in one round
    baselines                     {name: {"mean_utility", "win_rate_vs_base",
                                          "worst_user_utility"}}   floats in [0, 1];
                                  optional per baseline: "win_rate_ci" [lo, hi],
                                  "win_rate_se", "mean_utility_ci" [lo, hi] (bootstrap)
    cross_user_diagonal_best_fraction  float
    curves                        {"rounds": CURVE, "pairs": CURVE}, either may be absent
                                  CURVE = {"x": [numbers], "series": {name: [mean utility]}}
                                  "rounds": held-out mean utility after each round;
                                  "pairs": after local training on that many pairs
    cross_user_matrix             [[float]]  M[i][j] = user i's utility of user j's adapters
    epsilon_per_round             [float | None]  cumulative epsilon after each round

Optional keys read when present: ``seed`` (int); ``base_baseline`` (name of the base
method, default ``"base"``); ``ablations`` ([str], methods that are parts of fedpal, not
baselines to beat); per baseline ``minority_utility`` (float or None);
``user_ids`` ([str], heat-map labels, default ``user-0``...); ``minority_users`` ([str],
ids marked with ``*``); ``wall_time_s`` (float); ``notes`` ([str], lines appended to the
report, e.g. what limits the results); ``headroom`` (from
``fedpal.simulations.evaluation.candidate_headroom``: what the candidates allow).

Plots use matplotlib's object API (``Figure``, Agg canvas), never ``pyplot``, so writing a
report changes no global state and works in threads and headless machines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

REQUIRED_KEYS: tuple[str, ...] = (
    "preset",
    "model",
    "users",
    "rounds",
    "epsilon",
    "delta",
    "noise_multiplier",
    "clients_per_round",
    "bytes_per_client_round",
    "baselines",
    "cross_user_diagonal_best_fraction",
    "curves",
    "cross_user_matrix",
    "epsilon_per_round",
)
BASELINE_KEYS: tuple[str, ...] = ("mean_utility", "win_rate_vs_base", "worst_user_utility")
FEDPAL_BASELINE = "fedpal"
WIN_RATE_TARGET = 0.8
"""The bar for fedpal in the default preset (the personalization issue's); the report says
whether it was met."""


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` put its outputs."""

    report: Path
    learning_curves: Path
    win_rates: Path
    cross_user_heatmap: Path
    epsilon: Path

    def pngs(self) -> list[Path]:
        return [self.learning_curves, self.win_rates, self.cross_user_heatmap, self.epsilon]


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming every missing or malformed part of ``results``."""
    problems = [f"missing key {k!r}" for k in REQUIRED_KEYS if k not in results]
    for name, entry in results.get("baselines", {}).items():
        problems += [f"baseline {name!r} lacks {k!r}" for k in BASELINE_KEYS if k not in entry]
    matrix = results.get("cross_user_matrix")
    if matrix is not None and len(matrix) and any(len(row) != len(matrix) for row in matrix):
        problems.append("cross_user_matrix is not square")
    for kind, curve in results.get("curves", {}).items():
        xs = curve.get("x", [])
        for series, ys in curve.get("series", {}).items():
            if len(ys) != len(xs):
                problems.append(f"curve {kind}/{series} has {len(ys)} points for {len(xs)} x")
    if problems:
        raise ValueError("invalid simulation results: " + "; ".join(problems))


def write_report(results: Mapping[str, Any], out_dir: Path | str) -> ReportFiles:
    """Write ``report.md`` and four PNGs into ``out_dir`` (created if needed).

    Every plot is always written, with a short message in place of data it lacks, so
    the report's image links never break.
    """
    validate_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        report=out / "report.md",
        learning_curves=out / "learning_curves.png",
        win_rates=out / "win_rates.png",
        cross_user_heatmap=out / "cross_user_heatmap.png",
        epsilon=out / "epsilon.png",
    )
    _plot_learning_curves(results["curves"], files.learning_curves)
    _plot_win_rates(results["baselines"], files.win_rates)
    _plot_cross_user(results, files.cross_user_heatmap)
    _plot_epsilon(results["epsilon_per_round"], results.get("delta"), files.epsilon)
    files.report.write_text(_markdown(results, files), encoding="utf-8")
    return files


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _privacy_line(results: Mapping[str, Any]) -> str:
    eps = results["epsilon"]
    if eps is None or not math.isfinite(eps):
        return "Privacy: differential privacy **off** (no formal guarantee)."
    delta = "—" if results["delta"] is None else f"{results['delta']:.0e}"
    return (
        f"Privacy: user-level (ε = {eps:.2f}, δ = {delta}) after "
        f"{results['rounds']} rounds, noise multiplier {results['noise_multiplier']:.2f}."
    )


def _verdict(baselines: Mapping[str, Mapping[str, float]], ablations=(), base: str = "base") -> list[str]:
    """Plain statements of whether fedpal met the bar, from the numbers alone."""
    if FEDPAL_BASELINE not in baselines:
        return []
    ours = baselines[FEDPAL_BASELINE]
    others = {n: b for n, b in baselines.items() if n != FEDPAL_BASELINE and n not in ablations}
    met = ours["win_rate_vs_base"] >= WIN_RATE_TARGET
    lines = [
        f"- fedpal win rate vs base: {_pct(ours['win_rate_vs_base'])} "
        f"(target ≥ {_pct(WIN_RATE_TARGET)}): **{'met' if met else 'not met'}**."
    ]
    if others:
        for key, label in (("win_rate_vs_base", "win rate"), ("mean_utility", "mean utility")):
            lost = sorted(n for n, b in others.items() if ours[key] <= b[key])
            lines.append(
                f"- fedpal's {label} is above every other baseline."
                if not lost
                else f"- fedpal's {label} is not above: {', '.join(lost)}."
            )
        rivals = {n: b for n, b in others.items() if n != base and b.get("win_rate_ci")}
        if ours.get("win_rate_ci") and rivals:
            best = max(rivals, key=lambda n: rivals[n]["win_rate_vs_base"])
            apart = ours["win_rate_ci"][0] > rivals[best]["win_rate_ci"][1]
            lines.append(
                f"- 95% intervals of the win rate: fedpal {_interval(ours['win_rate_ci'])}, best other baseline "
                f"({best}) {_interval(rivals[best]['win_rate_ci'])}: **{'apart' if apart else 'overlapping'}**."
            )
    if ours.get("minority_utility") is not None and baselines.get(base, {}).get("minority_utility") is not None:
        below = ours["minority_utility"] < baselines[base]["minority_utility"]
        lines.append(
            f"- minority users: fedpal {_fmt(ours['minority_utility'])} vs base "
            f"{_fmt(baselines[base]['minority_utility'])}"
            f" mean utility: **{'below' if below else 'not below'} base**."
        )
    return lines


def _interval(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _headroom(headroom: Mapping[str, Any] | None) -> list[str]:
    """How far the candidates themselves let a user's replies improve on the base model."""
    if not headroom:
        return []
    return [
        "",
        f"What the candidates allow (on the {headroom['prompts']} training prompts, vs the base model's plain reply): "
        f"every reply in the user's best style wins {_pct(headroom['best_style_win_rate_vs_base'])} "
        f"(mean utility {_fmt(headroom['best_style_mean_utility'])}); the best candidate per prompt wins "
        f"{_pct(headroom['best_candidate_win_rate_vs_base'])} ({_fmt(headroom['best_candidate_mean_utility'])}).",
    ]


def _markdown(results: Mapping[str, Any], files: ReportFiles) -> str:
    baselines = results["baselines"]
    minority = results.get("minority_users") or []
    head = [
        f"# fedpal simulation report — preset `{results['preset']}`",
        "",
        f"Model `{results['model']}`, {results['users']} users"
        + (f" ({len(minority)} in the minority group)" if minority else "")
        + f", {results['rounds']} rounds, {results['clients_per_round']} clients per round"
        + (f", seed {results['seed']}" if "seed" in results else "")
        + ".",
        "",
        _privacy_line(results),
        f"Upload: {results['bytes_per_client_round'] / 1024:.1f} KiB per client per round.",
    ]
    if "wall_time_s" in results:
        head.append(f"Wall time: {results['wall_time_s']:.0f} s.")
    table = [
        "",
        "## Baselines (held-out prompts)",
        "",
        "| method | mean utility | win rate vs base (95% interval) | worst user | minority |",
        "|---|---|---|---|---|",
    ]
    for name, b in baselines.items():
        ci = f" {_interval(b['win_rate_ci'])}" if b.get("win_rate_ci") else ""
        table.append(
            f"| {name} | {_fmt(b['mean_utility'])} | {_pct(b['win_rate_vs_base'])}{ci} | "
            f"{_fmt(b['worst_user_utility'])} | {_fmt(b.get('minority_utility'))} |"
        )
    if baselines:
        best = max(baselines, key=lambda n: baselines[n]["mean_utility"])
        table += ["", f"Highest mean utility: **{best}**."]
    table += _verdict(baselines, results.get("ablations") or (), results.get("base_baseline", "base"))
    table += _headroom(results.get("headroom"))
    n_users = len(results["cross_user_matrix"])
    fraction = results["cross_user_diagonal_best_fraction"]
    body = [
        "",
        f"![win rates]({files.win_rates.name})",
        "",
        "## Personalization",
        "",
        f"Own adapters serve their user best for {_pct(fraction)}"
        + (f" of {n_users} users" if n_users else "")
        + " (cross-user matrix: row = user scoring, column = whose adapters wrote the replies).",
        "",
        f"![cross-user utility]({files.cross_user_heatmap.name})",
        "",
        "## Learning curves",
        "",
        f"![learning curves]({files.learning_curves.name})",
        "",
        "## Privacy budget",
        "",
        f"![epsilon per round]({files.epsilon.name})",
    ]
    notes = results.get("notes") or []
    tail = (["", "## Notes", ""] + [f"- {n}" for n in notes]) if notes else []
    return "\n".join(head + table + body + tail) + "\n"


def _message(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=110)


def _plot_learning_curves(curves: Mapping[str, Any], path: Path) -> None:
    titles = {
        "rounds": ("federated round", "after each round"),
        "pairs": ("preference pairs per user", "by amount of feedback"),
    }
    present = [k for k in ("rounds", "pairs") if curves.get(k, {}).get("series")]
    fig = Figure(figsize=(5.5 * max(1, len(present)), 4), layout="constrained")
    if not present:
        _message(fig, "no learning curves recorded")
    for i, kind in enumerate(present, start=1):
        ax = fig.add_subplot(1, len(present), i)
        curve = curves[kind]
        for name, ys in curve["series"].items():
            ax.plot(curve["x"], ys, marker="o", label=name)
        xlabel, when = titles[kind]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean held-out utility")
        ax.set_title(f"Utility {when}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _plot_win_rates(baselines: Mapping[str, Mapping[str, float]], path: Path) -> None:
    fig = Figure(figsize=(6, 4), layout="constrained")
    if not baselines:
        _message(fig, "no baselines evaluated")
        _save(fig, path)
        return
    ax = fig.add_subplot()
    names = list(baselines)
    rates = [baselines[n]["win_rate_vs_base"] for n in names]
    colors = ["tab:orange" if n == FEDPAL_BASELINE else "tab:blue" for n in names]
    bars = ax.bar(names, rates, color=colors)
    ax.bar_label(bars, labels=[_pct(r) for r in rates], fontsize=8)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="tie with base")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("win rate vs base (held-out)")
    ax.set_title("Win rate against the base model")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _plot_cross_user(results: Mapping[str, Any], path: Path) -> None:
    matrix = np.asarray(results["cross_user_matrix"], dtype=np.float64)
    fig = Figure(figsize=(6, 5), layout="constrained")
    if matrix.size == 0:
        _message(fig, "no cross-user evaluation")
        _save(fig, path)
        return
    n = len(matrix)
    ids = list(results.get("user_ids") or [f"user-{i}" for i in range(n)])
    minority = set(results.get("minority_users") or [])
    labels = [f"{u}*" if u in minority else u for u in ids]
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis")
    fig.colorbar(image, ax=ax, label="utility")
    for i in range(n):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", lw=1.5))
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("replies from this user's adapters")
    ax.set_ylabel("utility for this user")
    ax.set_title("Cross-user utility (diagonal outlined" + (", * minority)" if minority else ")"))
    _save(fig, path)


def _plot_epsilon(epsilons: list[float | None], delta: float | None, path: Path) -> None:
    fig = Figure(figsize=(6, 4), layout="constrained")
    points = [(r, e) for r, e in enumerate(epsilons, start=1) if e is not None and math.isfinite(e)]
    if not points:
        _message(fig, "differential privacy off: no epsilon to plot")
        _save(fig, path)
        return
    ax = fig.add_subplot()
    rounds, values = zip(*points)
    ax.plot(rounds, values, marker="o")
    ax.set_xlabel("federated round")
    ax.set_ylabel("cumulative ε")
    ax.set_title("Privacy budget" + (f" at δ = {delta:.0e}" if delta else ""))
    ax.grid(alpha=0.3)
    _save(fig, path)
