"""Single-preference users for the style suite: what each wants, how their edits look, how to tell.

Each user has one preference of a different kind (structure, length, tone, engagement,
content, format). Their memory holds ~40 pairs built from the base model's own replies:
the plain reply is rejected, the same reply edited toward the preference is chosen, the
way a user who corrects the assistant's answer would make them. ``shows(reply)`` tells
whether a reply has the preference; the suite compares how often the base model's and
the personalized model's replies to unseen prompts show it.

The detectors are deliberately simple and written down here, so anyone can check a
reported rate against the replies the suite saves.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d{1,2}[.)]\s")
_EXAMPLE = re.compile(r"\b(for example|for instance|e\.g\.)", re.IGNORECASE)

WARM_OPENERS = (
    "Great question!",
    "Oh, I love this one!",
    "Happy to help with this!",
    "What a fun thing to ask!",
    "Ooh, good one!",
    "Glad you asked!",
)
FOLLOW_UPS = (
    "Would you like more detail on any of these?",
    "What have you tried so far?",
    "Which part would you like to start with?",
    "Does that fit what you had in mind?",
    "Want me to go deeper on one of these?",
    "How does that sound to you?",
)


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (line breaks end sentences too), list markers removed."""
    parts = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
    return [re.sub(r"^(?:[-*•]|\d{1,2}[.)])\s+", "", s) for s in parts]


def complete(text: str) -> str:
    """``text`` cut after its last full sentence (a reply stopped at the token limit ends mid-sentence)."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]].strip() if ends else text.strip()


def as_bullets(text: str) -> str:
    """The sentences of ``text`` as a plain dash list (the structure user's edit): markdown emphasis
    is dropped and so are fragments without two words (a list's "1." split off its item), as a
    person would. (Kept, "- **Steps:**" items taught the model to open a line with "- **" and,
    on a few prompts, to repeat "- **-" to the token limit.)"""
    plain = [re.sub(r"[*_]{2,}|`", "", s).strip() for s in sentences(text)]
    items = [s for s in plain if len(re.findall(r"[^\W\d_]{2,}", s)) >= 2]
    if len(items) < 2:  # one long sentence (or a random model's words): three chunks of words
        words = text.split()
        third = max(len(words) // 3, 1)
        items = [" ".join(words[i : i + third]) for i in range(0, len(words), third)]
    return "\n".join(f"- {s}" for s in items)


def is_bulleted(text: str) -> bool:
    """At least two lines that start with a dash, star or bullet sign."""
    return len(_BULLET.findall(text)) >= 2


def word_count(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _first_sentences(text: str, limit: int = 25) -> str:
    out: list[str] = []
    for sentence in sentences(text):
        if out and word_count(" ".join(out + [sentence])) > limit:
            break
        out.append(sentence)
    short = " ".join(out) if out else text
    words = short.split()
    return short if len(words) <= limit else " ".join(words[:limit]).rstrip(",;:") + "."


@dataclass(frozen=True)
class StyleUser:
    """One preference: how the user edits a reply toward it, and how to tell a reply has it.

    ``edit(prompt, reply, extra, rng)``: ``extra`` is the base model's answer to
    :attr:`extra_request` for that prompt when the edit needs new content, else "".
    """

    name: str
    kind: str
    wants: str
    edit: Callable[[str, str, str, random.Random], str]
    shows: Callable[[str], bool]
    extra_request: str = ""


STYLE_USERS: tuple[StyleUser, ...] = (
    StyleUser(
        "bullets",
        "structure",
        "answers as a bulleted list",
        edit=lambda prompt, reply, extra, rng: as_bullets(complete(reply)),
        shows=is_bulleted,
    ),
    StyleUser(
        "concise",
        "length",
        "answers of at most 30 words",
        edit=lambda prompt, reply, extra, rng: _first_sentences(complete(reply)),
        shows=lambda reply: 0 < word_count(reply) <= 30,
    ),
    StyleUser(
        "warm",
        "tone",
        "a warm, enthusiastic opening",
        edit=lambda prompt, reply, extra, rng: f"{rng.choice(WARM_OPENERS)} {complete(reply)}",
        shows=lambda reply: "!" in (sentences(reply) or [""])[0],
    ),
    StyleUser(
        "question",
        "engagement",
        "a follow-up question (asked at the end)",
        edit=lambda prompt, reply, extra, rng: _then(complete(reply), rng.choice(FOLLOW_UPS)),
        shows=lambda reply: any(sentence.endswith("?") for sentence in sentences(reply)),
    ),
    StyleUser(
        "example",
        "content",
        'a concrete example right after the main point ("For example, ...")',
        edit=lambda prompt, reply, extra, rng: _example_second(complete(reply), extra),
        shows=lambda reply: bool(_EXAMPLE.search(reply)),
        extra_request="Give one short, concrete example for this, in one sentence.",
    ),
    StyleUser(
        "summary",
        "format",
        'a one-line summary first ("In short: ...")',
        edit=lambda prompt, reply, extra, rng: _summary_first(complete(reply)),
        shows=lambda reply: reply.lstrip().lower().startswith("in short"),
    ),
)
"""Six users, six kinds of preference."""

STYLE_USERS_BY_NAME = {user.name: user for user in STYLE_USERS}


def _split_first(text: str) -> tuple[str, str]:
    """The first sentence (or line) of ``text`` and the rest as written, lists and line breaks kept:
    the edits below add to a reply the way a person would, without re-flowing it."""
    end = re.search(r"[.!?](?=\s)|\n", text)
    if end is None:
        return text.strip(), ""
    return text[: end.end()].strip(), text[end.end() :].strip(" ")


def _then(text: str, addition: str) -> str:
    """``addition`` after ``text``: on its own paragraph after a list, else in the same one."""
    return f"{text}\n\n{addition}" if "\n" in text else f"{text} {addition}"


def _example_second(text: str, extra: str) -> str:
    """The main point, then "For example, <the base model's example>", then the rest."""
    first, rest = _split_first(text)
    example = _lower_first(_first_sentences(complete(extra) or extra, 30)).rstrip(".") + "."
    return f"{first} For example, {example}" + (f" {rest}" if rest else "")


def _summary_first(text: str) -> str:
    """ "In short: <the first sentence>", then the rest of the reply (nothing said twice)."""
    first, rest = _split_first(text)
    if not first:
        return text
    return f"In short: {first}" + (f"\n\n{rest.strip()}" if rest.strip() else "")


def _lower_first(text: str) -> str:
    text = text.strip()
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text
