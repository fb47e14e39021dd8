"""Issue 14, "chat keeps working": a chat session that stays open picks up the global adapter
a round saves into the home, on its next reply, without restarting.

The round's side is what the ClientApp does (``save_adapter`` of the shared adapter into
the home); the chat's side is one ``PersonalizedGenerator`` answering with
``generate_for``, as ``fedpal chat`` does for every line. Each reply is checked token for
token against PyTorch + peft with the adapters the home held at that moment.
"""

from __future__ import annotations

import torch

from fedpal.client.generator import DecodeOptions, PersonalizedGenerator
from fedpal.client.home import ClientHome
from fedpal.client.onnx_export import export_model
from fedpal.common.adapters import PERSONAL, SHARED, AdapterConfig, activate, attach_adapters, save_adapter
from fedpal.common.generation import chat_input_ids
from fedpal.common.models import load_base_model

PROMPT = "How should replies look?"
TOKENS = 16


def _randomize(model, adapter: str, seed: int) -> None:
    """Non-zero random weights for one adapter (a fresh LoRA has B = 0 and changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and f".{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _torch_greedy(model, ids: list[int]) -> list[int]:
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=TOKENS,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
        )
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_an_open_chat_answers_with_the_global_adapter_a_round_just_saved(tmp_path):
    generator = PersonalizedGenerator(export_model("tiny", precision="fp32"))
    base = load_base_model("tiny", device="cpu")
    model = attach_adapters(base.model, AdapterConfig(rank=8, alpha=16.0))
    _randomize(model, SHARED, 1)
    _randomize(model, PERSONAL, 2)
    home = ClientHome.at(tmp_path / "home")
    save_adapter(model, SHARED, home.adapter_dir(SHARED))
    save_adapter(model, PERSONAL, home.adapter_dir(PERSONAL))
    activate(model, [SHARED, PERSONAL])  # merge mode's default: shared + personal
    ids = chat_input_ids(base.tokenizer, PROMPT)
    options = DecodeOptions(max_new_tokens=TOKENS)

    before = generator.generate_for(home, PROMPT, options=options)
    assert before.mode == "merge" and list(before.token_ids) == _torch_greedy(model, ids)

    _randomize(model, SHARED, 3)  # a round brings a new global adapter and saves it into the home
    save_adapter(model, SHARED, home.adapter_dir(SHARED))
    activate(model, [SHARED, PERSONAL])
    after = generator.generate_for(home, PROMPT, options=options)
    assert list(after.token_ids) == _torch_greedy(model, ids)
    assert after.token_ids != before.token_ids  # the same open generator answered with the new adapter
