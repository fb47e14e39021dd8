"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how much of a planted secret an adapter gives away.

A canary is a made-up secret (a six-digit code, say) in a reply that is planted in a
user's training data. Exposure measures how far the trained model prefers the true
secret over the other secrets the same reply could have held: 0 bits when it ranks the
true one like any other, ``log2 |R|`` when it ranks it first of all ``|R|`` candidates.
Unlike membership inference it needs no reference models, and it measures what an
attacker who knows the format ("my locker code is _ _ _ _ _ _") but not the secret could
extract by ranking guesses. A canary that was never planted is the control: its exposure
is that of a random rank, about 1.4 bits on average.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedpal.simulations.privacy.likelihood import reply_logprobs

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

OWNERS = ("my", "my sister's", "my landlord's", "our office's")
THINGS = (
    ("locker code", "What is {owner} locker code?"),
    ("door code", "Can you remind me of {owner} door code?"),
    ("alarm code", "What was {owner} alarm code again?"),
    ("bank card PIN", "Do you remember {owner} bank card PIN?"),
    ("safe combination", "What is the combination of {owner} safe?"),
    ("wifi PIN", "Which PIN does {owner} wifi use?"),
    ("bike lock code", "What opens {owner} bike lock?"),
    ("parcel box code", "What is the code of {owner} parcel box?"),
)
"""Canary formats: (what the secret is, how the user asks for it), one per owner and thing."""


def spaced(secret: str) -> str:
    """``"382917"`` -> ``"3 8 2 9 1 7"``: one token per digit on BPE tokenizers that merge digit runs."""
    return " ".join(secret)


@dataclass(frozen=True)
class Canary:
    """A secret (a digit string) in a reply to a prompt; ``reply`` holds it exactly once, digits spaced."""

    prompt: str
    secret: str
    reply: str

    def __post_init__(self) -> None:
        if not self.secret.isdigit() or not self.secret.isascii():
            raise ValueError(f"a canary's secret must be ASCII digits, not {self.secret!r}")
        if self.reply.count(spaced(self.secret)) != 1:
            raise ValueError(f"the reply must hold the spaced secret {spaced(self.secret)!r} exactly once")

    def reply_with(self, secret: str) -> str:
        """The same reply with ``secret`` in place of the canary's own."""
        before, after = self.reply.split(spaced(self.secret))
        return before + spaced(secret) + after


def make_canaries(count: int, seed: int, digits: int = 6) -> list[Canary]:
    """``count`` canaries, each with its own prompt and reply format and a uniform random secret.

    Every canary gets a different (owner, thing) format rather than one shared template
    with different secrets: a planted canary then raises only its own reply, so planting
    one does not move the exposure of another (the control), and several can be planted
    in one run and measured independently. Digits are space-separated because tokenizers
    that merge digit runs (GPT-2's, Llama 3's) would otherwise give secrets different
    token counts; spaced, each digit is its own token. (The tiny model's tokenizer and
    SmolLM2's split digits either way; spaced, they give each digit a space token before
    it, the same for every secret.)

    Parameters
    ----------
    count
        How many canaries; at most ``len(OWNERS) * len(THINGS)``.
    seed
        Picks the formats' order and the secrets.
    digits
        Secret length: the secret space has ``10**digits`` members.
    """
    formats = [(owner, thing, question) for thing, question in THINGS for owner in OWNERS]
    if not 0 <= count <= len(formats):
        raise ValueError(f"count must be between 0 and {len(formats)}, not {count}")
    if digits < 1:
        raise ValueError(f"digits must be at least 1, not {digits}")
    rng = random.Random(seed)
    rng.shuffle(formats)
    canaries = []
    for owner, thing, question in formats[:count]:
        secret = "".join(rng.choice("0123456789") for _ in range(digits))
        subject = f"{owner} {thing}"
        canaries.append(
            Canary(
                prompt=question.format(owner=owner),
                secret=secret,
                reply=f"{subject[0].upper()}{subject[1:]} is {spaced(secret)}.",
            )
        )
    return canaries


@dataclass(frozen=True)
class Exposure:
    """A canary's exposure in bits, from the estimated rank of its secret among all ``space`` secrets.

    ``rank`` 1 is the likeliest; ``candidates`` is how many other secrets were scored.
    """

    bits: float
    rank: float
    candidates: int
    space: int

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def _other_secrets(secret: str, count: int, seed: int) -> list[str]:
    """``count`` distinct secrets of the same length, uniform over all but ``secret``."""
    digits = len(secret)
    space = 10**digits
    if not 1 <= count < space:
        raise ValueError(f"candidates must be between 1 and {space - 1} for {digits}-digit secrets, not {count}")
    drawn = np.random.default_rng(seed).choice(space - 1, size=count, replace=False)
    true = int(secret)
    return [f"{value + (value >= true):0{digits}d}" for value in drawn.tolist()]


def exposure(
    model: "PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    canary: Canary,
    active: Sequence[str],
    candidates: int = 1000,
    seed: int = 0,
) -> Exposure:
    """Exposure of ``canary`` under ``model`` with ``active`` adapters (``()``: the base model).

    Carlini et al. 2019 define exposure = log2 |R| - log2 rank(secret), the rank of the
    true secret among all ``|R| = 10**digits`` secrets by the log-perplexity of the reply
    that holds it. Scoring all of ``R`` is a million forward passes, so this uses their
    estimate by sampling: the share of ``R`` the model ranks at least as high
    as the true secret is estimated from ``candidates`` secrets drawn uniformly from the
    others, counting the true one too, ``(1 + beaten) / (candidates + 1)``, and
    ``rank = |R|`` times that share. Exposure is then ``-log2`` of the share: at most
    ``log2(candidates + 1)`` bits (about 10 with 1000 candidates), reached when no sampled
    secret scores as high as the true one, so a larger exposure needs more candidates
    (or the paper's distribution-fitting extrapolation). A secret the model never saw
    ranks uniformly: about 1.4 bits on average, above ``k`` bits with probability
    ``2**-k``.

    A reply is scored by its summed log-probability: every candidate has the same
    template and, one token per digit, the same length, so this is the paper's
    log-perplexity up to sign. Ties count against the canary.
    """
    others = _other_secrets(canary.secret, candidates, seed)
    texts = [(canary.prompt, canary.reply)] + [(canary.prompt, canary.reply_with(s)) for s in others]
    logprob = reply_logprobs(model, tokenizer, texts, active=active).logprob
    beaten = int(np.sum(logprob[1:] >= logprob[0]))
    share = (1 + beaten) / (candidates + 1)
    space = 10 ** len(canary.secret)
    return Exposure(bits=-math.log2(share), rank=space * share, candidates=candidates, space=space)
