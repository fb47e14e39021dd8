"""``fedpal bench train``: the benchmark runs end to end, and the trainer's fast path it measures
(a pair's replies sharing one prompt row, log-probs only where a reply token is predicted)
gives the loss and gradients of the plain one-row-per-reply computation."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import fedpal, ok
from fedpal.client.dpo import IGNORE, dpo_loss, encode_reply, pack_sequences, packed_logprobs
from fedpal.client.trainer import LocalTrainer, TrainConfig, _batch_indices
from fedpal.common.adapters import SHARED, AdapterConfig, activate, attach_adapters
from fedpal.common.generation import chat_input_ids
from fedpal.common.types import PreferencePair, SFTExample
from fedpal.simulations.benchmarks.train import CONTENDERS, LABELS, Settings


def test_bench_train_quick_writes_the_table_and_figures(tmp_path):
    out, scratch = tmp_path / "bench", tmp_path / "tmp"
    scratch.mkdir()
    done = ok(fedpal("bench", "train", "--quick", "--out", str(out), passphrase=None, env={"TMPDIR": str(scratch)}))
    assert f"wrote {out / 'train.json'}" in " ".join(done.stdout.split())
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]  # torch's compile cache
    assert left == []  # TRL's output folders and cached reference log-probs are gone

    report = json.loads((out / "train.json").read_text())
    assert report["name"] == "train" and report["settings"]["quick"] is True
    assert report["command"] == "fedpal bench train --quick"
    repeats = Settings.of(quick=True).repeats
    assert report["settings"]["repeats"] == repeats >= 2
    for name in CONTENDERS:
        figures = report["figures"][name]
        rate = figures["pairs_per_s"]
        assert rate["n"] == repeats and figures["setup_s"]["n"] == figures["step_s"]["n"] == repeats
        assert 0 < rate["min"] <= rate["median"] <= rate["max"], (name, rate)
        assert figures["ratio_vs_trl"] == pytest.approx(
            rate["median"] / report["figures"]["trl"]["pairs_per_s"]["median"], rel=1e-2
        )
    assert report["figures"]["ratio_fedpal_vs_trl"] == report["figures"]["fedpal"]["ratio_vs_trl"]
    markdown = (out / "train.md").read_text()
    assert "| trainer | pairs/s | vs TRL DPOTrainer | setup s | per step s | last loss |" in markdown
    assert [row[0] for row in report["rows"]] == [LABELS[name] for name in CONTENDERS]
    for label in LABELS.values():
        assert f"| {label} |" in markdown


# --------------------------------------------- the packed path is the plain one


def _plain(model, encoded) -> tuple[torch.Tensor, int]:
    """Summed log-prob of one sequence's labelled tokens from its own full forward pass."""
    ids, labels = encoded
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    scored = targets != IGNORE
    logp = torch.log_softmax(logits[scored], dim=-1).gather(1, targets[scored].unsqueeze(1))
    return logp.sum(), int(scored.sum())


def _pairs() -> list[PreferencePair]:
    long_prompt = "please tell me " * 12  # truncated differently for the two replies below
    return [
        PreferencePair("Tell me about rivers?", "- water\n- fish\n- boats", "Water. Fish. Boats."),
        PreferencePair("hi", "a", "b"),
        PreferencePair("Name three colours please.", "red, green and blue", "- red\n- green\n- blue\n- and more"),
        PreferencePair(long_prompt, "short", "a much longer reply " * 4),
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("objective", ["dpo", "both"])
def test_packed_training_loss_and_gradients_match_one_row_per_reply(tiny_base, objective, attention):
    tiny_base.model.set_attn_implementation(attention)
    model = attach_adapters(tiny_base.model, AdapterConfig())
    with torch.no_grad():  # a non-zero adapter, so the policy is not the base model
        gen = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lora_B" in name and f".{SHARED}." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    pairs = _pairs()
    examples = [SFTExample("Say something kind.", "You are doing well."), SFTExample("hi", "hello there")]
    config = TrainConfig(objective=objective, batch_size=8, max_length=40, seed=5)
    trainer = LocalTrainer(tiny_base, model, config)
    assert trainer._shares_prompts
    encoded_pairs = trainer._encode_pairs(pairs)
    encoded_sft = trainer._encode_examples(examples) if objective == "both" else []
    # the long prompt is cut differently for its two replies: that pair cannot share a row
    assert encoded_pairs[3][0][0][:5] != encoded_pairs[3][1][0][:5]
    activate(model, active=[SHARED], trainable=SHARED)
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref_chosen, ref_rejected = -20 * torch.rand(len(pairs)), -20 * torch.rand(len(pairs))

    loss, margin = trainer._loss(0, encoded_pairs, encoded_sft, params, [], ref_chosen, ref_rejected)
    got = torch.autograd.grad(loss, [p for _, p in params])

    idx = _batch_indices(len(pairs), trainer.batch_size, config.seed, 0)
    chosen = [_plain(model, encoded_pairs[i][0]) for i in idx]
    rejected = [_plain(model, encoded_pairs[i][1]) for i in idx]
    out = dpo_loss(
        torch.stack([c for c, _ in chosen]),
        torch.stack([r for r, _ in rejected]),
        ref_chosen[idx],
        ref_rejected[idx],
        config.beta,
    )
    want = out.losses.mean()
    if objective == "both":
        sft = chosen + [_plain(model, e) for e in encoded_sft]
        want = want + config.sft_weight * -sum(s for s, _ in sft) / sum(n for _, n in sft)
    expected = torch.autograd.grad(want, [p for _, p in params])

    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert margin == pytest.approx(float(out.margins.mean()), abs=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_pack_sequences_shares_a_prompt_only_between_identical_prompts(tiny_base):
    tok = tiny_base.tokenizer
    prompt = chat_input_ids(tok, "Tell me about rivers?")
    chosen, rejected = encode_reply(tok, prompt, "- water", 64), encode_reply(tok, prompt, "Water.", 64)
    other = encode_reply(tok, chat_input_ids(tok, "hi"), "hello", 64)
    batch = pack_sequences([(chosen, rejected), (other,)], tok.pad_token_id)
    assert batch.ids.shape[0] == 2 and batch.n_sequences == 3
    width = len(prompt) + (len(chosen[0]) - len(prompt)) + (len(rejected[0]) - len(prompt))
    assert batch.ids.shape[1] == width
    start = len(chosen[0])  # the rejected reply's first token: it sees the prompt and itself, not the chosen reply
    assert batch.attention[0, 0, start, : len(prompt)].all()
    assert not batch.attention[0, 0, start, len(prompt) : start].any()
    assert batch.positions[0, start].item() == len(prompt)
    # each sequence scores exactly its labelled reply tokens, in the order given
    counts = torch.bincount(batch.sequence, minlength=3).tolist()
    assert counts == [sum(label != IGNORE for label in labels[1:]) for _, labels in (chosen, rejected, other)]
    alone = pack_sequences([(chosen, rejected), (other,)], tok.pad_token_id, share_prompts=False)
    assert alone.ids.shape[0] == 3 and alone.positions is None and alone.attention.dim() == 2
    with torch.no_grad():
        shared = packed_logprobs(
            tiny_base.model(input_ids=batch.ids, attention_mask=batch.attention, position_ids=batch.positions).logits,
            batch,
        )[0]
        separate = packed_logprobs(tiny_base.model(input_ids=alone.ids, attention_mask=alone.attention).logits, alone)[
            0
        ]
    torch.testing.assert_close(shared, separate, atol=1e-4, rtol=1e-5)
