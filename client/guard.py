"""The degeneration guard: a newly trained adapter must still write like a language model.

A preference loss can reach zero while the replies collapse: a user's pairs that differ
in one form (a dash, a greeting, a length) are separated fastest by repeating that form,
and the model ends up writing "- -- -- --" or one phrase until the token limit. Neither
the training loss nor the held-out preference accuracy sees this, because both score the
user's replies, never the model's own. So before an adapter is activated, the guard makes
the model answer a few probe prompts greedily with the current adapters and with the new
one, and compares the two sets of replies:

- *repetition*: the share of word 3-grams of a reply that repeat an earlier one;
- *distinct-2*: the share of a reply's word bigrams that are distinct (punctuation marks
  count as words, so "- -- --" repeats; a word over 16 letters counts as 4-letter pieces,
  so a collapse without spaces, "dddddddd...", repeats too);
- *length*: mean reply tokens, and how many replies run into the token limit;
- *base NLL*: the base model's negative log-likelihood per token of the replies, i.e. how
  unlike ordinary text they are, whatever adapter wrote them.

The new adapter is refused when any of them moves past its threshold (``GuardConfig``).
The thresholds are relative to the current replies, so a user's style (a list is more
repetitive than prose, a short reply shorter) moves them a little and a collapse a lot.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedpal.common.errors import FedpalError

if TYPE_CHECKING:
    from peft import PeftModel

    from fedpal.common.models import BaseModel

_WORD = re.compile(r"\w+|[^\w\s]")
LONG_WORD = 16

PROBE_PROMPTS = (
    "How can I make my mornings less rushed?",
    "What should I pack for a weekend hiking trip?",
    "Can you explain how a credit score works?",
    "Give me some tips for writing a clear email to my manager.",
    "How do I keep basil growing on a windowsill?",
    "What is a good way to start learning to code?",
)
"""Everyday prompts used when the user's own held-out prompts are too few."""
MEASURED_KEPT = 16
"""Measurements remembered per process (see ``DegenerationGuard.measure``)."""
_MEASURED: OrderedDict[tuple, tuple["Fluency", list[str]]] = OrderedDict()


@dataclass(frozen=True)
class GuardConfig:
    """When a freshly trained adapter counts as degenerate (each bound is against the current replies)."""

    probes: int = 8
    """How many prompts the replies are compared on (the user's held-out ones first)."""
    max_new_tokens: int = 64
    """Greedy tokens per probe reply."""
    max_repetition_rise: float = 0.1
    """Largest allowed rise of the mean repeated-3-gram share (0-1)."""
    max_distinct2_drop: float = 0.1
    """Largest allowed fall of the mean distinct-bigram share (0-1).

    Both bounds and the probe size were set on the default model (style suite, 2026-12-01):
    an "add an example" adapter that repeated itself on unseen prompts (repetition 0.12 ->
    0.39 over 36 replies of 128 tokens) read 0.04 -> 0.35 on 8 probes of 64 tokens but only
    0.04 -> 0.22 on 4 of 48, under the old 0.2 bound; a fluent bulleted-list adapter read
    0.06 -> 0.08 (distinct-2 0.89 -> 0.87). 8 x 64 costs ~8 s per measurement on 2 cores."""
    max_length_ratio: float = 2.5
    """Largest allowed ratio of mean reply tokens, new over current."""
    max_nll_rise: float = 1.5
    """Largest allowed rise of the base model's mean NLL per reply token (nats)."""

    def __post_init__(self) -> None:
        checks = [
            ("probes", self.probes >= 1, "at least 1"),
            ("max_new_tokens", self.max_new_tokens >= 8, "at least 8"),
            ("max_repetition_rise", 0 <= self.max_repetition_rise <= 1, "between 0 and 1"),
            ("max_distinct2_drop", 0 <= self.max_distinct2_drop <= 1, "between 0 and 1"),
            ("max_length_ratio", self.max_length_ratio >= 1, "at least 1"),
            ("max_nll_rise", self.max_nll_rise >= 0, "0 or more"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise FedpalError(f"guard setting {name}={getattr(self, name)!r} must be {want}")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: the units repetition is counted in."""
    units = []
    for unit in _WORD.findall(text.lower()):
        units += [unit[i : i + 4] for i in range(0, len(unit), 4)] if len(unit) > LONG_WORD else [unit]
    return units


def repetition(text: str, n: int = 3) -> float:
    """Share of the word ``n``-grams of ``text`` that already occurred earlier in it (0: none)."""
    grams = _ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct(text: str, n: int = 2) -> float:
    """Share of the word ``n``-grams of ``text`` that are distinct (1: no repeats, also for texts
    too short to have any)."""
    grams = _ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else 1.0


def _ngrams(units: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


@dataclass(frozen=True)
class Fluency:
    """How a set of replies reads: means over the replies."""

    repetition: float
    distinct2: float
    mean_tokens: float
    at_limit: float
    """Share of replies that ran into the token limit."""
    base_nll: float
    """The base model's NLL per reply token (nats)."""

    @classmethod
    def of(cls, texts: Sequence[str], token_counts: Sequence[int], limit: int, nll: float) -> "Fluency":
        """From the replies, their lengths in tokens, the token limit and their base NLL."""
        n = max(len(texts), 1)
        return cls(
            repetition=sum(map(repetition, texts)) / n,
            distinct2=sum(map(distinct, texts)) / n,
            mean_tokens=sum(token_counts) / n,
            at_limit=sum(c >= limit for c in token_counts) / n,
            base_nll=nll,
        )


@dataclass(frozen=True)
class GuardReport:
    """The guard's verdict on one adapter: the figures before and after, and why it was refused."""

    prompts: int
    before: Fluency
    after: Fluency
    reasons: tuple[str, ...]
    replies: tuple[str, ...]
    """The new adapter's probe replies (what a user would have seen)."""

    @property
    def degenerate(self) -> bool:
        return bool(self.reasons)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["degenerate"] = self.degenerate
        data["reasons"] = list(self.reasons)
        data["replies"] = list(self.replies)
        return data


def verdict(before: Fluency, after: Fluency, config: GuardConfig) -> tuple[str, ...]:
    """The thresholds ``after`` crosses against ``before``, in words (empty: it passes)."""
    reasons = []
    if after.repetition - before.repetition > config.max_repetition_rise:
        reasons.append(f"repetition {before.repetition:.2f} -> {after.repetition:.2f}")
    if before.distinct2 - after.distinct2 > config.max_distinct2_drop:
        reasons.append(f"distinct-2 {before.distinct2:.2f} -> {after.distinct2:.2f}")
    if after.mean_tokens > config.max_length_ratio * max(before.mean_tokens, 1.0):
        reasons.append(f"reply length {before.mean_tokens:.0f} -> {after.mean_tokens:.0f} tokens")
    if after.base_nll - before.base_nll > config.max_nll_rise:
        reasons.append(f"base-model NLL {before.base_nll:.2f} -> {after.base_nll:.2f} nats/token")
    return tuple(reasons)


class DegenerationGuard:
    """Greedy probe replies of one peft model under two adapter activations, compared."""

    def __init__(self, base: "BaseModel", model: "PeftModel", config: GuardConfig | None = None) -> None:
        self.base, self.model, self.config = base, model, config or GuardConfig()

    def probes(self, prompts: Sequence[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
        """The user's (prompt, system) pairs first, topped up with :data:`PROBE_PROMPTS`."""
        chosen = list(dict.fromkeys(prompts))[: self.config.probes]
        for prompt in PROBE_PROMPTS:
            if len(chosen) >= self.config.probes:
                break
            chosen.append((prompt, None))
        return chosen

    def measure(self, probes: Sequence[tuple[str, str | None]], active: Sequence[str]) -> tuple[Fluency, list[str]]:
        """Replies to ``probes`` with the adapters ``active`` (none: the base model), and their fluency.

        Greedy replies are a function of the weights, so a measurement is remembered under
        the active adapters' weights, the probes and the settings: the current adapters
        measured again (the next run of ``fedpal train``, a node serving several users of
        one round with the same global adapter, the simulator's users who start from the
        same weights) cost a hash instead of ~9 s of generation on 2 cores.
        """
        key = self._key(probes, active)
        if key in _MEASURED:
            _MEASURED.move_to_end(key)
            fluency, texts = _MEASURED[key]
            return fluency, list(texts)
        measured = self._measure(probes, active)
        _MEASURED[key] = measured
        while len(_MEASURED) > MEASURED_KEPT:
            _MEASURED.popitem(last=False)
        return measured[0], list(measured[1])

    def _key(self, probes: Sequence[tuple[str, str | None]], active: Sequence[str]) -> tuple:
        from fedpal.common.adapters import adapter_to_arrays

        digest = hashlib.sha256()
        for name in active:
            digest.update(repr(self.model.peft_config[name]).encode())
            for key, array in sorted(adapter_to_arrays(self.model, name).items()):
                digest.update(key.encode())
                digest.update(array.tobytes())
        return (id(self.model), str(self.base.path), tuple(probes), tuple(active), digest.hexdigest(), self.config)

    def _measure(self, probes: Sequence[tuple[str, str | None]], active: Sequence[str]) -> tuple[Fluency, list[str]]:
        from fedpal.common.adapters import activate
        from fedpal.common.generation import generate_replies, reply_nll

        self.model.eval()
        if active:
            activate(self.model, active=list(active), trainable=None)
            replies = generate_replies(self.base, self.model, probes, self.config.max_new_tokens)
        else:
            with self.model.disable_adapter():
                replies = generate_replies(self.base, self.model, probes, self.config.max_new_tokens)
        texts, ids = [text for text, _ in replies], [tokens for _, tokens in replies]
        with self.model.disable_adapter():
            nll = reply_nll(self.base, self.model, probes, ids)
        return Fluency.of(texts, list(map(len, ids)), self.config.max_new_tokens, nll), texts

    def compare(self, before: Fluency, probes: Sequence[tuple[str, str | None]], active: Sequence[str]) -> GuardReport:
        """The new activation's replies against the ``before`` figures (from :meth:`measure`)."""
        after, texts = self.measure(probes, active)
        return GuardReport(len(probes), before, after, verdict(before, after, self.config), tuple(texts))
