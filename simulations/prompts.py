"""The built-in pool of everyday assistant prompts, shipped as package data (no downloads).

``data/prompts.json`` holds 360 prompts in twelve categories (cooking, travel, work email,
coding, health habits, money, learning, writing help, home DIY, tech help, relationships,
family). The train/held-out split is fixed in the file — every fifth prompt of each
category is held out — so every run and every baseline evaluates on the same prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

import numpy as np

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


@dataclass(frozen=True)
class Prompt:
    """One prompt of the pool and the everyday category it belongs to."""

    text: str
    category: str


@cache
def _load() -> dict[str, tuple[Prompt, ...]]:
    """Read the JSON once per process; callers get immutable tuples."""
    raw = json.loads(resources.files("fedpal.simulations").joinpath("data/prompts.json").read_text("utf-8"))
    return {split: tuple(Prompt(text=p["text"], category=p["category"]) for p in raw[split]) for split in SPLITS}


def load_prompt_records(split: Split) -> tuple[Prompt, ...]:
    """All prompts of ``split`` with their categories, in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _load()[split]


def load_prompts(split: Split) -> list[str]:
    """The prompt texts of ``split``, in file order."""
    return [p.text for p in load_prompt_records(split)]


def sample_prompts(split: Split, n: int, seed: int) -> list[str]:
    """``n`` distinct prompts of ``split`` chosen deterministically from ``seed``.

    Presets use fewer prompts than the pool holds; the file is ordered by category, so
    taking the first ``n`` would give only cooking questions.
    """
    texts = load_prompts(split)
    if not 0 <= n <= len(texts):
        raise ValueError(f"n must be in [0, {len(texts)}] for split {split!r}")
    idx = np.random.default_rng(seed).choice(len(texts), size=n, replace=False)
    return [texts[i] for i in sorted(idx)]
