"""DPO (sigmoid) loss and the sequence log-probability helpers it needs.

Kept free of any training state so the maths can be checked on its own: the loss against
hand-computed values and against the formula of Rafailov et al. (2023) on random inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE = -100


@dataclass(frozen=True)
class DPOOutput:
    """Per-pair DPO loss and the implicit rewards ``beta * (log pi - log pi_ref)`` behind it."""

    losses: "torch.Tensor"
    chosen_rewards: "torch.Tensor"
    rejected_rewards: "torch.Tensor"

    @property
    def margins(self) -> "torch.Tensor":
        """Chosen minus rejected implicit reward: what DPO pushes up."""
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(
    policy_chosen: "torch.Tensor",
    policy_rejected: "torch.Tensor",
    reference_chosen: "torch.Tensor",
    reference_rejected: "torch.Tensor",
    beta: float,
) -> DPOOutput:
    """Sigmoid DPO loss ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` per pair.

    Arguments are summed log-probabilities of whole replies, one value per pair. The
    rewards are detached: they are for reporting, the loss carries the gradient.
    """
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def token_logprobs(logits: "torch.Tensor", labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Log-probability of each next token and the mask of tokens that count.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled ``IGNORE`` (the
    prompt and the padding) get probability 0 and mask 0. Returns two ``(batch, len - 1)``
    tensors. ``log_softmax`` runs in fp32 even under autocast: bf16 sums of many
    log-probabilities lose the small differences DPO trains on.
    """
    import torch

    targets = labels[:, 1:]
    mask = targets != IGNORE
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, 2, safe.unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logprobs(logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    """Summed log-probability of each row's labelled tokens (the reply), shape ``(batch,)``."""
    picked, _ = token_logprobs(logits, labels)
    return picked.sum(dim=-1)


def encode_reply(tokenizer, prompt_ids: list[int], reply: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of ``prompt_ids`` followed by ``reply`` and the end-of-turn token.

    Labels are ``IGNORE`` on the prompt so only the reply is scored. Too long: the prompt
    loses tokens from its start first (keeping at least half the budget when the reply is
    long), then the reply is cut at its end, so a long reply never pushes out the whole
    prompt.
    """
    reply_ids = list(tokenizer(reply, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        reply_ids.append(tokenizer.eos_token_id)
    prompt = list(prompt_ids)
    if len(prompt) + len(reply_ids) > max_length:
        keep_prompt = max(max_length - len(reply_ids), min(len(prompt), max_length // 2))
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt > 0 else []
        reply_ids = reply_ids[: max(max_length - len(prompt), 1)]
    ids = prompt + reply_ids
    labels = [IGNORE] * len(prompt) + reply_ids
    return ids, labels


def pad_rows(
    rows: "list[tuple[list[int], list[int]]]", pad_id: int | None
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Right-padded ids, attention mask and labels (``IGNORE`` on padding) of ``encode_reply`` rows."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, mask, labels
