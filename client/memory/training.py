"""What training learns from a memory: its records turned into DPO pairs and SFT examples,
and the stated preferences retrieval puts into a request. Pure functions of records, so the
trainer's data can be checked without a database or a key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

from fedpal.client.memory.records import Record
from fedpal.common.generation import place_preferences
from fedpal.common.types import PreferencePair, SFTExample

TrainingItem = TypeVar("TrainingItem", PreferencePair, SFTExample)

SFT_MIN_SCORE = 4
RETRIEVAL_MAX_BYTES = 1_000
"""Most UTF-8 bytes of stated preferences that retrieval adds to a request (about 250 tokens
of English; a byte-level tokenizer never makes more tokens than bytes), so the user's
request and the reply always keep room in the model's context."""
PREFERENCE_MAX_BYTES = 400
"""A longer stated preference is cut (at a word) when retrieval adds it."""


def fit_preferences(
    texts: Iterable[str], max_bytes: int = RETRIEVAL_MAX_BYTES, each_bytes: int = PREFERENCE_MAX_BYTES
) -> list[str]:
    """``texts`` in order, each cut to ``each_bytes`` and all together at most ``max_bytes`` of UTF-8.

    A preference that no longer fits is left out and the next (shorter) one tried, so the
    most relevant preferences that fit are the ones the model sees.
    """
    kept: list[str] = []
    left = max_bytes
    for text in texts:
        text = cut_utf8(" ".join(text.split()), each_bytes)
        size = len(text.encode("utf-8")) + (1 if kept else 0)
        if text and size <= left:
            kept.append(text)
            left -= size
    return kept


def cut_utf8(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` UTF-8 bytes, else its longest whole-word start that does, plus "…"."""
    if len(text.encode("utf-8")) <= limit:
        return text
    room = limit - len("…".encode("utf-8"))
    head = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
    if " " in head.strip():
        head = head.rstrip()[: head.rstrip().rfind(" ")]
    return head.rstrip() + "…"


def preference_pairs(records: Iterable[Record]) -> list[PreferencePair]:
    """DPO pairs: explicit pairs, edits (edited over original), and ratings of one prompt ranked pairwise.

    A rating-derived pair's ``source_id`` is ``"<higher id>><lower id>"``.
    """
    pairs: list[PreferencePair] = []
    ratings: dict[str, list[Record]] = {}
    for r in records:
        f = r.fields
        if r.kind == "pair" and f["chosen"] != f["rejected"]:
            pairs.append(PreferencePair(f["prompt"], f["chosen"], f["rejected"], r.id))
        elif r.kind == "edit" and f["edited"] != f["response"]:
            pairs.append(PreferencePair(f["prompt"], f["edited"], f["response"], r.id))
        elif r.kind == "rating":
            ratings.setdefault(f["prompt"], []).append(r)
    for prompt, rated in ratings.items():
        for i, a in enumerate(rated):
            for b in rated[i + 1 :]:
                hi, lo = (a, b) if a.fields["score"] > b.fields["score"] else (b, a)
                if hi.fields["score"] != lo.fields["score"] and hi.fields["response"] != lo.fields["response"]:
                    pairs.append(
                        PreferencePair(prompt, hi.fields["response"], lo.fields["response"], f"{hi.id}>{lo.id}")
                    )
    return pairs


def sft_examples(records: Iterable[Record]) -> list[SFTExample]:
    """SFT targets: chosen answers, edited answers, and responses rated 4 or 5 (duplicates dropped).

    Turns are left out: they are the model's own outputs and carry no judgement.
    """
    examples: list[SFTExample] = []
    seen: set[tuple[str, str]] = set()
    for r in records:
        f = r.fields
        if r.kind == "pair":
            target = f["chosen"]
        elif r.kind == "edit":
            target = f["edited"]
        elif r.kind == "rating" and f["score"] >= SFT_MIN_SCORE:
            target = f["response"]
        else:
            continue
        if (f["prompt"], target) not in seen:
            seen.add((f["prompt"], target))
            examples.append(SFTExample(f["prompt"], target, r.id))
    return examples


def in_context(
    items: Sequence[TrainingItem], stated_for: Callable[[str], list[str]], where: str = "prompt"
) -> list[TrainingItem]:
    """``items`` with each prompt's stated preferences (``stated_for(prompt)``) placed ``where`` (prompt or system).

    With retrieval on, the generator shows the model exactly this context; an adapter
    trained on bare prompts would answer in a context it never learned in.
    """
    placed: dict[str, tuple[str, str | None]] = {}
    for item in items:
        if item.prompt not in placed:
            placed[item.prompt] = place_preferences(item.prompt, None, stated_for(item.prompt), where)
    return [replace(item, prompt=placed[item.prompt][0], system=placed[item.prompt][1]) for item in items]
