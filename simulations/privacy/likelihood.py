"""How likely a model finds a reply: the one measurement every attack here is built on.

Membership inference compares a reply's log-likelihood under the attacked adapter with
its likelihood under the base model (or shadow adapters), the canary test ranks secrets
by it, and the inversion attack reads which tokens an update made likelier. All of them
score ``(prompt, reply)`` exactly as the trainer encodes it (chat template, reply tokens
plus end-of-turn), so a text counts as "seen in training" in the same units it was
trained in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedpal.client.dpo import encode_reply, pad_rows, token_logprobs
from fedpal.common.adapters import activate
from fedpal.common.generation import chat_input_ids

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

BATCH = 16
MAX_LENGTH = 128


@dataclass(frozen=True)
class Scored:
    """Summed reply log-probability (nats) and the number of reply tokens, per text."""

    logprob: np.ndarray
    tokens: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """Per-token log-probability: comparable across replies of different lengths."""
        return self.logprob / np.maximum(self.tokens, 1)


def reply_logprobs(
    model: "PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: Sequence[tuple[str, str]],
    active: Sequence[str] = (),
    batch_size: int = BATCH,
    max_length: int = MAX_LENGTH,
) -> Scored:
    """Log-probability of each ``(prompt, reply)``'s reply under ``model`` with ``active`` adapters.

    ``active`` empty scores the base model (the adapters switched off). The model is left
    in eval mode with ``active`` on; the trainer sets its own adapters before it trains.
    """
    import torch

    encoded = [
        encode_reply(tokenizer, chat_input_ids(tokenizer, prompt, None), reply, max_length) for prompt, reply in texts
    ]
    device = next(model.parameters()).device
    model.eval()
    sums, counts = [], []
    if active:
        activate(model, active=list(active), trainable=None)
    switched_off = model.disable_adapter() if not active else contextlib.nullcontext()
    with torch.no_grad(), switched_off:
        for start in range(0, len(encoded), batch_size):
            ids, mask, labels = pad_rows(encoded[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            picked, used = token_logprobs(logits, labels.to(device))
            sums.append(picked.sum(dim=-1).cpu().numpy())
            counts.append(used.sum(dim=-1).cpu().numpy())
    if not sums:
        return Scored(np.zeros(0), np.zeros(0, dtype=int))
    return Scored(np.concatenate(sums).astype(np.float64), np.concatenate(counts).astype(int))
