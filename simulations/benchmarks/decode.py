"""``fedpal bench decode``: tokens/s and time to first token, side by side, on the CPU.

Tokens/s is given two ways: end to end (new tokens over the whole call, prompt processing
included) and after the first token (the decode loop alone, what llama.cpp reports as its
eval rate); the prompt's own cost is the time to the first token.

Contenders, greedy, the same prompts and token budget, repeats interleaved:

- PyTorch eager (fp32) with the personal adapter active through peft (the faster of
  torch's default thread count and one thread, so the ratio is not flattered);
- a plain ONNX Runtime GenAI export of the same precision with no adapter slots: the
  engine's own ceiling, which fedpal's slots are measured against;
- fedpal's export with no adapter, with the personal adapter (merge mode), and in fusion
  mode (base and adapter distributions mixed per token); one reply in the reward-guided
  rerank mode against one in merge mode;
- llama.cpp (``llama-cpp-python``, the ``bench`` extra) on the GGUF file the default
  model ships as; a row says "not installed" when the package is absent;
- the adapter's cost by rank (8, 16, 32, 64).

Fidelity is measured beside speed, because a faster engine that changes the text is not
the same product: each ONNX contender is fed the full-precision (fp32 ONNX) greedy reply
of 24 held-out prompts token by token, and the share of positions where its own top token
agrees is reported (teacher forcing: one early disagreement does not spoil the rest).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpal.simulations.benchmarks.core import BenchReport, Spread, benchmark, interleaved, on_this_machine


@dataclass(frozen=True)
class DecodeSettings:
    """The sizes of one decode benchmark run."""

    model: str
    new_tokens: int
    repeats: int
    timing_prompts: int
    fidelity_prompts: int
    ranks: tuple[int, ...]
    precisions: tuple[str, ...] = ("int4", "int8")
    """The first is the headline the checks are made on; int8 is fedpal's default precision."""
    wider_blocks: tuple[int, ...] = (64, 128)
    """Block sizes beside the builder's 32 for the first precision's plain export: fewer scales to read
    per token (the speed lever the engine has), at a quality cost the agreement column shows."""

    @classmethod
    def for_run(cls, quick: bool) -> "DecodeSettings":
        if quick:
            return cls("tiny", 8, 2, 2, 2, (8, 16), ("int4",), (64,))
        return cls("default", 60, 7, 3, 24, (8, 16, 32, 64))


@dataclass
class Timing:
    """What one contender's repeats measured: tokens/s end to end (the prompt included), tokens/s
    after the first token (the decode loop alone, as llama.cpp's eval rate), time to the first token."""

    rate: Spread
    decode_rate: Spread
    first_ms: Spread


class Contender:
    """One engine: ``run(ids)`` decodes greedily and returns (new tokens, first-token s, total s)."""

    def __init__(self, name: str, run: Callable[[list[int]], tuple[int, float, float]]) -> None:
        self.name, self.run, self.first, self.after_first = name, run, [], []

    def timed(self, prompts: Sequence[list[int]]) -> Callable[[], float]:
        """One repeat: returns the end-to-end rate and keeps the first-token time and the rate after it."""
        turn = iter(range(10**9))

        def once() -> float:
            tokens, first, total = self.run(prompts[next(turn) % len(prompts)])
            self.first.append(first * 1000)
            self.after_first.append((tokens - 1) / (total - first) if tokens > 1 and total > first else 0.0)
            return tokens / total

        return once


def _clock(stream) -> tuple[int, float, float]:
    start = time.perf_counter()
    first, count = None, 0
    for _ in stream:
        count += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return count, first if first is not None else total, total


def _greedy_generator(model, ids: list[int], new_tokens: int, adapters=None, name: str | None = None):
    """An ORT GenAI greedy generator with ``ids`` appended and adapter ``name`` active (if any)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    return generator


def _og_stream(model, ids: list[int], new_tokens: int, adapters=None, name: str | None = None):
    generator = _greedy_generator(model, ids, new_tokens, adapters, name)
    while not generator.is_done():
        generator.generate_next_token()
        yield int(generator.get_next_tokens()[0])


def plain_export(model_path: Path, precision: str, cache: Path, block_size: int | None = None) -> Path:
    """The GenAI builder's own export of ``model_path`` (no adapter slots), cached in ``cache``;
    ``block_size``: weights per quantization scale (None: the builder's default, 32, as fedpal's)."""
    out = cache / (f"{model_path.name}-{precision}-plain" + (f"-b{block_size}" if block_size else ""))
    if (out / "genai_config.json").is_file():
        return out
    work = Path(tempfile.mkdtemp(prefix="plain-", dir=cache.parent if cache.parent.exists() else None))
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_path), "-o", str(work)]
    command += ["-p", precision, "-e", "cpu", "-c", str(work / "cache")]
    if block_size:
        command += ["--extra_options", f"block_size={block_size}"]
    subprocess.run(command, check=True, capture_output=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    work.rename(out)
    return out


def _og_model(folder: Path, threads: int):
    import json

    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def random_adapter(base, home, rank: int, seed: int) -> object:
    """A non-zero random personal adapter of ``rank`` (as if trained) saved in ``home``; returns the peft model."""
    import torch

    from fedpal.common.adapters import PERSONAL, AdapterConfig, activate, attach_adapters, save_adapter

    model = attach_adapters(base.model, AdapterConfig.for_rank(rank))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{PERSONAL}." in name:
                scale = 0.02 if "lora_B" in name else 0.1
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    activate(model, [PERSONAL])
    save_adapter(model, PERSONAL, home.adapter_dir(PERSONAL))
    return model


def _torch_contender(peft_model, tokenizer, new_tokens: int, threads: int) -> Contender:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first = None
            self.start = time.perf_counter()

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.first = time.perf_counter() - self.start

        def end(self) -> None:
            pass

    def run(ids: list[int]) -> tuple[int, float, float]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            clock = Clock()
            with torch.no_grad():
                out = peft_model.generate(
                    input_ids=torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                    streamer=clock,
                )
            total = time.perf_counter() - clock.start
            return int(out.shape[1] - len(ids)), clock.first or total, total
        finally:
            torch.set_num_threads(before)

    return Contender(f"PyTorch eager fp32 + adapter ({threads} thread{'s' if threads > 1 else ''})", run)


def _llama_contender(gguf: Path, new_tokens: int, threads: int) -> Contender | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False, seed=0
    )

    def stream(ids: list[int]):
        for count, token in enumerate(llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True), 1):
            if token == llm.token_eos():
                return
            yield token
            if count >= new_tokens:
                return

    return Contender(
        f"llama.cpp ({gguf.stem.rsplit('.', 1)[-1]}), same GGUF, no adapter", lambda ids: _clock(stream(ids))
    )


def agreement(next_logits: Callable[[list[int]], Callable[[int | None], np.ndarray]], references) -> float:
    """Share of reference tokens a model's own top token matches, fed the reference as it goes.

    ``next_logits(prompt)`` starts a decode and returns ``step(token)``, which appends
    ``token`` (None: nothing, the first call) and returns the next logits.
    """
    hits = total = 0
    for prompt, reply in references:
        step = next_logits(prompt)
        token = None
        for expected in reply:
            hits += int(np.argmax(step(token)) == expected)
            total += 1
            token = expected
    return hits / total if total else float("nan")


def _teacher(model, adapters=None, name: str | None = None, budget: int = 256):
    def start(prompt: list[int]) -> Callable[[int | None], np.ndarray]:
        generator = _greedy_generator(model, prompt, budget, adapters, name)

        def step(token: int | None) -> np.ndarray:
            if token is not None:
                generator.append_tokens(np.asarray([[token]], dtype=np.int32))
            return np.asarray(generator.get_logits()).reshape(-1)

        return step

    return start


@benchmark("decode", help="Decoding speed: PyTorch eager, plain ORT GenAI, fedpal ONNX with an adapter, llama.cpp.")
def decode(quick: bool) -> BenchReport:
    settings = DecodeSettings.for_run(quick)
    with tempfile.TemporaryDirectory(prefix="fedpal-bench-decode-") as scratch, on_this_machine() as machine:
        rows, figures, notes = _measure(Path(scratch), settings)
        return BenchReport(
            name="decode",
            title="Decoding speed on the CPU (greedy)",
            machine=machine(),
            settings={
                "model": settings.model,
                "precisions": "/".join(settings.precisions),
                "new tokens": settings.new_tokens,
                "repeats": settings.repeats,
                "quick": quick,
            },
            columns=[
                "engine",
                "tokens/s end to end, median (min-max)",
                "tokens/s after the first",
                "x llama.cpp (end to end / after the first)",
                "x PyTorch (end to end / after the first)",
                "first token ms",
                "agreement",
            ],
            rows=rows,
            figures=figures,
            notes=notes,
        )


def _gguf() -> Path:
    from fedpal.common.default_model import default_gguf_path

    return default_gguf_path()


class _Engines:
    """The exports and adapters one run decodes with, built once."""

    def __init__(self, scratch: Path, s: DecodeSettings) -> None:
        from fedpal.client.generator import DecodeOptions, PersonalizedGenerator, decode_threads
        from fedpal.client.home import ClientHome
        from fedpal.client.onnx_export import export_model
        from fedpal.common.config import fedpal_home
        from fedpal.common.generation import chat_input_ids
        from fedpal.common.models import load_base_model, resolve_model_path
        from fedpal.simulations.prompts import load_prompts

        self.threads = decode_threads()
        self.base = load_base_model(s.model, device="cpu")
        self.homes = {rank: ClientHome.at(scratch / f"rank{rank}") for rank in s.ranks}
        self.peft_model = random_adapter(self.base, self.homes[s.ranks[0]], s.ranks[0], seed=1)
        for rank in s.ranks[1:]:
            random_adapter(load_base_model(s.model, device="cpu"), self.homes[rank], rank, seed=rank)
        prompts = load_prompts("heldout")
        self.timing_ids = [chat_input_ids(self.base.tokenizer, p) for p in prompts[: s.timing_prompts]]
        self.fidelity_ids = [chat_input_ids(self.base.tokenizer, p) for p in prompts[: s.fidelity_prompts]]
        self.options = DecodeOptions(max_new_tokens=s.new_tokens)
        self.fedpal = {
            precision: PersonalizedGenerator(export_model(s.model, precision), self.threads)
            for precision in (*s.precisions, "fp32")
        }
        self.personal = {p: g.user_adapter(self.homes[s.ranks[0]], 0.0, 1.0) for p, g in self.fedpal.items()}
        model_path = resolve_model_path(s.model)
        self.plain = {
            p: _og_model(plain_export(model_path, p, fedpal_home() / "bench"), self.threads) for p in s.precisions
        }
        self.wider = {
            wider_name(s.precisions[0], block): _og_model(
                plain_export(model_path, s.precisions[0], fedpal_home() / "bench", block), self.threads
            )
            for block in s.wider_blocks
        }


def wider_name(precision: str, block: int) -> str:
    return f"plain ORT GenAI {precision} export, block {block} (no adapter slots)"


def _say(message: str) -> None:
    """Progress on stderr: a full run takes minutes."""
    from rich.console import Console

    Console(stderr=True).log(message)


def _measure(scratch: Path, s: DecodeSettings) -> tuple[list[list[str]], dict, list[str]]:
    from fedpal.common.models import DEFAULT

    _say(f"loading {s.model}, its exports ({', '.join(s.precisions)}, fp32, plain) and adapters")
    e = _Engines(scratch, s)
    opts, n = e.options, s.new_tokens
    contenders = [_torch_contender(e.peft_model, e.base.tokenizer, n, t) for t in sorted({e.threads, 1})]
    for p in s.precisions:
        gen, adapter, plain = e.fedpal[p], e.personal[p], e.plain[p]
        contenders += [
            Contender(
                f"plain ORT GenAI {p} export (no adapter slots)", lambda ids, m=plain: _clock(_og_stream(m, ids, n))
            ),
            Contender(f"fedpal ONNX {p}, no adapter", lambda ids, g=gen: _clock(g.stream(ids, None, opts))),
            Contender(
                f"fedpal ONNX {p} + personal adapter", lambda ids, g=gen, a=adapter: _clock(g.stream(ids, a, opts))
            ),
        ]
    head = s.precisions[0]
    contenders += [Contender(name, lambda ids, m=m: _clock(_og_stream(m, ids, n))) for name, m in e.wider.items()]
    contenders.append(
        Contender(
            f"fedpal ONNX {head}, fusion mode (base + adapter mixed per token)",
            lambda ids: _clock(e.fedpal[head].stream(ids, None, opts, fusion=[(None, 1.0), (e.personal[head], 1.0)])),
        )
    )
    llama = _llama_contender(_gguf(), n, e.threads) if s.model == DEFAULT else None
    if llama is not None:
        contenders.append(llama)
    for contender in contenders:  # warm-up: buffers, adapter loads, lazy kernels
        contender.run(e.timing_ids[0])
    _say(f"timing {len(contenders)} engines, {s.repeats} interleaved repeats")
    rates = interleaved({c.name: c.timed(e.timing_ids) for c in contenders}, s.repeats)
    timings = {c.name: Timing(rates[c.name], Spread.of(c.after_first[1:]), Spread.of(c.first[1:])) for c in contenders}

    gen = e.fedpal[head]
    by_rank = [
        Contender(
            f"fedpal ONNX {head} + rank-{rank} adapter",
            lambda ids, r=rank: _clock(gen.stream(ids, gen.user_adapter(e.homes[r], 0.0, 1.0), opts)),
        )
        for rank in s.ranks
    ]
    for contender in by_rank:
        contender.run(e.timing_ids[0])
    _say(f"timing adapter ranks {', '.join(map(str, s.ranks))}")
    rank_rates = interleaved({c.name: c.timed(e.timing_ids) for c in by_rank}, s.repeats)
    merge_s, rerank_s = _rerank_cost(gen, e.homes[s.ranks[0]], opts, max(2, s.repeats // 2))
    _say(f"agreement with fp32 on {s.fidelity_prompts} prompts")
    fidelity = _fidelity(e, s, llama is not None)
    return _table(s, contenders, timings, rank_rates, llama, (merge_s, rerank_s), fidelity)


def _rerank_cost(generator, home, options, repeats: int) -> tuple[Spread, Spread]:
    """Seconds of one reply in merge and in rerank mode (reward fitted beforehand, memo cleared)."""
    from fedpal.client.memory import PreferenceMemory

    os.environ.setdefault("FEDPAL_PASSPHRASE", "fedpal benchmark")
    prompt = "Write a detailed list of ten tips for planning a long hiking trip in the mountains."
    with PreferenceMemory.open(home.root) as memory:
        for i in range(8):
            memory.add_pair(
                f"{prompt} ({i})",
                "- Pack light.\n- Check the weather.\n- Tell someone your route.",
                "Pack light and check the weather before you go, and tell someone your route.",
            )
    generator.user_reward(home)  # fitted once, as after the first rerank reply

    def reply(mode: str) -> Callable[[], float]:
        def once() -> float:
            generator.clear_memo()
            start = time.perf_counter()
            generator.generate_for(home, prompt, mode=mode, options=options, w_shared=0.0)
            return time.perf_counter() - start

        return once

    spreads = interleaved({"merge": reply("merge"), "rerank": reply("rerank")}, repeats)
    return spreads["merge"], spreads["rerank"]


def _fidelity(e: _Engines, s: DecodeSettings, llama: bool) -> dict[str, float]:
    """Teacher-forced top-1 agreement with the fp32 export, with and without the personal adapter
    (llama.cpp without: it runs no adapter)."""
    reference = e.fedpal["fp32"]
    out = {}
    for with_adapter in (False, True):
        ref_adapter = e.personal["fp32"] if with_adapter else None
        replies = [(ids, list(reference.stream(ids, ref_adapter, e.options))) for ids in e.fidelity_ids]
        if llama and not with_adapter:
            out["llama.cpp"] = _llama_agreement(_gguf(), replies, e.threads)
        if not with_adapter:
            out.update({name: agreement(_teacher(model), replies) for name, model in e.wider.items()})
        for p in s.precisions:
            gen = e.fedpal[p]
            adapters = name = None
            if with_adapter:
                adapters, name = gen.adapters, gen.attach(e.personal[p])
            out[f"{p}{' + adapter' if with_adapter else ''}"] = agreement(_teacher(gen.model, adapters, name), replies)
    return out


def _llama_agreement(gguf: Path, replies, threads: int) -> float:
    """:func:`agreement` for llama.cpp, fed one token at a time and read at the last position
    (``llm.scores`` keeps logits only with ``logits_all``)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_ctx=2048, logits_all=True, verbose=False)

    def start(prompt: list[int]) -> Callable[[int | None], np.ndarray]:
        llm.reset()
        llm.eval(prompt)

        def step(token: int | None) -> np.ndarray:
            if token is not None:
                llm.eval([token])
            return np.asarray(llm.scores[llm.n_tokens - 1])

        return step

    return agreement(start, replies)


def _table(s, contenders, timings, rank_rates, llama, replies, fidelity):
    torch_best = max((c.name for c in contenders if c.name.startswith("PyTorch")), key=lambda k: timings[k].rate.median)
    llama_t = timings[llama.name] if llama is not None else None
    llama_rate = llama_t.rate if llama_t is not None else None
    figures = {"tokens_per_s": {}, "tokens_per_s_after_first": {}, "first_token_ms": {}}
    figures["agreement_with_fp32"] = fidelity
    rows = []

    def ratio(rate: Spread, other: Spread | None) -> str:
        return f"{rate.ratio(other):.2f}x" if other is not None else "-"

    def ratios(t: Timing, other: Timing | None) -> str:
        if other is None:
            return "-"
        return f"{ratio(t.rate, other.rate)} / {ratio(t.decode_rate, other.decode_rate)}"

    for c in contenders:
        t = timings[c.name]
        adapter = "+ personal adapter" in c.name
        precision = next((p for p in s.precisions if f" {p}" in c.name and "ONNX" in c.name), None)
        agree = fidelity.get("llama.cpp" if c is llama else c.name)
        if agree is None and precision and "fusion" not in c.name:
            agree = fidelity.get(f"{precision}{' + adapter' if adapter else ''}")
        rows.append(
            [
                c.name,
                t.rate.show(),
                t.decode_rate.show(),
                ratios(t, llama_t),
                ratios(t, timings[torch_best]),
                f"{t.first_ms.median:.1f}",
                f"{agree:.3f}" if agree is not None else "-",
            ]
        )
        figures["tokens_per_s"][c.name] = t.rate.__dict__
        figures["tokens_per_s_after_first"][c.name] = t.decode_rate.__dict__
        figures["first_token_ms"][c.name] = t.first_ms.__dict__
    if llama is None:
        why = "no GGUF for this model" if s.model != "default" else "not installed (pip install 'fedpal[bench]')"
        rows.append(["llama.cpp", why, "-", "-", "-", "-", "-"])
    no_adapter = timings[f"fedpal ONNX {s.precisions[0]}, no adapter"].rate
    for name, rate in rank_rates.items():
        cost = f"cost {1 - rate.ratio(no_adapter):.0%}"
        rows.append([name, rate.show(), "-", ratio(rate, llama_rate), "-", "-", cost])
        figures["tokens_per_s"][name] = rate.__dict__
    merge_s, rerank_s = replies
    rows.append(["one reply, merge mode (s)", merge_s.show(2), "-", "-", "-", "-", "-"])
    rerank = f"one reply, rerank mode (s; {rerank_s.ratio(merge_s):.1f}x merge)"
    rows.append([rerank, rerank_s.show(2), "-", "-", "-", "-", "-"])
    figures["reply_s"] = {"merge": merge_s.__dict__, "rerank": rerank_s.__dict__}
    notes = _verdicts(s, timings, torch_best, llama_t, figures)
    return rows, figures, notes


def _verdicts(s, timings, torch_best, llama_t, figures) -> list[str]:
    """The issue's targets, checked on this run's numbers (end to end, and after the first token)."""
    head = s.precisions[0]
    with_adapter = timings[f"fedpal ONNX {head} + personal adapter"]
    plain = timings[f"plain ORT GenAI {head} export (no adapter slots)"].rate
    slots = timings[f"fedpal ONNX {head}, no adapter"].rate
    torch = timings[torch_best]
    checks = {
        "slots_cost_vs_plain": 1 - slots.ratio(plain),
        "adapter_vs_pytorch": with_adapter.rate.ratio(torch.rate),
        "adapter_vs_pytorch_after_first": with_adapter.decode_rate.ratio(torch.decode_rate),
    }
    if llama_t is not None:
        checks["adapter_vs_llama_cpp"] = with_adapter.rate.ratio(llama_t.rate)
        checks["adapter_vs_llama_cpp_after_first"] = with_adapter.decode_rate.ratio(llama_t.decode_rate)
    figures["checks"] = checks
    notes = [
        f"{head} adapter slots cost {checks['slots_cost_vs_plain']:.1%} vs the plain export (no adapter on either).",
        f"fedpal {head} + adapter runs at {checks['adapter_vs_pytorch']:.2f}x PyTorch eager with the same adapter "
        f"end to end, {checks['adapter_vs_pytorch_after_first']:.2f}x after the first token.",
    ]
    if llama_t is not None:
        notes.append(
            f"fedpal {head} + adapter runs at {checks['adapter_vs_llama_cpp']:.2f}x llama.cpp with no adapter "
            f"end to end, {checks['adapter_vs_llama_cpp_after_first']:.2f}x after the first token."
        )
    notes.append(
        "end to end: new tokens / (prompt processing + decoding); after the first: the tokens after the first "
        "over the time after it, the decode loop alone (the prompt's cost is the first-token column)."
    )
    notes.append(
        f"agreement: share of an fp32 export's greedy tokens ({s.fidelity_prompts} held-out prompts, teacher-forced) "
        "that the engine also ranks first; the adapter rows against fp32 with the same adapter."
    )
    return notes
