"""The style suite: does `fedpal train` at its defaults make the model write the way each user wants?

``python -m fedpal.simulations.benchmarks.style [--model default] [--out DIR]``:

1. the base model answers training prompts plainly (greedy, through ONNX Runtime); for
   each single-preference user of :mod:`fedpal.simulations.stylesuite` (bullets, concise,
   warm, question, example, summary) the plain reply is rejected and the same reply
   edited toward the preference is chosen: ~40 pairs per user, in an encrypted memory;
2. ``fedpal train --home H --json`` runs as a user would run it: no options but the home
   and the model, so every training setting is the default (held-out early stopping,
   objective, guard);
3. on unseen prompts, ``fedpal generate``'s own path (``PersonalizedGenerator.generate_for``
   in its default mode) answers as the base model and as the personalized model; the
   suite reports how often each shows the preference, and the fluency of both
   (repeated 3-grams, distinct bigrams: the degeneration guard's measures).

Writes ``style.json``, ``style.md`` and ``style.png`` into ``--out``; ``--json`` prints the
figures. ``--quick`` runs the tiny model on few prompts (a pipeline check for CI).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fedpal.client.onnx_export import DEFAULT_PRECISION, PRECISIONS

PASSPHRASE = "fedpal style suite"


def _replies(generator, prompts, options, home=None, mode="base", progress=None) -> list[str]:
    out = []
    for prompt in prompts:
        if home is None:
            out.append(generator.generate(prompt, options=options).text)
        else:
            out.append(generator.generate_for(home, prompt, mode=mode, passphrase=PASSPHRASE, options=options).text)
        if progress:
            progress()
    return out


def _fluency(replies: list[str]) -> dict[str, float]:
    """Repeated 3-grams and distinct bigrams in the guard's units (words and punctuation), so a
    list that collapses into "- **-" lines reads as the repetition it is; ``collapsed``: the
    share of replies more than half repeats."""
    from fedpal.client.guard import distinct, repetition

    n = max(len(replies), 1)
    return {
        "repetition": sum(map(repetition, replies)) / n,
        "distinct2": sum(map(distinct, replies)) / n,
        "collapsed": sum(repetition(reply) > 0.5 for reply in replies) / n,
    }


def _train(home: Path, model: str) -> tuple[dict, float]:
    """``fedpal train`` at its defaults, in its own process as a user runs it."""
    env = {**os.environ, "FEDPAL_PASSPHRASE": PASSPHRASE}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fedpal.common.cli", "train", "--home", str(home), "--model", model, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"fedpal train failed for {home}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def run(args: argparse.Namespace) -> dict:
    from rich.progress import Progress

    from fedpal.client.generator import DEFAULT_MODE, DecodeOptions, PersonalizedGenerator
    from fedpal.client.home import ClientHome
    from fedpal.client.memory import PreferenceMemory
    from fedpal.client.onnx_export import export_model
    from fedpal.simulations.prompts import sample_prompts
    from fedpal.simulations.stylesuite import STYLE_USERS, STYLE_USERS_BY_NAME

    users = STYLE_USERS if args.users == "all" else [STYLE_USERS_BY_NAME[n] for n in args.users.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = list(dict.fromkeys([DEFAULT_MODE] + [m for m in (args.modes or "").split(",") if m]))
    started = time.perf_counter()
    generator = PersonalizedGenerator(export_model(args.model, args.precision))
    pair_options = DecodeOptions(max_new_tokens=args.pair_tokens)
    options = DecodeOptions(max_new_tokens=args.max_new_tokens)
    train_prompts = sample_prompts("train", args.candidates, args.seed)
    heldout = sample_prompts("heldout", args.eval_prompts, args.seed)
    extras_needed = {u.extra_request for u in users if u.extra_request}
    report: dict = {"model": args.model, "precision": args.precision, "mode": DEFAULT_MODE, "users": {}}
    with Progress(transient=True, disable=args.json) as bars:
        task = bars.add_task("base replies", total=len(train_prompts) * (1 + len(extras_needed)) + len(heldout))
        step = lambda: bars.advance(task)  # noqa: E731
        plain = _replies(generator, train_prompts, pair_options, progress=step)
        if args.template_replies:  # the random tiny model writes no text: template replies stand in
            from fedpal.simulations.styles import synthetic_reply

            plain = [
                synthetic_reply(p, "plain", np.random.default_rng([args.seed, i])) for i, p in enumerate(train_prompts)
            ]
        extras = {
            request: _replies(generator, [f"{p}\n\n{request}" for p in train_prompts], pair_options, progress=step)
            for request in extras_needed
        }
        base_replies = _replies(generator, heldout, options, progress=step)
        for user in users:
            rng = random.Random(f"{args.seed}:{user.name}")
            extra = extras.get(user.extra_request, [""] * len(train_prompts))
            pairs = []
            for prompt, reply, more in zip(train_prompts, plain, extra):
                chosen = user.edit(prompt, reply, more, rng)
                if reply.strip() and chosen != reply and user.shows(chosen) and not user.shows(reply):
                    pairs.append((prompt, chosen, reply))
            pairs = pairs[: args.pairs]
            home = ClientHome.at(out / "homes" / user.name)
            with PreferenceMemory.open(home.root, passphrase=PASSPHRASE) as memory:
                memory.forget(everything=True)
            with PreferenceMemory.open(home.root, passphrase=PASSPHRASE) as memory:
                for prompt, chosen, rejected in pairs:
                    memory.add_pair(prompt, chosen, rejected, tags=("style-suite",))
            for stale in (home.adapters, home.root / "kept-aside", home.runtime):
                if stale.exists():
                    import shutil

                    shutil.rmtree(stale)
            bars.update(task, description=f"{user.name}: fedpal train", completed=0, total=1)
            summary, seconds = _train(home.root, args.model)
            bars.update(task, description=f"{user.name}: replies", completed=0, total=len(heldout) * len(modes))
            by_mode = {
                mode: _replies(generator, heldout, options, home=home, mode=mode, progress=step) for mode in modes
            }
            tuned = by_mode[DEFAULT_MODE]
            base_rate = sum(map(user.shows, base_replies)) / len(heldout)
            tuned_rate = sum(map(user.shows, tuned)) / len(heldout)
            report["users"][user.name] = {
                "modes": {
                    mode: {"rate": sum(map(user.shows, replies)) / len(heldout), **_fluency(replies)}
                    for mode, replies in by_mode.items()
                },
                "kind": user.kind,
                "wants": user.wants,
                "pairs": len(pairs),
                "base_rate": base_rate,
                "personalized_rate": tuned_rate,
                "rise": tuned_rate - base_rate,
                "base_fluency": _fluency(base_replies),
                "personalized_fluency": _fluency(tuned),
                "train_seconds": round(seconds, 1),
                "activated": summary["activated"],
                "train": summary["runs"][-1]["train"],
                "guard": summary["runs"][-1]["guard"],
                "reason": summary["runs"][-1]["reason"],
                "examples": [
                    {"prompt": p, "base": b, "personalized": t}
                    for p, b, t in list(zip(heldout, base_replies, tuned))[: args.show]
                ],
                "replies": tuned,
            }
    checks = _checks(report["users"])
    report.update(
        {
            "pairs_per_user": args.pairs,
            "eval_prompts": len(heldout),
            "max_new_tokens": args.max_new_tokens,
            "mean_rise": checks["mean_rise"]["measured"],
            "min_rise": checks["min_rise"]["measured"],
            "checks": checks,
            "base_replies": base_replies,
            "heldout_prompts": heldout,
            "seconds_total": round(time.perf_counter() - started, 1),
            "machine": f"{platform.platform()}, {os.cpu_count()} cpus",
            "load_average": os.getloadavg(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    (out / "style.json").write_text(json.dumps(report, indent=1))
    _write_markdown(report, out / "style.md")
    _plot(report, out / "style.png")
    return report


TARGETS = {"mean_rise": 0.5, "min_rise": 0.3, "fluency": 0.05, "train_seconds": 300.0}
"""The personalization issue's bar for the suite: preference-rate rise on average and for each
user, the largest loss of fluency against the base model (a rise of repetition or a fall of
distinct-2; fewer repeats are no loss), training time per user."""


def _checks(users: dict) -> dict[str, dict]:
    """Each target, the measured value and whether it holds."""
    rises = [u["rise"] for u in users.values()]
    drift = max(
        max(
            u["personalized_fluency"]["repetition"] - u["base_fluency"]["repetition"],
            u["base_fluency"]["distinct2"] - u["personalized_fluency"]["distinct2"],
        )
        for u in users.values()
    )
    slowest = max(u["train_seconds"] for u in users.values())
    measured = {
        "mean_rise": sum(rises) / len(rises),
        "min_rise": min(rises),
        "fluency": drift,
        "train_seconds": slowest,
    }
    at_least = {"mean_rise", "min_rise"}
    return {
        name: {
            "target": TARGETS[name],
            "measured": value,
            "holds": value >= TARGETS[name] if name in at_least else value <= TARGETS[name],
        }
        for name, value in measured.items()
    }


def _write_markdown(report: dict, path: Path) -> None:
    lines = [
        f"# Style suite ({report['model']}, {report['date']})",
        "",
        f"`fedpal train` at its defaults on ~{report['pairs_per_user']} edited pairs per user; replies to "
        f"{report['eval_prompts']} unseen prompts through `fedpal generate`'s path (mode {report['mode']}, "
        f"greedy, {report['max_new_tokens']} new tokens). Machine: {report['machine']}, load "
        f"{report['load_average'][0]:.2f}.",
        "",
        "| user | kind | pairs | preference rate base -> personalized | repetition base -> personalized "
        "| distinct-2 base -> personalized | training s | activated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, u in report["users"].items():
        bf, pf = u["base_fluency"], u["personalized_fluency"]
        lines.append(
            f"| {name} | {u['kind']} | {u['pairs']} | {u['base_rate']:.2f} -> **{u['personalized_rate']:.2f}** "
            f"| {bf['repetition']:.3f} -> {pf['repetition']:.3f} | {bf['distinct2']:.3f} -> {pf['distinct2']:.3f} "
            f"| {u['train_seconds']:.0f} | {'yes' if u['activated'] else 'no: ' + u['reason']} |"
        )
    lines += ["", f"Mean rise {report['mean_rise']:.2f}, smallest {report['min_rise']:.2f}.", ""]
    words = {
        "mean_rise": "mean rise at least",
        "min_rise": "every user's rise at least",
        "fluency": "largest rise of repetition or fall of distinct-2 at most",
        "train_seconds": "slowest training (s) at most",
    }
    lines += [
        f"- {words[name]} {c['target']:g}: {c['measured']:.3f} — {'holds' if c['holds'] else 'NOT met'}"
        for name, c in report["checks"].items()
    ] + [""]
    others = [m for m in next(iter(report["users"].values()))["modes"] if m != report["mode"]]
    if others:
        lines += ["Other generation modes, same adapters (preference rate, repetition, distinct-2):", ""]
        for name, u in report["users"].items():
            lines.append(
                f"- {name}: "
                + "; ".join(
                    f"{m} {u['modes'][m]['rate']:.2f} / {u['modes'][m]['repetition']:.3f} / "
                    f"{u['modes'][m]['distinct2']:.3f}"
                    for m in others
                )
            )
        lines.append("")
    for name, u in report["users"].items():
        for ex in u["examples"][:1]:
            lines += [
                f"**{name}** — {ex['prompt']}",
                "",
                f"- base: {ex['base'][:240]!r}",
                f"- personalized: {ex['personalized'][:240]!r}",
                "",
            ]
    path.write_text("\n".join(lines) + "\n")


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["users"])
    base = [report["users"][n]["base_rate"] for n in names]
    tuned = [report["users"][n]["personalized_rate"] for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="base model")
    ax.bar([i + 0.2 for i in x], tuned, width=0.4, label="after fedpal train")
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("replies showing the preference")
    ax.set_title(f"Style suite, {report['model']}: {report['eval_prompts']} unseen prompts per user")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS)
    parser.add_argument("--users", default="all", help="comma-separated names, or all")
    parser.add_argument("--candidates", type=int, default=56, help="training prompts to build pairs from")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--eval-prompts", type=int, default=24, help="unseen prompts")
    parser.add_argument("--pair-tokens", type=int, default=96, help="new tokens of the replies pairs are built from")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="new tokens of evaluated replies (generate's default)"
    )
    parser.add_argument(
        "--modes", default="", help="other generation modes to score beside fedpal generate's default (e.g. rerank)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/style")
    parser.add_argument("--show", type=int, default=3, help="example replies kept per user")
    parser.add_argument(
        "--template-replies",
        action="store_true",
        help="build pairs from template replies instead of the model's (for the random tiny model)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 2 users, few prompts, template pairs (pipeline check)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.precision, args.users, args.template_replies = "tiny", "fp32", "bullets,summary", True
        args.candidates, args.pairs, args.eval_prompts, args.pair_tokens, args.max_new_tokens = 16, 12, 4, 24, 24
    report = run(args)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k not in ("base_replies",)}, indent=1))
        return report
    print((Path(args.out) / "style.md").read_text())
    return report


if __name__ == "__main__":
    main()
