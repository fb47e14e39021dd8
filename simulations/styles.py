"""Style instructions that vary the base model's candidate replies, and a model-free stand-in.

Candidates for every prompt are generated once by the base model, one per style, and
shared across users; each user then labels them by their own utility. The styles are
chosen so that each archetype of :mod:`fedpal.simulations.users` has candidates it likes
and candidates it dislikes — otherwise the pairs teach nothing.

:func:`synthetic_reply` writes a reply with a style's attributes from templates, so
users, labelling and evaluation can be tested (and demonstrated) without any model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Style:
    """A named way of answering: the instruction appended to the user's prompt."""

    name: str
    instruction: str


STYLES: tuple[Style, ...] = (
    Style("plain", ""),
    Style("one_sentence", "Answer in one short sentence."),
    Style("bulleted", "Answer with a bulleted list of three to five points."),
    Style(
        "warm_question",
        "Answer warmly and enthusiastically, then ask me a follow-up question.",
    ),
    Style("detailed_example", "Give a detailed answer with a concrete example."),
    Style("formal", "Answer in a formal, professional tone."),
    Style("casual", "Answer casually, like a friend sending a text."),
    Style(
        "budget_simple",
        "Use very simple words and short sentences. Focus on the cheapest option and say how long it takes.",
    ),
)
"""``plain`` has no instruction: it is the base model's own answer."""

STYLES_BY_NAME: dict[str, Style] = {style.name: style for style in STYLES}


def style_prompt(prompt: str, style: Style) -> str:
    """The user message that asks the base model for ``prompt`` answered in ``style``."""
    if not style.instruction:
        return prompt
    return f"{prompt.rstrip()}\n\n{style.instruction}"


def candidate_generation_prompts(prompt: str, styles: Sequence[Style] = STYLES) -> list[str]:
    """One generation prompt per style, in ``styles`` order."""
    return [style_prompt(prompt, style) for style in styles]


_LEADING = re.compile(
    r"^(?:please\s+|hi[,!]?\s+|hey[,!]?\s+)*"
    r"(?:how (?:do|can|should|would) (?:i|we|you)\s+|what(?:'s| is| are) (?:the |a |an )?"
    r"(?:best way to\s+|good way to\s+)?|can you\s+|could you\s+|help me\s+|i need to\s+|"
    r"i want to\s+|give me\s+|tell me\s+|explain\s+|write\s+|suggest\s+)?",
    re.IGNORECASE,
)

_DANGLING = frozenset("a an the as to for of and or in on at with my your our by from that this is".split())

_TIPS: tuple[str, ...] = (
    "start with the simplest version of {topic} and build up from there",
    "write down what you want from {topic} before you begin",
    "break {topic} into small steps and do one step at a time",
    "look at how someone experienced handles {topic} and copy what works",
    "check your progress on {topic} after each step and adjust",
    "keep short notes on what worked for {topic} so you can repeat it",
    "ask someone you trust to look over your plan for {topic}",
    "gather everything you need for {topic} before you start",
)


def prompt_topic(prompt: str, max_words: int = 8) -> str:
    """A short noun-ish phrase for the prompt ("how do I boil an egg?" -> "boil an egg")."""
    first = re.split(r"(?<=[.?!])\s", prompt.strip(), maxsplit=1)[0]
    stripped = _LEADING.sub("", first).strip(" ?.!")
    tokens = stripped.split()[:max_words]
    while tokens and tokens[-1].lower().strip(",;:") in _DANGLING:
        tokens.pop()
    return " ".join(tokens).rstrip(",;:").lower() or "this"


def _tips(topic: str, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct advice clauses about ``topic``, in random order."""
    chosen = rng.choice(len(_TIPS), size=n, replace=False)
    return [_TIPS[i].format(topic=topic) for i in chosen]


def _cap(clause: str) -> str:
    return clause[:1].upper() + clause[1:]


def synthetic_reply(prompt: str, style: Style | str, rng: np.random.Generator) -> str:
    """A template reply to ``prompt`` with the attributes ``style`` asks for.

    Deterministic given the generator's state; the wording varies with ``rng`` so
    candidates for different prompts are not identical strings.
    """
    name = style if isinstance(style, str) else style.name
    if name not in STYLES_BY_NAME:
        raise ValueError(f"unknown style {name!r}; known: {sorted(STYLES_BY_NAME)}")
    topic = prompt_topic(prompt)
    if name == "plain":
        a, b, c = _tips(topic, rng, 3)
        return f"To handle {topic}, {a}. Then {b}. It also helps to {c}."
    if name == "one_sentence":
        (a,) = _tips(topic, rng, 1)
        return f"{_cap(a)}."
    if name == "bulleted":
        items = _tips(topic, rng, int(rng.integers(3, 6)))
        return f"Steps for {topic}:\n" + "\n".join(f"- {_cap(t)}." for t in items)
    if name == "warm_question":
        a, b = _tips(topic, rng, 2)
        question = rng.choice(["What have you tried so far?", "What part feels hardest for you right now?"])
        return (
            f"Great question, I love that you're working on {topic}! {_cap(a)}. "
            f"{_cap(b)}, and enjoy the process. You've got this! {question}"
        )
    if name == "detailed_example":
        a, b, c, d = _tips(topic, rng, 4)
        return (
            f"There are several things to consider with {topic}. First, {a}. Second, {b}. "
            f"Third, {c}. Finally, {d}. For example, if you have only one open evening, "
            "use it on the first step alone and write down what happened, then use those "
            "notes to plan the next session. Be careful not to take on too much at once, "
            "because rushing is the most common reason people give up."
        )
    if name == "formal":
        a, b, c = _tips(topic, rng, 3)
        return (
            f"Certainly. Regarding {topic}, it is advisable to {a}. Furthermore, {b}. "
            f"Please note that it is recommended to {c}."
        )
    if name == "casual":
        a, b = _tips(topic, rng, 2)
        return (
            f"Hey, so for {topic} you're gonna wanna {a}. Honestly it's pretty easy, "
            f"just {b}. No worries if it takes a couple tries."
        )
    minutes = int(rng.choice([10, 15, 20, 30]))
    return (
        f"Do the cheap thing first. It costs little or no money. Use what you have. "
        f"Save the rest of your budget. It takes about {minutes} minutes a day."
    )
