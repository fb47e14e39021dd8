"""Does a personal adapter trained by DPO on ~32 pairs change what the model writes?

``python -m fedpal.simulations.benchmarks.style [--model default]``:

1. For training prompts of the built-in pool, the base model answers plainly, greedily
   (the rejected reply). The chosen reply is either the plain reply's sentences rewritten
   as "- " lines (``--chosen reformatted``, the default: same content, only the form
   differs; works with models that ignore instructions) or the base model's own answer
   when asked for a bulleted list (``--chosen instructed``, on-policy). Pairs whose chosen
   reply has a bullet list and whose rejected reply has none are kept, up to ``--pairs``.
2. The personal adapter is trained with fedpal's ``LocalTrainer`` (DPO, plus SFT on the
   chosen replies unless ``--objective dpo``; reference = base + the untouched shared adapter).
3. On held-out prompts the user never rated, asked plainly, the greedy replies of the
   base model and of base + adapters are compared: the share with a bullet list.

Prints the two rates and a few replies; ``--json`` for the figures.

Measured 2026-11-22 on the project machine (2 CPU cores, SmolLM2-135M-Instruct, 32
reformatted pairs, 24 steps of 4 pairs, 24 held-out prompts, 80 new tokens): DPO + SFT on
the chosen replies (``--objective both``, the default) took bulleted greedy replies from
0/24 to 23/24, fluent ("- To make tomato sauce from scratch, you will need to start by
boiling the tomatoes." ...), training 141 s. Pure DPO (``--objective dpo``) overfits
the form: loss 0.693 -> 0.006 but replies collapse into "- -- -- --" and only 1/24 counts
as a list. ``--chosen instructed`` (the base model asked for a list) left only 5 usable
pairs: the 135M model rarely follows that instruction.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from datetime import datetime, timezone

_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
BULLETED = "Answer with a bulleted list of three to five points, each line starting with '- '."


def is_bulleted(text: str) -> bool:
    """At least two lines that start with a dash, star or bullet sign."""
    return len(_BULLET.findall(text)) >= 2


def as_bullets(text: str) -> str:
    """The sentences of ``text`` as a dash list (the "reformatted" chosen reply)."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
    if len(sentences) < 2:  # one long sentence (or a random model's words): three chunks of words
        words = text.split()
        third = max(len(words) // 3, 1)
        sentences = [" ".join(words[i: i + third]) for i in range(0, len(words), third)]
    return "\n".join(f"- {s}" for s in sentences)


def generate_batch(base, model, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy replies, left-padded batches (CPU throughput is several times one-by-one)."""
    import torch

    from fedpal.common.generation import chat_input_ids

    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    replies = []
    for start in range(0, len(prompts), batch_size):
        rows = [chat_input_ids(tok, p) for p in prompts[start: start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=base.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=base.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        replies += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return replies


def run(args: argparse.Namespace) -> dict:
    import torch

    from fedpal.client.trainer import LocalTrainer, TrainConfig
    from fedpal.common.adapters import PERSONAL, SHARED, AdapterConfig, activate, attach_adapters
    from fedpal.common.errors import FedpalError
    from fedpal.common.models import load_base_model
    from fedpal.common.types import PreferencePair, SFTExample
    from fedpal.simulations.prompts import sample_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = load_base_model(args.model, device=args.device)
    model = attach_adapters(base.model, AdapterConfig(rank=args.rank, alpha=2.0 * args.rank))
    candidates = sample_prompts("train", args.candidates, seed=args.seed)
    held_out = sample_prompts("heldout", args.eval_prompts, seed=args.seed)

    with model.disable_adapter():
        plain = generate_batch(base, model, candidates, args.max_new_tokens)
        if args.chosen == "instructed":
            chosen = generate_batch(base, model, [f"{p}\n\n{BULLETED}" for p in candidates], args.max_new_tokens)
        else:
            chosen = [as_bullets(r) for r in plain]
        base_replies = generate_batch(base, model, held_out, args.max_new_tokens)
    pairs = [PreferencePair(p, c, r) for p, c, r in zip(candidates, chosen, plain)
             if is_bulleted(c) and not is_bulleted(r)][: args.pairs]
    if not pairs:
        raise FedpalError(f"no usable pairs from {len(candidates)} prompts with --chosen {args.chosen}; "
                          "try the other --chosen or more --candidates")
    generated = time.perf_counter()

    trainer = LocalTrainer(base, model, TrainConfig(
        objective=args.objective, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
        learning_rate=args.learning_rate, beta=args.beta, seed=args.seed, checkpoint_every=0,
    ))
    examples = [SFTExample(p.prompt, p.chosen) for p in pairs] if args.objective != "dpo" else []
    result = trainer.train(PERSONAL, pairs, examples, reference_adapters=[SHARED], progress=not args.json)
    trained = time.perf_counter()

    activate(model, [SHARED, PERSONAL])
    tuned_replies = generate_batch(base, model, held_out, args.max_new_tokens)
    base_rate = sum(map(is_bulleted, base_replies)) / len(held_out)
    tuned_rate = sum(map(is_bulleted, tuned_replies)) / len(held_out)
    return {
        "model": args.model, "chosen_from": args.chosen, "objective": args.objective, "device": result.device, "pairs": len(pairs), "candidates": len(candidates),
        "eval_prompts": len(held_out), "steps": result.steps, "stopped": result.stopped,
        "loss_first": result.loss_first, "loss_last": result.loss_last,
        "reward_margin_first": result.reward_margin_first, "reward_margin_last": result.reward_margin_last,
        "base_bulleted_rate": base_rate, "tuned_bulleted_rate": tuned_rate,
        "pair_bulleted_rate_chosen": sum(map(is_bulleted, chosen)) / len(chosen),
        "seconds_generating_pairs": round(generated - start, 1), "seconds_training": round(trained - generated, 1),
        "seconds_total": round(time.perf_counter() - start, 1),
        "machine": platform.platform(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "examples": [{"prompt": p, "base": b, "tuned": t}
                     for p, b, t in list(zip(held_out, base_replies, tuned_replies))[: args.show]],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--chosen", choices=("instructed", "reformatted"), default="reformatted")
    parser.add_argument("--candidates", type=int, default=48, help="training prompts to build pairs from")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=24, help="24 x 4 = three passes over 32 pairs")
    parser.add_argument("--objective", choices=("dpo", "both"), default="both",
                        help="both: DPO plus SFT on the chosen replies, which keeps them fluent (pure DPO on few pairs degenerates)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--show", type=int, default=3, help="example replies to print")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"{report['model']} on {report['device']}: {report['pairs']} pairs ({report['chosen_from']}) "
          f"(from {report['candidates']} prompts), {report['steps']} {report['objective']} steps, "
          f"loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}, "
          f"margin {report['reward_margin_first']:.2f} -> {report['reward_margin_last']:.2f}")
    print(f"bulleted greedy replies on {report['eval_prompts']} held-out prompts: "
          f"base {report['base_bulleted_rate']:.0%} -> personal adapter {report['tuned_bulleted_rate']:.0%}")
    print(f"time: pairs {report['seconds_generating_pairs']}s, training {report['seconds_training']}s, "
          f"total {report['seconds_total']}s ({report['date']})")
    for ex in report["examples"]:
        print(f"\n> {ex['prompt']}\n[base] {ex['base'][:300]}\n[tuned] {ex['tuned'][:300]}")
    return report


if __name__ == "__main__":
    main()
