"""Plain PyTorch generation with the base model's chat template.

The fast path is the ONNX runtime in ``fedpal.client``; this one is the reference it is
checked against and the fallback for health checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedpal.common.errors import FedpalError

if TYPE_CHECKING:
    from fedpal.common.models import BaseModel

RETRIEVAL_HEADER = "The user has stated these preferences; follow them when they apply:"
PLACEMENTS = ("prompt", "system")


def chat_input_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as a user turn, ready for the assistant's reply."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def with_preferences(system: str | None, preferences: Sequence[str]) -> str | None:
    """A system prompt that lists ``preferences`` after any existing system text."""
    if not preferences:
        return system
    listed = "\n".join(f"- {p}" for p in preferences)
    block = f"{RETRIEVAL_HEADER}\n{listed}"
    return f"{system}\n\n{block}" if system else block


def place_preferences(
    prompt: str, system: str | None, preferences: Sequence[str], where: str = "prompt"
) -> tuple[str, str | None]:
    """The (prompt, system message) the model sees with the user's retrieved preferences.

    ``prompt`` appends them after the request, as a user would say them; ``system`` lists
    them in the system message. Measured on SmolLM2-135M-Instruct (8 simulated users x 10
    held-out prompts, greedy): in the prompt the replies beat the plain ones 55% of the
    time, in the system message 44%: small models follow the user turn, and their chat
    template's own system message is replaced by ours.
    """
    if where not in PLACEMENTS:
        raise FedpalError(f"preferences go in the {' or the '.join(PLACEMENTS)}, not '{where}'")
    if not preferences:
        return prompt, system
    if where == "system":
        return prompt, with_preferences(system, preferences)
    return f"{prompt}\n\n{' '.join(p.strip() for p in preferences)}", system


def generate_reply(
    base: "BaseModel", prompt: str, max_new_tokens: int = 64, system: str | None = None, model=None
) -> tuple[str, int]:
    """Greedy reply to ``prompt``; ``model`` overrides ``base.model`` (e.g. a peft wrapper)."""
    import torch

    net = model if model is not None else base.model
    ids = torch.tensor([chat_input_ids(base.tokenizer, prompt, system)], device=base.device)
    with torch.no_grad():
        out = net.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=base.tokenizer.pad_token_id,
            eos_token_id=base.tokenizer.eos_token_id,
        )
    new = out[0, ids.shape[1] :]
    return base.tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.shape[0])


def generate_replies(
    base: "BaseModel", model, prompts: Sequence[tuple[str, str | None]], max_new_tokens: int = 64, batch_size: int = 8
) -> list[tuple[str, list[int]]]:
    """Greedy replies (text, new token ids) to many (prompt, system) pairs, in left-padded batches.

    On a CPU a batch of eight costs little more than one reply, so checks that need several
    replies (the degeneration guard, the style benchmark) batch them.
    """
    import torch

    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    out: list[tuple[str, list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [chat_input_ids(tok, prompt, system) for prompt, system in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=base.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=base.device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        for row in generated[:, width:].tolist():
            new = row[: row.index(eos)] if eos in row else row
            out.append((tok.decode(new, skip_special_tokens=True).strip(), new))
    return out


def reply_nll(
    base: "BaseModel", model, prompts: Sequence[tuple[str, str | None]], replies: Sequence[list[int]]
) -> float:
    """Mean negative log-likelihood per token of ``replies`` (token ids) after their prompts, under ``model``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for (prompt, system), reply in zip(prompts, replies):
            if not reply:
                continue
            context = chat_input_ids(base.tokenizer, prompt, system)
            ids = torch.tensor([context + list(reply)], device=base.device)
            logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
            picked = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(context) :, None])
            total -= float(picked.sum())
            count += len(reply)
    return total / count if count else 0.0
