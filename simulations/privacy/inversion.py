"""Update inversion by an honest-but-curious server: which tokens did this client train on?

Without SecAgg+ the server sees every client's shared-adapter update; with it, only the
sum over a round's clients. Gradient-inversion attacks that solve for the input need the
per-example gradient of one step; a LoRA update is many DPO/SFT steps over many pairs,
with B alone under FFA-LoRA, so inverting the optimisation is hopeless. What the server
does have is the base model and the global adapter it sent, which is enough to run the
model before and after the update. Whatever the update taught shows up as tokens the
updated model finds likelier than the sent one, in any context, including public probes
that share nothing with the client's prompts but the chat template.

That is the differential score of Zanella-Béguelin et al. (CCS 2020, "Analyzing
Information Leakage of Updates to Natural Language Models"): for vocabulary token v,
``mean over probe positions of log p_after(v | ctx) - log p_before(v | ctx)``. The top of
that ranking is the attack's guess of the client's tokens, and greedily extending a probe
with the token of highest differential score (their differential-score search, beam
width 1) reads out text the update favours. It needs nothing about the update's origin,
so the same call attacks one client's update or the sum a SecAgg+ server sees.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedpal.common.adapters import activate, adapter_to_arrays, arrays_to_adapter
from fedpal.common.errors import FedpalError
from fedpal.common.generation import chat_input_ids

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Inversion:
    """What the attack recovered: token ids ranked by differential score, their scores, and text."""

    token_ids: tuple[int, ...]
    scores: tuple[float, ...]
    text: str


@dataclass(frozen=True)
class InversionScore:
    """How much of the trained replies the attack recovered (see :func:`score_inversion`)."""

    token_recall: float
    token_precision: float
    rouge1: float
    chance_precision: float

    def to_dict(self) -> dict:
        return asdict(self)


def _special_ids(tokenizer: "PreTrainedTokenizerBase") -> set[int]:
    return set(tokenizer.all_special_ids)


def _next_token_logprobs(model: "PeftModel", contexts: Sequence[Sequence[int]], pad: int) -> "torch.Tensor":
    """Log-probabilities of the next token after each context, shape ``(len(contexts), vocab)``.

    One right-padded batch: attention is causal, so padding after a context's last token
    cannot change the prediction read there.
    """
    import torch

    device = next(model.parameters()).device
    width = max(len(context) for context in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for row, context in enumerate(contexts):
        ids[row, : len(context)] = torch.tensor(list(context))
        mask[row, : len(context)] = 1
    last = torch.tensor([len(context) - 1 for context in contexts])
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    picked = logits[torch.arange(len(contexts)), last.to(device)]
    return torch.log_softmax(picked.float(), dim=-1).cpu()


def _differential(
    model: "PeftModel",
    adapter: str,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    parts: str,
    contexts: Sequence[Sequence[int]],
    pad: int,
) -> np.ndarray:
    """log p_after - log p_before of every vocabulary token after each context, ``(contexts, vocab)``."""
    arrays_to_adapter(model, adapter, before, parts)
    old = _next_token_logprobs(model, contexts, pad)
    arrays_to_adapter(model, adapter, after, parts)
    new = _next_token_logprobs(model, contexts, pad)
    return (new - old).numpy().astype(np.float64)


def invert_update(
    model: "PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    adapter: str,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    parts: str,
    probes: Sequence[str],
    top_k: int,
    text_tokens: int = 32,
) -> Inversion:
    """Recover the tokens (and some text) an update made likelier, by its differential score.

    Parameters
    ----------
    model, tokenizer : the base model with fedpal's adapters, as the server holds it.
    adapter : the adapter the update is for (``"shared"``).
    before, after : the adapter as sent (the global one) and with the update applied
        (``global + update``; for SecAgg+, ``global + sum of updates``), as named arrays.
    parts : ``"B"`` under FFA-LoRA (A is the common fixed one), ``"AB"`` otherwise.
    probes : public user prompts, chat-templated; each contributes the position where the
        reply starts, and the first one seeds the text read-out.
    top_k : how many tokens to return.
    text_tokens : length of the greedy differential-score read-out.

    Returns
    -------
    Inversion
        ``token_ids`` the ``top_k`` non-special tokens of highest mean differential
        score over the probes (Zanella-Béguelin et al., CCS 2020), best first; ``text``
        the greedy read-out from the first probe (special tokens are never chosen: the
        end-of-turn token every reply is trained on would end it at once).

    The adapter's weights are put back as they were; the model is left in eval mode with
    only ``adapter`` active. A zero update is refused: its differential score is zero
    everywhere, so any "recovered" tokens would be arbitrary.
    """
    if not probes:
        raise FedpalError("update inversion needs at least one probe prompt")
    if top_k < 1:
        raise FedpalError(f"top_k must be at least 1, not {top_k}")
    if set(before) != set(after):
        raise FedpalError("the adapter before and after the update have different tensors")
    if all(np.array_equal(before[name], after[name]) for name in before):
        raise FedpalError("the update is zero: it carries nothing to invert")
    special = sorted(_special_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    original = adapter_to_arrays(model, adapter, "AB")
    model.eval()
    activate(model, active=[adapter], trainable=None)
    try:
        contexts = [chat_input_ids(tokenizer, probe) for probe in probes]
        mean = _differential(model, adapter, before, after, parts, contexts, pad).mean(axis=0)
        mean[special] = -np.inf
        ranked = np.argsort(-mean, kind="stable")[:top_k]
        text_ids: list[int] = []
        for _ in range(text_tokens):
            step = _differential(model, adapter, before, after, parts, [contexts[0] + text_ids], pad)[0]
            step[special] = -np.inf
            text_ids.append(int(np.argmax(step)))
    finally:
        arrays_to_adapter(model, adapter, original, "AB")
    return Inversion(
        token_ids=tuple(int(t) for t in ranked),
        scores=tuple(float(mean[t]) for t in ranked),
        text=tokenizer.decode(text_ids, skip_special_tokens=True),
    )


def trained_token_ids(tokenizer: "PreTrainedTokenizerBase", replies: Sequence[str]) -> set[int]:
    """Distinct non-special token ids of ``replies``, tokenized as the trainer does (no specials added)."""
    special = _special_ids(tokenizer)
    return {int(t) for reply in replies for t in tokenizer(reply, add_special_tokens=False)["input_ids"]} - special


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge1_f1(candidate: str, reference: str) -> float:
    """ROUGE-1 F1 (Lin, 2004): unigram overlap of lowercased words, clipped by count."""
    cand, ref = Counter(_words(candidate)), Counter(_words(reference))
    overlap = sum((cand & ref).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(cand.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def score_inversion(
    inversion: Inversion, trained_replies: Sequence[str], tokenizer: "PreTrainedTokenizerBase"
) -> InversionScore:
    """Precision and recall of the recovered tokens against the replies the client trained on.

    The trained tokens T are the distinct non-special token ids of ``trained_replies``;
    the recovered set R is all of ``inversion.token_ids`` (K = ``top_k`` of the attack).
    ``token_precision`` = |R & T| / K, ``token_recall`` = |R & T| / |T|, and
    ``chance_precision`` = |T| / V, the expected precision of K distinct non-special
    tokens drawn uniformly from the V non-special tokens of the vocabulary. ``rouge1`` is
    the ROUGE-1 F1 of ``inversion.text`` against the best-matching trained reply.
    """
    trained = trained_token_ids(tokenizer, trained_replies)
    if not trained:
        raise FedpalError("the trained replies have no tokens to recover")
    recovered = set(inversion.token_ids)
    if not recovered:
        raise FedpalError("the inversion recovered no tokens")
    hits = len(recovered & trained)
    vocabulary = len(tokenizer) - len(_special_ids(tokenizer))
    return InversionScore(
        token_recall=hits / len(trained),
        token_precision=hits / len(recovered),
        rouge1=max(rouge1_f1(inversion.text, reply) for reply in trained_replies),
        chance_precision=len(trained) / vocabulary,
    )
