"""``report.md`` and PNG plots of a privacy audit's ``results.json``.

Plots: ROC curves of membership inference on log axes (the low false-positive corner is
where a privacy attack matters), and epsilon against utility and against MIA AUC. Like
the simulation report, matplotlib's object API only (no ``pyplot`` state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

ROC_PNG = "roc.png"
BUDGET_PNG = "epsilon_vs_utility.png"


def write_report(results: Mapping[str, Any], out: Path | str) -> list[Path]:
    """Write ``report.md`` and the plots into ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plot_roc(results, out / ROC_PNG)
    _plot_budget(results, out / BUDGET_PNG)
    (out / "report.md").write_text(_markdown(results))
    return [out / "report.md", out / ROC_PNG, out / BUDGET_PNG]


def _eps(value: float | None) -> str:
    return "∞ (no DP)" if value is None else f"{value:.2f}"


def _share(value: float, n: int) -> str:
    """An accuracy with its binomial standard error (few held-out pairs: differences under 2 SE are noise)."""
    return f"{value:.3f} ± {math.sqrt(max(value * (1 - value), 0.0) / max(n, 1)):.3f}"


def _markdown(results: Mapping[str, Any]) -> str:
    c = results["config"]
    details = results["details"]
    lines = [
        f"# fedpal privacy audit: preset {results['preset']}",
        "",
        f"Model {results['model']}, {c['users']} users, {c['rounds']} rounds, seed {results['seed']}; "
        f"{results['members']} member and {results['nonmembers']} non-member texts; delta {results['delta']}; "
        f"DP settings use noise multiplier {c['noise_multiplier']} and clipping norm {c['clipping_norm']}; "
        f"{results['wall_time_s']} s.",
        "",
        "## Attacks per protection setting",
        "",
        "| setting | accountant epsilon | audited epsilon (lower bound) | MIA global AUC / TPR@1% | "
        "MIA personal AUC / TPR@1% | canary exposure global / personal (bits) | inversion recall / precision "
        "(chance) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in results["settings"]:
        r = details[name]
        g, p = results["mia"][name], results["mia_personal"][name]
        exposure = r["exposure"]
        personal = sum(e["bits"] for e in exposure["personal"]) / max(len(exposure["personal"]), 1)
        inv = r["inversion"]
        lines.append(
            f"| {name} | {_eps(results['epsilon'][name])} | {results['audited_epsilon'][name]:.2f} | "
            f"{g['auc']:.3f} / {g['tpr_at_1pct_fpr']:.2f} ({g['attack']}) | "
            f"{p['auc']:.3f} / {p['tpr_at_1pct_fpr']:.2f} ({p['attack']}) | "
            f"{results['canary_exposure'][name]:.1f} / {personal:.1f} | "
            f"{inv['token_recall']:.2f} / {inv['token_precision']:.2f} ({inv['chance_precision']:.3f}) |"
        )
    control = [e["bits"] for name in results["settings"] for e in details[name]["exposure"]["control_global"]]
    first = details[results["settings"][0]]
    lines += [
        "",
        "- Membership inference: members are the replies each user stored and trained on, non-members replies "
        "of the same kind on prompts they never stored. TPR at 0.1% FPR with fewer than 1000 non-members is the "
        "TPR at zero false positives. The personal adapter never leaves the device: its row is an attack on a "
        "stolen adapter file, which no federation setting changes.",
        f"- Canary exposure: secrets ({c['secrets']}) stored {c['secret_repeats']} times each in user 0's memory, "
        f"ranked against {c['exposure_candidates']} other secrets (at most "
        f"{math.log2(c['exposure_candidates'] + 1):.1f} bits measurable); never-planted secrets (the control) read "
        f"{min(control):.1f}-{max(control):.1f} bits."
        if control
        else "",
        f"- Inversion: {first['inversion']['attacked']} without SecAgg+; the secure aggregate with it. Recovered "
        f'text ({results["settings"][0]}): "{first["inversion"]["recovered_text"][:200]}"',
        f"- Audited epsilon: {c['canary_clients']} candidate canary clients, each joined with probability 1/2; "
        f"Steinke, Nasr & Jagielski (2023) lower bound at {c['confidence']:.0%} confidence from the final global "
        f"adapter. One-shot estimates (Andrew et al. 2024; an estimate, not a bound, and with fewer than ~1000 "
        f"canaries its two fitted variances make it swing widely): "
        + ", ".join(f"{name} {details[name]['audit']['one_shot_epsilon']:.2f}" for name in results["settings"])
        + ".",
        f"- Plaintext leaks in client messages and home files: {results['plaintext_leaks']} "
        f"(each scan first found a planted control).",
        "",
        "## Budget vs utility (DP only, no canary clients)",
        "",
        "Utility is held-out preference accuracy: the share of each user's never-stored pairs whose chosen reply "
        "the adapters raise above the rejected one, relative to the base model (0.5 is chance), ± its standard error.",
        "",
        "| noise multiplier | epsilon | shared adapter accuracy | fedpal (shared + personal) accuracy | "
        "MIA global AUC / TPR@1% |",
        "|---|---|---|---|---|",
    ]
    for row in results["budget_vs_utility"]:
        lines.append(
            f"| {row['noise_multiplier']:g} | {_eps(row['epsilon'])} | "
            f"{_share(row['shared_accuracy'], row['pairs'])} | "
            f"{_share(row['fedpal_accuracy'], row['pairs'])} | {row['mia_auc']:.3f} / "
            f"{row['mia_tpr_at_1pct_fpr']:.2f} |"
        )
    lines += ["", f"![ROC curves]({ROC_PNG})", "", f"![epsilon vs utility]({BUDGET_PNG})", ""]
    return "\n".join(line for line in lines if line is not None)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=110)


def _plot_roc(results: Mapping[str, Any], path: Path) -> None:
    fig = Figure(figsize=(10, 4.5))
    for axis, (adapter, key) in zip(
        fig.subplots(1, 2), (("global shared adapter", "mia_global"), ("personal adapters", "mia_personal"))
    ):
        for name in results["settings"]:
            attack = results["mia" if key == "mia_global" else "mia_personal"][name]["attack"]
            curve = results["details"][name][key][attack]
            fpr = [max(x, 1e-3) for x in curve["fpr"]]
            tpr = [max(y, 1e-3) for y in curve["tpr"]]
            axis.plot(fpr, tpr, label=f"{name} ({attack}, AUC {curve['auc']:.2f})")
        axis.plot([1e-3, 1], [1e-3, 1], color="grey", linestyle=":", label="chance")
        axis.set(
            xscale="log",
            yscale="log",
            xlim=(1e-3, 1),
            ylim=(1e-3, 1.05),
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"Membership inference: {adapter}",
        )
        axis.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _plot_budget(results: Mapping[str, Any], path: Path) -> None:
    rows = results["budget_vs_utility"]
    fig = Figure(figsize=(14, 4.5))
    left, middle, right = fig.subplots(1, 3)
    dp = [r for r in rows if r["epsilon"] is not None]
    plain = [r for r in rows if r["epsilon"] is None]
    for key, label in (("shared_accuracy", "shared adapter"), ("fedpal_accuracy", "fedpal (shared + personal)")):
        line = left.plot([r["epsilon"] for r in dp], [r[key] for r in dp], marker="o", label=label)
        for r in plain:
            left.axhline(r[key], color=line[0].get_color(), linestyle="--", label=f"{label}, no DP")
    left.axhline(0.5, color="grey", linestyle=":", label="chance")
    left.set(
        xscale="log",
        xlabel=f"epsilon (delta {results['delta']})",
        ylabel="held-out preference accuracy",
        title="Privacy budget vs utility",
    )
    left.legend(fontsize=7)
    middle.plot([r["epsilon"] for r in dp], [r["mia_auc"] for r in dp], marker="o", label="DP runs")
    for r in plain:
        middle.axhline(r["mia_auc"], linestyle="--", label="no DP")
    middle.axhline(0.5, color="grey", linestyle=":", label="chance")
    middle.set(xscale="log", xlabel="epsilon", ylabel="AUC", title="Membership inference on the global adapter")
    middle.legend(fontsize=7)
    settings = [n for n in results["settings"] if results["epsilon"][n] is not None]
    accountant = [results["epsilon"][n] for n in settings]
    right.scatter(accountant, [results["audited_epsilon"][n] for n in settings], marker="x", color="black")
    for name, x in zip(settings, accountant):
        right.annotate(name, (x, results["audited_epsilon"][name]), fontsize=7)
    for name in results["settings"]:
        if results["epsilon"][name] is None:
            right.axhline(
                results["audited_epsilon"][name], color="tab:red", linestyle="--", label=f"audited, {name} (no DP)"
            )
    top = max(accountant, default=1.0)
    right.plot([0, top], [0, top], color="grey", linestyle=":", label="audited = accountant")
    right.set(xlabel="accountant epsilon", ylabel="audited epsilon (lower bound)", title="One-run audit")
    right.legend(fontsize=7)
    for axis in (left, middle):
        axis.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    _save(fig, path)
