"""Decoding speed of fedpal's ONNX path with a personal adapter, side by side with PyTorch.

``python -m fedpal.simulations.benchmarks.runtime`` on the default model, greedy:
- PyTorch eager (fp32) + peft with the personal adapter active,
- the ONNX Runtime GenAI int4 export with the same adapter hot-attached,
- the same export with no adapter,
and the latency of swapping one user's adapter for another's (cold: first load of a
file; warm: switching between files already loaded). Each figure is a median of repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from fedpal.client.onnx_export import DEFAULT_PRECISION, PRECISIONS

PROMPT = "Write a detailed list of ten tips for planning a long hiking trip in the mountains."


def _personal_adapter(base, home, seed: int) -> object:
    """A non-zero, small random personal adapter (as if trained) saved in ``home``; returns the peft model."""
    import torch

    from fedpal.common.adapters import PERSONAL, AdapterConfig, activate, attach_adapters, save_adapter

    model = attach_adapters(base.model, AdapterConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{PERSONAL}." in name:
                scale = 0.02 if "lora_B" in name else 0.1
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    activate(model, [PERSONAL])
    save_adapter(model, PERSONAL, home.adapter_dir(PERSONAL))
    return model


def _timed(engines: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """Median tokens/s and new tokens per engine; runs interleave so a busy machine slows all alike.

    Each engine is a callable returning the number of new tokens it made.
    """
    rates: dict[str, list[float]] = {name: [] for name in engines}
    counts: dict[str, list[int]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            start = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - start))
            counts[name].append(tokens)
    return {name: (statistics.median(rates[name]), int(statistics.median(counts[name]))) for name in engines}


def run(model: str = "default", precision: str = DEFAULT_PRECISION, new_tokens: int = 60, repeats: int = 5) -> dict:
    """Measure and return the figures (also printed as a table by ``main``); user folders are temporary."""
    with tempfile.TemporaryDirectory(prefix="fedpal-bench-") as scratch:
        return _measure(Path(scratch), model, precision, new_tokens, repeats)


def _measure(scratch: Path, model: str, precision: str, new_tokens: int, repeats: int) -> dict:
    import torch

    from fedpal.client.generator import DecodeOptions, PersonalizedGenerator
    from fedpal.client.home import ClientHome
    from fedpal.client.onnx_export import export_model
    from fedpal.common.generation import chat_input_ids
    from fedpal.common.models import load_base_model

    homes = [ClientHome.at(scratch / f"user{i}") for i in range(2)]
    base = load_base_model(model, device="cpu")
    peft_model = _personal_adapter(base, homes[0], seed=1)
    export_start = time.perf_counter()
    info = export_model(model, precision)
    export_s = time.perf_counter() - export_start
    generator = PersonalizedGenerator(info)
    options = DecodeOptions(max_new_tokens=new_tokens)
    ids = chat_input_ids(base.tokenizer, PROMPT)
    convert_start = time.perf_counter()
    adapter = generator.user_adapter(homes[0], w_shared=0.0, w_personal=1.0)
    convert_ms = (time.perf_counter() - convert_start) * 1000

    def torch_run() -> int:
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=base.tokenizer.eos_token_id,
            )
        return int(out.shape[1] - len(ids))

    def onnx_run(with_adapter: bool) -> int:
        return sum(1 for _ in generator.stream(ids, adapter if with_adapter else None, options))

    onnx_run(True)  # warm-up: first run allocates buffers and loads the adapter
    torch_run()

    def torch_one_thread() -> int:
        # On a shared, busy machine torch's default multi-thread eager decoding can be far
        # slower than one thread; the faster of the two is the baseline, so the speed-up is not flattered.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch_run()
        finally:
            torch.set_num_threads(threads)

    load_before = os.getloadavg()[0]
    timed = _timed(
        {
            "torch": torch_run,
            "torch1": torch_one_thread,
            "onnx": lambda: onnx_run(True),
            "base": lambda: onnx_run(False),
        },
        repeats,
    )
    torch_name = max(("torch", "torch1"), key=lambda name: timed[name][0])
    (torch_rate, torch_tokens), (onnx_rate, onnx_tokens), (base_rate, base_tokens) = (
        timed[torch_name],
        timed["onnx"],
        timed["base"],
    )

    # Adapter swap: a second user's adapter, then alternate between the two.
    _personal_adapter(load_base_model(model, device="cpu"), homes[1], seed=2)
    other = generator.user_adapter(homes[1], w_shared=0.0, w_personal=1.0)
    first_token = DecodeOptions(max_new_tokens=1)

    def swap_to(path: Path) -> float:
        start = time.perf_counter()
        generator.new_generator(len(ids), first_token, path)
        return (time.perf_counter() - start) * 1000

    copies = []
    for i in range(repeats):  # each copy is a new file, so each swap to it is a real first load
        copies.append(other.with_name(f"copy{i}{other.suffix}"))
        shutil.copyfile(other, copies[-1])
    cold = statistics.median(swap_to(path) for path in copies)
    warm = statistics.median(swap_to(path) for path in [adapter, other] * repeats)
    merge_s, rerank_s, drafts = _rerank_cost(generator, homes[0], options, repeats)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "model": model,
        "precision": precision,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "pytorch_eager_adapter_tok_s": round(torch_rate, 1),
        "pytorch_threads_tok_s": {
            str(torch.get_num_threads()): round(timed["torch"][0], 1),
            "1": round(timed["torch1"][0], 1),
        },
        "onnx_adapter_tok_s": round(onnx_rate, 1),
        "onnx_no_adapter_tok_s": round(base_rate, 1),
        "speedup_vs_pytorch": round(onnx_rate / torch_rate, 2),
        "tokens_per_run": {"pytorch": torch_tokens, "onnx_adapter": onnx_tokens, "onnx_no_adapter": base_tokens},
        "merge_reply_s": round(merge_s, 3),
        "rerank_reply_s": round(rerank_s, 3),
        "rerank_drafts": drafts,
        "rerank_cost_vs_merge": round(rerank_s / merge_s, 2),
        "adapter_swap_cold_ms": round(cold, 2),
        "adapter_swap_warm_ms": round(warm, 3),
        "adapter_convert_ms": round(convert_ms, 1),
        "export_s_cached_or_built": round(export_s, 1),
    }


def _rerank_cost(generator, home, options, repeats: int) -> tuple[float, float, int]:
    """Median seconds of one reply in merge and in rerank mode (reward fitted beforehand, memo cleared)."""
    from fedpal.client.generator import REGISTERS
    from fedpal.client.memory import PreferenceMemory

    os.environ.setdefault("FEDPAL_PASSPHRASE", "fedpal benchmark")
    with PreferenceMemory.open(home.root) as memory:
        for i in range(8):
            memory.add_pair(
                f"{PROMPT} ({i})",
                "- Pack light.\n- Check the weather.\n- Tell someone your route.",
                "Pack light and check the weather before you go, and tell someone your route.",
            )
    generator.user_reward(home)  # fitted once, as after the first rerank reply
    times: dict[str, list[float]] = {"merge": [], "rerank": []}
    for _ in range(repeats):
        for mode in times:
            generator.clear_memo()
            start = time.perf_counter()
            generator.generate_for(home, PROMPT, mode=mode, options=options, w_shared=0.0)
            times[mode].append(time.perf_counter() - start)
    return statistics.median(times["merge"]), statistics.median(times["rerank"]), 2 + len(REGISTERS)


def table(result: dict) -> str:
    """The figures as a Markdown table."""
    rows = [
        (
            "PyTorch eager fp32 + personal LoRA (peft), best thread count",
            f"{result['pytorch_eager_adapter_tok_s']} tok/s",
        ),
        (
            "  by torch threads",
            ", ".join(f"{n}: {rate} tok/s" for n, rate in result["pytorch_threads_tok_s"].items()),
        ),
        (f"ONNX {result['precision']} + personal LoRA (fedpal)", f"{result['onnx_adapter_tok_s']} tok/s"),
        (f"ONNX {result['precision']}, no adapter", f"{result['onnx_no_adapter_tok_s']} tok/s"),
        ("speed-up, ONNX + LoRA vs PyTorch + LoRA", f"{result['speedup_vs_pytorch']}x"),
        ("one reply, merge mode", f"{result['merge_reply_s']} s"),
        (
            f"one reply, rerank mode ({result['rerank_drafts']} drafts + scoring)",
            f"{result['rerank_reply_s']} s ({result['rerank_cost_vs_merge']}x merge)",
        ),
        ("adapter swap, first load of a user's file", f"{result['adapter_swap_cold_ms']} ms"),
        ("adapter swap, between loaded users", f"{result['adapter_swap_warm_ms']} ms"),
        ("peft -> ONNX adapter conversion", f"{result['adapter_convert_ms']} ms"),
    ]
    head = (
        f"{result['model']}, greedy, {result['new_tokens']} new tokens, median of {result['repeats']} (interleaved); "
        f"{result['machine']}, load average {result['load_average_1min']}; {result['date']}"
    )
    lines = [head, "", "| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_out", type=Path, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    result = run(args.model, args.precision, args.new_tokens, args.repeats)
    print(table(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
