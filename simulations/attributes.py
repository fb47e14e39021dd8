"""Measurable attributes of a reply: the quantities simulated users have preferences over.

Every attribute is a pure function of the reply text (no model, no randomness), so a
user's utility is exact and personalization can be scored without human raters. Each is
normalized to ``[0, 1]`` so that user targets and weights are comparable across
attributes:

============== ==========================================================================
name           meaning and normalization
============== ==========================================================================
length         words, log-scaled: ``log(1 + words) / log(1 + 400)``, clipped. 0 words -> 0,
               ~15 words -> 0.46, ~60 -> 0.69, ~160 -> 0.85, >= 400 -> 1. Log because a
               reader notices doubling, not adding ten words.
structure      fraction of non-empty lines that are bullet (``-``, ``*``, ``•``) or
               numbered (``1.``, ``2)``) items. Prose -> 0, a pure list -> 1.
formality      ``sigmoid(d / 3)`` where ``d`` is formal minus informal markers per 100
               words (markers: connectives such as "furthermore", "regards" vs.
               contractions, slang, exclamation marks, emoji). Neutral text -> 0.5.
warmth         enthusiasm and warmth: ``1 - exp(-d / 4)`` with ``d`` warm words,
               exclamation marks and emoji per 100 words. None -> 0.
questions      questions back to the user: ``min(q, 2) / 2`` for ``q`` sentences ending
               in ``?``.
examples       use of examples: ``min(e, 2) / 2`` for ``e`` markers ("for example",
               "for instance", "e.g.", "such as", code blocks).
reading_level  Flesch–Kincaid grade clipped to ``[0, 16]`` and divided by 16.
topic_budget   money and cost words: ``min(h, 3) / 3`` for ``h`` hits.
topic_safety   health, safety and caution words: ``min(h, 3) / 3``.
topic_time     time and speed words: ``min(h, 3) / 3``.
============== ==========================================================================

Reading level is computed by hand (Flesch–Kincaid with a vowel-group syllable count):
textstat 0.7.13 would fit, but it pulls in nltk, installs a top-level ``tests`` package
that collides with ours, and keeps the language as module-global state; users only need
a grade that is monotone in sentence and word length, which twenty lines give exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

ATTRIBUTE_NAMES: tuple[str, ...] = (
    "length",
    "structure",
    "formality",
    "warmth",
    "questions",
    "examples",
    "reading_level",
    "topic_budget",
    "topic_safety",
    "topic_time",
)
"""Column order of :func:`attribute_matrix`; user weights and targets use the same order."""

LENGTH_SATURATION_WORDS = 400
MAX_GRADE = 16.0

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+\S")
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+")
_SENTENCE_END = re.compile(r"[.!?]+|\n+")
_EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")
_CONTRACTION = re.compile(r"\b\w+['’](?:s|re|ve|ll|d|t|m)\b", re.IGNORECASE)
_QUESTION = re.compile(r"[^.!?\n]*[A-Za-z][^.!?\n]*\?")
_CODE_BLOCK = re.compile(r"```")

_FORMAL_MARKERS = (
    "therefore",
    "however",
    "furthermore",
    "moreover",
    "consequently",
    "additionally",
    "regards",
    "sincerely",
    "dear",
    "please note",
    "it is advisable",
    "it is recommended",
    "recommend",
    "ensure",
    "approximately",
    "regarding",
    "accordingly",
    "nevertheless",
    "subsequently",
    "in order to",
    "certainly",
    "kindly",
    "appropriate",
    "thus",
)
_INFORMAL_MARKERS = (
    "hey",
    "gonna",
    "wanna",
    "gotta",
    "yeah",
    "yep",
    "cool",
    "awesome",
    "stuff",
    "kinda",
    "sorta",
    "lol",
    "btw",
    "ok",
    "okay",
    "totally",
    "pretty much",
    "no worries",
    "super",
    "folks",
    "guys",
    "chill",
    "grab",
    "tons of",
    "nope",
)
_WARM_MARKERS = (
    "great",
    "happy",
    "glad",
    "love",
    "wonderful",
    "hope",
    "enjoy",
    "fun",
    "exciting",
    "excited",
    "fantastic",
    "awesome",
    "amazing",
    "delighted",
    "good luck",
    "you've got this",
    "you got this",
    "proud",
    "lovely",
    "cheers",
    "best wishes",
    "don't worry",
    "no worries",
    "you can do it",
    "congratulations",
    "welcome",
)
_EXAMPLE_MARKERS = (
    "for example",
    "for instance",
    "e.g.",
    "such as",
    "example:",
    "imagine",
    "say you",
    "like when",
    "to illustrate",
)
_TOPIC_LEXICONS: dict[str, tuple[str, ...]] = {
    "topic_budget": (
        "cost",
        "costs",
        "price",
        "prices",
        "cheap",
        "cheaper",
        "budget",
        "money",
        "save",
        "saving",
        "savings",
        "afford",
        "affordable",
        "expensive",
        "spend",
        "free",
        "dollars",
        "$",
    ),
    "topic_safety": (
        "safe",
        "safety",
        "safely",
        "risk",
        "risks",
        "careful",
        "caution",
        "doctor",
        "health",
        "healthy",
        "injury",
        "avoid",
        "warning",
        "protect",
        "secure",
        "security",
    ),
    "topic_time": (
        "quick",
        "quickly",
        "fast",
        "minutes",
        "minute",
        "hours",
        "hour",
        "time",
        "schedule",
        "deadline",
        "today",
        "daily",
        "week",
        "weeks",
        "soon",
        "routine",
    ),
}


def words(text: str) -> list[str]:
    """The words of ``text`` with list markers removed (so "1." is not a word)."""
    body = "\n".join(_LIST_MARKER.sub("", line) for line in text.splitlines())
    return _WORD.findall(body)


def count_syllables(word: str) -> int:
    """Vowel-group syllable estimate (silent final "e" dropped, at least one per word)."""
    w = word.lower().strip("'’")
    if not w:
        return 0
    if w.isdigit():
        return max(1, len(w))
    groups = re.findall(r"[aeiouy]+", w)
    n = len(groups)
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and n > 1:
        n -= 1
    return max(1, n)


def sentence_count(text: str) -> int:
    """Sentences, counting line breaks as ends so list items are sentences of their own."""
    pieces = [p for p in _SENTENCE_END.split(text) if _WORD.search(p)]
    return max(1, len(pieces))


def flesch_kincaid_grade(text: str) -> float:
    """Flesch–Kincaid grade level (US school grade); 0.0 for text without words."""
    ws = words(text)
    if not ws:
        return 0.0
    syllables = sum(count_syllables(w) for w in ws)
    return 0.39 * len(ws) / sentence_count(text) + 11.8 * syllables / len(ws) - 15.59


def _phrase_pattern(phrases: Sequence[str]) -> re.Pattern[str]:
    """One regex matching any of ``phrases`` as whole words (longest first); symbols such
    as ``$`` match anywhere."""
    ordered = sorted(phrases, key=len, reverse=True)
    worded = [re.escape(p) for p in ordered if p[0].isalnum()]
    symbols = [re.escape(p) for p in ordered if not p[0].isalnum()]
    alternatives = [r"(?<![\w'])(?:" + "|".join(worded) + r")(?![\w'])"] if worded else []
    return re.compile("|".join(alternatives + symbols))


_FORMAL = _phrase_pattern(_FORMAL_MARKERS)
_INFORMAL = _phrase_pattern(_INFORMAL_MARKERS)
_WARM = _phrase_pattern(_WARM_MARKERS)
_EXAMPLES = _phrase_pattern(_EXAMPLE_MARKERS)
_TOPICS = {name: _phrase_pattern(lexicon) for name, lexicon in _TOPIC_LEXICONS.items()}


def _per_100_words(count: float, n_words: int) -> float:
    """Density per 100 words, with a floor of 20 words so one-liners are not over-weighted."""
    return 100.0 * count / max(n_words, 20)


def measure(text: str) -> dict[str, float]:
    """All attributes of one reply, each in ``[0, 1]`` (see the module docstring)."""
    ws = words(text)
    n_words = len(ws)
    lowered = text.lower()
    lines = [line for line in text.splitlines() if line.strip()]
    exclamations = text.count("!")
    emoji = len(_EMOJI.findall(text))

    formal = len(_FORMAL.findall(lowered))
    informal = len(_INFORMAL.findall(lowered)) + len(_CONTRACTION.findall(text)) + exclamations + emoji
    warm = len(_WARM.findall(lowered)) + exclamations + emoji
    examples = len(_EXAMPLES.findall(lowered)) + len(_CODE_BLOCK.findall(text)) // 2

    values = {
        "length": min(1.0, math.log1p(n_words) / math.log1p(LENGTH_SATURATION_WORDS)),
        "structure": (sum(bool(_LIST_ITEM.match(line)) for line in lines) / len(lines)) if lines else 0.0,
        "formality": 1.0 / (1.0 + math.exp(-_per_100_words(formal - informal, n_words) / 3.0)),
        "warmth": 1.0 - math.exp(-_per_100_words(warm, n_words) / 4.0),
        "questions": min(len(_QUESTION.findall(text)), 2) / 2.0,
        "examples": min(examples, 2) / 2.0,
        "reading_level": min(max(flesch_kincaid_grade(text), 0.0), MAX_GRADE) / MAX_GRADE,
    }
    for name, pattern in _TOPICS.items():
        values[name] = min(len(pattern.findall(lowered)), 3) / 3.0
    return {name: values[name] for name in ATTRIBUTE_NAMES}


def attribute_vector(text: str) -> np.ndarray:
    """:func:`measure` as a float vector in :data:`ATTRIBUTE_NAMES` order."""
    values = measure(text)
    return np.array([values[name] for name in ATTRIBUTE_NAMES], dtype=np.float64)


def attribute_matrix(texts: Sequence[str]) -> np.ndarray:
    """Attributes of many replies, shape ``(len(texts), len(ATTRIBUTE_NAMES))``.

    Scoring a whole evaluation set at once lets every user's utility be one matrix product.
    """
    if len(texts) == 0:
        return np.zeros((0, len(ATTRIBUTE_NAMES)), dtype=np.float64)
    return np.stack([attribute_vector(t) for t in texts])
