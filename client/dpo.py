"""DPO (sigmoid) loss and the sequence log-probability helpers it needs.

Kept free of any training state so the maths can be checked on its own: the loss against
hand-computed values and against the formula of Rafailov et al. (2023) on random inputs.

:func:`pack_sequences` lays a batch out for one forward pass the way the trainer scores it:
a pair's chosen and rejected replies share one row behind one copy of their prompt (each
reply sees the prompt and itself, never the other reply, at the positions it would have on
its own), and only the positions that predict a reply token are scored. On SmolLM2 a
prompt (with its chat template) is about as long as a reply, so this runs about a quarter
fewer tokens through the model than one row per reply, forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

IGNORE = -100
Encoded = tuple[list[int], list[int]]
"""Token ids and labels of one sequence (``IGNORE`` where a token is not scored), as ``encode_reply`` makes them."""


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


@dataclass(frozen=True)
class PackedBatch:
    """Sequences laid out in rows for one forward pass, and where each scored token comes from.

    ``attention`` is a ``(rows, width)`` padding mask when every row holds one sequence
    (``positions`` is then ``None``), else a ``(rows, 1, width, width)`` boolean mask, True
    where a query position may attend a key position, with explicit ``positions``. Scored
    token ``k`` is ``target[k]``, predicted by the logits at ``(source_row[k],
    source_pos[k])``, and belongs to input sequence ``sequence[k]``.
    """

    ids: "torch.Tensor"
    attention: "torch.Tensor"
    positions: "torch.Tensor | None"
    source_row: "torch.Tensor"
    source_pos: "torch.Tensor"
    target: "torch.Tensor"
    sequence: "torch.Tensor"
    n_sequences: int

    @property
    def first_source(self) -> int:
        """The first position whose logits are needed (0 when nothing is scored)."""
        return int(self.source_pos.min()) if len(self.source_pos) else 0

    def to(self, device) -> "PackedBatch":
        move = {
            name: getattr(self, name).to(device)
            for name in ("ids", "attention", "positions", "source_row", "source_pos", "target", "sequence")
            if getattr(self, name) is not None
        }
        return replace(self, **move)


def _split_prompt(encoded: Encoded) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, reply ids, reply labels): the prompt is the leading unscored part, at least
    one token (a first token has nothing to predict it, whatever its label)."""
    ids, labels = encoded
    k = 0
    while k < len(labels) and labels[k] == IGNORE:
        k += 1
    k = min(max(k, 1), len(ids))
    return list(ids[:k]), list(ids[k:]), list(labels[k:])


def pack_sequences(
    groups: "Sequence[Sequence[Encoded]]", pad_id: int | None, share_prompts: bool = True
) -> PackedBatch:
    """Rows for a forward pass over ``groups`` of sequences (a pair's chosen and rejected, say).

    With ``share_prompts``, the sequences of a group whose prompts are identical share one
    row: the prompt once, then each reply, every reply attending to the prompt and to its
    own earlier tokens only, and numbered from the prompt's end as if it were alone; so each
    reply's log-probabilities are those of a forward pass over prompt + reply. Otherwise (or
    when the prompts differ, e.g. truncated for replies of different lengths) each sequence
    gets its own row. Rows are right-padded to the longest. Sequences are numbered in the
    order they come, group by group.
    """
    import torch

    rows: list[tuple[list[int], list[int], list[int]]] = []  # ids, positions, segment (-1: prompt)
    scored: list[tuple[int, int, int, int]] = []  # row, source position, target, sequence
    seq = 0
    for group in groups:
        split = [_split_prompt(encoded) for encoded in group]
        if share_prompts and len(split) > 1 and all(prompt == split[0][0] for prompt, _, _ in split):
            layouts = [(split[0][0], [(reply, labels) for _, reply, labels in split])]
        else:
            layouts = [(prompt, [(reply, labels)]) for prompt, reply, labels in split]
        for prompt, replies in layouts:
            row = len(rows)
            ids, positions, segments = list(prompt), list(range(len(prompt))), [-1] * len(prompt)
            for j, (reply, labels) in enumerate(replies):
                start = len(ids)
                for t, label in enumerate(labels):
                    if label != IGNORE:
                        scored.append((row, len(prompt) - 1 if t == 0 else start + t - 1, label, seq))
                ids += reply
                positions += range(len(prompt), len(prompt) + len(reply))
                segments += [j] * len(reply)
                seq += 1
            rows.append((ids, positions, segments))
    width = max([len(ids) for ids, _, _ in rows] + [1])
    n = len(rows)
    ids = torch.full((n, width), pad_id if pad_id is not None else 0, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), -2, dtype=torch.long)  # -2: padding
    for i, (row_ids, row_positions, row_segments) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        positions[i, : len(row_ids)] = torch.tensor(row_positions, dtype=torch.long)
        segments[i, : len(row_ids)] = torch.tensor(row_segments, dtype=torch.long)
    if share_prompts:
        # causal, and a key is the prompt or in the query's own reply; padding sees only
        # padding and the prompt (never an empty row: sdpa would return NaN there)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        same = segments[:, :, None] == segments[:, None, :]
        attention = (causal & (same | (segments[:, None, :] == -1))).unsqueeze(1)
        position_ids = positions
    else:
        attention, position_ids = (segments != -2).long(), None
    index = torch.tensor(scored, dtype=torch.long).reshape(-1, 4)
    return PackedBatch(
        ids=ids,
        attention=attention,
        positions=position_ids,
        source_row=index[:, 0],
        source_pos=index[:, 1],
        target=index[:, 2],
        sequence=index[:, 3],
        n_sequences=seq,
    )


def packed_logprobs(
    logits: "torch.Tensor", batch: PackedBatch, offset: int = 0
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Summed log-probability of each sequence's scored tokens and how many there are.

    ``logits`` are the model's over ``batch``'s rows from position ``offset`` on
    (``logits_to_keep``). ``log_softmax`` runs in fp32 on the scored positions only.
    """
    import torch

    picked_logits = logits[batch.source_row, batch.source_pos - offset].float()
    picked = torch.log_softmax(picked_logits, dim=-1).gather(1, batch.target.unsqueeze(1)).squeeze(1)
    sums = torch.zeros(batch.n_sequences, dtype=picked.dtype, device=picked.device).index_add(0, batch.sequence, picked)
    counts = torch.bincount(batch.sequence, minlength=batch.n_sequences)
    return sums, counts
