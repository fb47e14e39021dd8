"""Training settings that fit the client's device: sequence length, batch size, LoRA rank.

User machines range from a laptop CPU to a gaming GPU. A fixed batch either runs out of
memory on the small ones or wastes the big ones, so the trainer asks this profile, which
estimates the memory one training token needs and picks the largest setting that fits in
a safe share of what is free now. Every field can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LENGTHS = (1024, 512, 384, 256, 128)
BATCHES = (32, 16, 8, 4, 2, 1)
# Share of free memory the trainer may plan to use: the OS, the browser and the runtime
# keep the rest.
SAFE_SHARE = {"cuda": 0.7, "cpu": 0.4}
# On a CPU, time rather than memory is the limit: a bigger batch or a longer sequence only
# makes a step slower. 4 x 256 was measured on the default model (2 cores, style suite):
# a preference pair of ~128-token replies fits, and 24 steps took ~3 minutes, where the
# 2 x 512 this profile chose before took 2.5-6 minutes per user.
CPU_MAX_BATCH = 4
CPU_MAX_LENGTH = 256


@dataclass(frozen=True)
class DeviceProfile:
    """What the profile found and what it suggests (``reason`` says which limit decided)."""

    device: str
    free_bytes: int
    max_length: int
    batch_size: int
    reason: str


def free_memory(device: "torch.device") -> int:
    """Bytes free now: ``cuda.mem_get_info`` on a GPU, psutil's available RAM on a CPU."""
    import psutil
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def bytes_per_token(model) -> int:
    """Rough training memory per token: activations kept for backward plus logits.

    Per layer a Llama block keeps about 34 hidden-sized values per token for backward
    (attention and MLP inputs, norms, projections); the output layer keeps logits,
    their log-softmax and its gradient (3 x vocab). fp32, 4 bytes each. It is an
    estimate for choosing a tier, not an accounting.
    """
    config = model.config
    hidden = getattr(config, "hidden_size", 768)
    layers = getattr(config, "num_hidden_layers", 12)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    vocab = getattr(config, "vocab_size", 32000)
    per_layer = 34 * hidden + 3 * intermediate
    return 4 * (layers * per_layer + 3 * vocab)


def model_bytes(model) -> int:
    """Bytes held by the model's parameters (they stay resident while training)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def profile_device(
    model,
    device: "torch.device | str | None" = None,
    *,
    sequences_per_example: int = 2,
    max_length: int | None = None,
    batch_size: int | None = None,
    free_bytes: int | None = None,
) -> DeviceProfile:
    """Largest (max_length, batch_size) whose estimated memory fits.

    ``sequences_per_example`` is 2 for DPO (chosen and rejected share a forward pass).
    Explicit ``max_length``/``batch_size`` win over the estimate; ``free_bytes``
    replaces the measurement (for planning another machine, and for tests).
    """
    import torch

    from fedpal.common.models import resolve_device

    target = device if isinstance(device, torch.device) else resolve_device(device)
    kind = "cuda" if target.type == "cuda" else "cpu"
    free = free_memory(target) if free_bytes is None else int(free_bytes)
    resident = 0 if kind == "cuda" else model_bytes(model)
    budget = max(int(free * SAFE_SHARE[kind]) - resident, 0)
    per_token = bytes_per_token(model) * sequences_per_example

    lengths = [n for n in LENGTHS if kind == "cuda" or n <= CPU_MAX_LENGTH]
    batches = [b for b in BATCHES if kind == "cuda" or b <= CPU_MAX_BATCH]
    if max_length is not None:
        lengths = [max_length]
    if batch_size is not None:
        batches = [batch_size]
    chosen = None
    for length in lengths:
        for batch in batches:
            if batch * length * per_token <= budget:
                chosen = (length, batch)
                break
        if chosen:
            break
    if chosen is None:
        chosen = (lengths[-1], batches[-1])
        reason = f"memory: even {chosen[1]} x {chosen[0]} tokens may not fit in {budget >> 20} MiB"
    else:
        reason = f"memory: {budget >> 20} MiB planned for training"
        if kind == "cpu":
            reason += f"; cpu caps batch at {CPU_MAX_BATCH} and length at {CPU_MAX_LENGTH} for step time"
    return DeviceProfile(
        device=str(target),
        free_bytes=free,
        max_length=chosen[0],
        batch_size=chosen[1],
        reason=reason,
    )
