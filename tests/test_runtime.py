"""Personalized decoding through the exported ONNX runtime, checked against PyTorch + peft.

All on the tiny model with real ONNX Runtime GenAI sessions; the slow test repeats the
parity check on the real default model.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedpal.client.generator import DecodeOptions, PersonalizedGenerator
from fedpal.client.home import ClientHome
from fedpal.client.onnx_adapters import convert_adapters, merged_parameters
from fedpal.client.onnx_export import ExportInfo, check_export, export_model, find_export
from fedpal.common.adapters import PERSONAL, SHARED, AdapterConfig, activate, attach_adapters, save_adapter
from fedpal.common.errors import FedpalError
from fedpal.common.generation import RETRIEVAL_HEADER, chat_input_ids, with_preferences
from fedpal.common.models import load_base_model

PROMPT = "Tell me about the weather in the mountains."
CONFIG = AdapterConfig(rank=8, alpha=16.0)


def _random_adapters(model, seed: int):
    """Give both adapters non-zero random weights (a fresh LoRA has B = 0 and changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def export() -> ExportInfo:
    return export_model("tiny", precision="fp32")


@pytest.fixture(scope="module")
def generator(export) -> PersonalizedGenerator:
    return PersonalizedGenerator(export)


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    """Two users, each with their own random shared and personal adapters, and their PyTorch models."""
    made = {}
    for user, seed in (("ana", 1), ("ben", 2)):
        base = load_base_model("tiny", device="cpu")
        model = attach_adapters(base.model, CONFIG)
        _random_adapters(model, seed)
        home = ClientHome.at(tmp_path_factory.mktemp(user))
        save_adapter(model, SHARED, home.adapter_dir(SHARED))
        save_adapter(model, PERSONAL, home.adapter_dir(PERSONAL))
        made[user] = (home, model, base.tokenizer)
    return made


def _torch_greedy(model, ids, n):
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
        )
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def test_fp32_matches_peft_tokens_and_logits(generator, users):
    home, model, tokenizer = users["ana"]
    adapter = generator.user_adapter(home, w_shared=0.0, w_personal=1.0)
    activate(model, [PERSONAL])
    ids = chat_input_ids(tokenizer, PROMPT)
    assert generator.prompt_ids(PROMPT) == ids
    ours = generator.next_logits(ids, adapter)
    reference = _torch_logits(model, ids)
    assert np.abs(ours - reference).max() < 1e-4
    with model.disable_adapter():
        base_reference = _torch_logits(model, ids)
    assert np.abs(ours - base_reference).max() > 1e-2  # the adapter really changes the output
    reply = generator.generate(PROMPT, adapter, DecodeOptions(max_new_tokens=24))
    assert list(reply.token_ids) == _torch_greedy(model, ids, 24)
    assert reply.tokens > 0 and reply.prompt_tokens == len(ids)


def test_int4_export_keeps_lora_float_and_applies_the_adapter(generator, users):
    import onnx_ir as ir

    int4 = export_model("tiny", precision="int4")
    graph = ir.load(int4.path / "model.onnx").graph
    ops = {node.name: node.op_type for node in graph}
    assert "MatMulNBits" in ops.values()
    lora_nodes = [op for name, op in ops.items() if "/lora_" in name]
    assert lora_nodes and set(lora_nodes) == {"MatMul"}
    assert {i.name for i in int4.lora_inputs} <= {v.name for v in graph.inputs}
    quantized = PersonalizedGenerator(int4)
    home, _, tokenizer = users["ana"]
    ids = chat_input_ids(tokenizer, PROMPT)
    adapter = quantized.user_adapter(home, 1.0, 1.0)
    with_adapter, without = quantized.next_logits(ids, adapter), quantized.next_logits(ids)
    fp32 = generator.next_logits(ids, generator.user_adapter(home, 1.0, 1.0))
    fp32_base = generator.next_logits(ids)
    # int4 rounding moves the logits a little; the adapter moves them a lot, the same way as in fp32.
    assert np.corrcoef(with_adapter - without, fp32 - fp32_base)[0, 1] > 0.9
    assert np.abs(with_adapter - fp32).max() < 0.5 * np.abs(fp32 - fp32_base).max()


def test_mlp_targets_are_lifted_too(tmp_path):
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    info = export_model("tiny", precision="fp32", target_modules=targets)
    assert {m for i in info.lora_inputs for m in i.modules()} == set(targets)
    base = load_base_model("tiny", device="cpu")
    model = attach_adapters(base.model, AdapterConfig(rank=4, alpha=8.0, target_modules=targets))
    _random_adapters(model, 5)
    save_adapter(model, SHARED, tmp_path / "all")
    adapter = convert_adapters(info, [(tmp_path / "all", 1.0)], tmp_path / "all.onnx_adapter")
    ids = chat_input_ids(base.tokenizer, PROMPT)
    ours = PersonalizedGenerator(info).next_logits(ids, adapter)
    assert np.abs(ours - _torch_logits(model, ids)).max() < 1e-4


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_each_layer_has_one_qkv_projection_and_one_lora_pair_for_it(precision):
    import onnx_ir as ir

    info = export_model("tiny", precision=precision)
    graph = ir.load(info.path / "model.onnx").graph
    layers = info.num_layers
    attention = [n for n in graph if n.op_type == "GroupQueryAttention"]
    assert len(attention) == layers and all(n.inputs[1] is None and n.inputs[2] is None for n in attention)
    projections = [n.name for n in graph if "/attn/" in n.name and n.op_type in ("MatMul", "MatMulNBits")]
    assert not any(f"/{m}/" in name for name in projections for m in ("q_proj", "k_proj", "v_proj"))
    packed = [i for i in info.lora_inputs if i.module == "qkv_proj"]
    assert len(packed) == 2 * layers and all(i.modules() == ("q_proj", "k_proj", "v_proj") for i in packed)


def test_a_packed_lora_pair_carries_q_and_v_only_exactly(tmp_path):
    """Targets q and v: K's block of the packed B stays zero and the logits match peft's."""
    targets = ("q_proj", "v_proj")
    info = export_model("tiny", precision="fp32", target_modules=targets)
    packed = [i for i in info.lora_inputs if i.part == "B"]
    assert packed and all(i.modules() == targets for i in packed)
    base = load_base_model("tiny", device="cpu")
    model = attach_adapters(base.model, AdapterConfig(rank=4, alpha=8.0, target_modules=targets))
    _random_adapters(model, 7)
    save_adapter(model, SHARED, tmp_path / "qv")
    adapter = convert_adapters(info, [(tmp_path / "qv", 1.0)], tmp_path / "qv.onnx_adapter")
    ids = chat_input_ids(base.tokenizer, PROMPT)
    ours = PersonalizedGenerator(info).next_logits(ids, adapter)
    assert np.abs(ours - _torch_logits(model, ids)).max() < 1e-4
    b = merged_parameters(info, [(tmp_path / "qv", 1.0)])[packed[0].name]
    q_end, v_start = packed[0].block("q_proj")[1], packed[0].block("v_proj")[0]
    assert v_start > q_end and b[:, :q_end].any() and b[:, v_start:].any()
    assert not b[:, q_end:v_start].any()  # K's columns: no adapter there


def test_hot_swap_alternating_users_each_get_their_own_adapter(generator, users):
    expected = {}
    for user, (home, model, tokenizer) in users.items():
        activate(model, [SHARED, PERSONAL])
        expected[user] = _torch_greedy(model, chat_input_ids(tokenizer, PROMPT), 12)
    assert expected["ana"] != expected["ben"]
    session = generator.model
    for user in ["ana", "ben", "ana", "ben", "ana"]:
        home = users[user][0]
        reply = generator.generate_for(home, PROMPT, mode="merge", options=DecodeOptions(max_new_tokens=12))
        assert list(reply.token_ids) == expected[user], user
    assert generator.model is session  # swapped adapters, never reloaded the model


def test_merge_is_the_exact_weighted_sum(generator, export, users):
    home, model, tokenizer = users["ben"]
    w_shared, w_personal = 0.7, 1.3
    params = merged_parameters(export, [(home.adapter_dir(SHARED), w_shared), (home.adapter_dir(PERSONAL), w_personal)])
    scale = CONFIG.alpha / CONFIG.rank
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    want = sum(
        w * scale * (layer.lora_B[name].weight @ layer.lora_A[name].weight).detach().numpy().T
        for name, w in ((SHARED, w_shared), (PERSONAL, w_personal))
    )
    # Q, K and V share one packed pair: each adapter's three A side by side, each B on the diagonal.
    packed = export.lora_input(1, "v_proj", "B")
    a = params["model.layers.1.attn.qkv_proj.lora_A.MatMul.weight"]
    b = params[packed.name]
    assert a.shape == (64, 48) and b.shape[0] == 48  # rank-concatenated: 2 adapters x 3 modules x 8
    start, cols = packed.block("v_proj")
    np.testing.assert_allclose((a @ b)[:, start : start + cols], want, atol=1e-6)

    # The same merge in PyTorch: scale each B by its weight and run both adapters together.
    with torch.no_grad():
        for name, w in ((SHARED, w_shared), (PERSONAL, w_personal)):
            for module_name, param in model.named_parameters():
                if f".lora_B.{name}." in module_name:
                    param.mul_(w)
        activate(model, [SHARED, PERSONAL])
        ids = chat_input_ids(tokenizer, PROMPT)
        reference = _torch_logits(model, ids)
        for name, w in ((SHARED, w_shared), (PERSONAL, w_personal)):
            for module_name, param in model.named_parameters():
                if f".lora_B.{name}." in module_name:
                    param.div_(w)
    adapter = generator.user_adapter(home, w_shared, w_personal)
    assert np.abs(generator.next_logits(ids, adapter) - reference).max() < 1e-4


def test_conversion_is_skipped_until_the_adapter_changes(generator, export, users, tmp_path):
    home, model, _ = users["ana"]
    out = tmp_path / "p.onnx_adapter"
    convert_adapters(export, [(home.adapter_dir(PERSONAL), 1.0)], out)
    first = out.stat().st_mtime_ns
    convert_adapters(export, [(home.adapter_dir(PERSONAL), 1.0)], out)
    assert out.stat().st_mtime_ns == first
    changed = home.root / "changed"
    save_adapter(model, SHARED, changed)
    convert_adapters(export, [(changed, 1.0)], out)
    assert out.stat().st_mtime_ns != first


def test_fusion_equals_base_when_only_base_is_weighted(generator, users):
    home = users["ana"][0]
    options = DecodeOptions(max_new_tokens=10)
    base = generator.generate_for(home, PROMPT, mode="base", options=options)
    fused = generator.generate_for(
        home, PROMPT, mode="fusion", w_base=1.0, w_shared=0.0, w_personal=0.0, options=options
    )
    assert fused.token_ids == base.token_ids and fused.mode == "fusion"
    personal = generator.generate_for(home, PROMPT, mode="merge", w_shared=0.0, w_personal=1.0, options=options)
    only_personal = generator.generate_for(home, PROMPT, mode="fusion", w_shared=0.0, w_personal=1.0, options=options)
    assert only_personal.token_ids == personal.token_ids
    assert personal.token_ids != base.token_ids
    mixed = generator.generate_for(
        home, PROMPT, mode="fusion", w_base=0.2, w_shared=0.3, w_personal=0.5, options=options
    )
    assert mixed.tokens > 0


def test_sampling_is_seeded_and_streams(generator, users):
    home = users["ben"][0]
    options = DecodeOptions(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    pieces: list[str] = []
    one = generator.generate_for(home, PROMPT, options=options, on_token=pieces.append)
    two = generator.generate_for(home, PROMPT, options=options)
    assert one.token_ids == two.token_ids
    assert len(pieces) == one.tokens
    others = {
        generator.generate_for(home, PROMPT, options=dataclasses.replace(options, seed=s)).token_ids for s in range(4)
    }
    assert len(others) > 1
    assert generator.generate(PROMPT, options=DecodeOptions(max_new_tokens=3)).tokens <= 3


def test_retrieval_puts_stated_preferences_in_the_prompt_or_the_system_message(generator, users, monkeypatch):
    from fedpal.client.memory import PreferenceMemory

    monkeypatch.setenv("FEDPAL_PASSPHRASE", "correct horse battery")
    home = users["ana"][0]
    with PreferenceMemory.open(home.root) as memory:
        memory.add_stated("I like answers about mountains to mention hiking trails.")
        memory.add_stated("Never use emoji.")
    seen = []
    original = generator.prompt_ids
    monkeypatch.setattr(generator, "prompt_ids", lambda p, s=None: seen.append((p, s)) or original(p, s))
    options = DecodeOptions(max_new_tokens=4)
    reply = generator.generate_for(home, PROMPT, mode="base", retrieval=True, options=options)
    assert reply.mode == "base+retrieval"
    prompt, system = seen[-1]
    assert prompt.startswith(PROMPT + "\n\n") and "hiking trails" in prompt and system is None
    generator.generate_for(home, PROMPT, mode="base", retrieval=True, retrieval_in="system", options=options)
    prompt, system = seen[-1]
    assert prompt == PROMPT and system.startswith(RETRIEVAL_HEADER) and "hiking trails" in system
    generator.generate_for(home, PROMPT, mode="base", options=options)
    assert seen[-1] == (PROMPT, None)
    with pytest.raises(FedpalError, match="not 'footer'"):
        generator.generate_for(home, PROMPT, mode="base", retrieval=True, retrieval_in="footer", options=options)
    assert with_preferences(None, []) is None


def test_bad_input_is_one_line_error(generator, export, users, tmp_path, tiny_path):
    home, model, _ = users["ana"]
    cases = []
    with pytest.raises(FedpalError) as err:
        generator.generate("   ")
    cases.append(err)
    with pytest.raises(FedpalError) as err:
        generator.generate("word " * 600)
    assert "context" in str(err.value)
    cases.append(err)
    with pytest.raises(FedpalError) as err:
        find_export(str(tiny_path), precision="fp32", max_rank=7)
    assert "fedpal export" in str(err.value)
    cases.append(err)
    with pytest.raises(FedpalError) as err:
        check_export(dataclasses.replace(export, base_fingerprint="0" * 16))
    assert "stale" in str(err.value)
    cases.append(err)

    # An adapter for another base: the right names, the wrong hidden size.
    foreign = tmp_path / "foreign"
    _write_adapter(foreign, rank=8, hidden=32)
    with pytest.raises(FedpalError) as err:
        convert_adapters(export, [(foreign, 1.0)], tmp_path / "f.onnx_adapter")
    assert "another base" in str(err.value)
    cases.append(err)
    # Rank larger than the export allows, alone and as a merge.
    big = tmp_path / "big"
    _write_adapter(big, rank=export.max_rank + 1, hidden=64)
    with pytest.raises(FedpalError) as err:
        convert_adapters(export, [(big, 1.0)], tmp_path / "b.onnx_adapter")
    assert "larger than this export allows" in str(err.value)
    cases.append(err)
    mlp = tmp_path / "mlp"
    _write_adapter(mlp, rank=4, hidden=64, outs={"up_proj": 128})
    with pytest.raises(FedpalError) as err:
        convert_adapters(export, [(mlp, 1.0)], tmp_path / "m.onnx_adapter")
    assert "targets up_proj" in str(err.value)
    cases.append(err)
    half = tmp_path / "half"
    _write_adapter(half, rank=export.max_rank // 2 + 1, hidden=64)
    with pytest.raises(FedpalError) as err:
        convert_adapters(export, [(half, 1.0), (half, 1.0)], tmp_path / "h.onnx_adapter")
    cases.append(err)
    # merge for a user with nothing trained (or nothing that passed the guard) is the base model
    untrained = generator.generate_for(
        ClientHome.at(tmp_path / "nobody"), PROMPT, mode="merge", options=DecodeOptions(max_new_tokens=4)
    )
    assert (
        untrained.mode == "base"
        and untrained.token_ids == generator.generate(PROMPT, None, DecodeOptions(max_new_tokens=4)).token_ids
    )
    with pytest.raises(FedpalError) as err:
        generator.generate_for(ClientHome.at(tmp_path / "nobody"), PROMPT, mode="fusion", w_shared=0.0, w_personal=0.5)
    assert "no personal adapter" in str(err.value)
    cases.append(err)
    with pytest.raises(FedpalError) as err:
        generator.generate_for(home, PROMPT, mode="blend")
    cases.append(err)
    for case in cases:
        assert "\n" not in str(case.value) and str(case.value)


def _write_adapter(folder, rank: int, hidden: int, outs: dict[str, int] | None = None) -> None:
    """A peft-format adapter folder with the tiny model's tensor names and chosen shapes."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    outs = outs or {"q_proj": hidden, "k_proj": hidden // 2, "v_proj": hidden // 2, "o_proj": hidden}
    tensors = {}
    for layer in range(2):
        for module, out in outs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = np.full((rank, hidden), 0.01, np.float32)
            tensors[f"{key}.lora_B.weight"] = np.full((out, rank), 0.01, np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(outs)}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_cli_generate_json_line(export, users):
    from typer.testing import CliRunner

    from fedpal.common import cli

    cli._register_commands()
    home = users["ben"][0]
    runner = CliRunner()
    result = runner.invoke(
        cli.app,
        [
            "generate",
            "--home",
            str(home.root),
            "--prompt",
            PROMPT,
            "--model",
            "tiny",
            "--precision",
            "fp32",
            "--max-new-tokens",
            "5",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert (
        set(line) == {"text", "tokens", "seconds", "mode", "adapters"}
        and line["mode"] == "merge"
        and 0 < line["tokens"] <= 5
    )
    assert line["adapters"] == {"shared": 1.0, "personal": 1.0}


@pytest.mark.slow
def test_default_model_first_32_greedy_tokens_match_pytorch(tmp_path):
    base = load_base_model("default", device="cpu")
    model = attach_adapters(base.model, CONFIG)
    _random_adapters(model, 3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # keep the real model fluent: a small but non-zero personal update
    activate(model, [PERSONAL])
    info = export_model("default", precision="fp32")
    generator = PersonalizedGenerator(info)
    home = ClientHome.at(tmp_path / "user")
    save_adapter(model, PERSONAL, home.adapter_dir(PERSONAL))
    adapter = generator.user_adapter(home, w_shared=0.0, w_personal=1.0)
    prompt = "Give me three tips for writing clear emails."
    ids = chat_input_ids(base.tokenizer, prompt)
    reply = generator.generate(prompt, adapter, DecodeOptions(max_new_tokens=32))
    assert list(reply.token_ids) == _torch_greedy(model, ids, 32)[:32]


def test_cli_chat_stores_a_rating_and_a_pick(export, users, monkeypatch):
    from typer.testing import CliRunner

    from fedpal.client.memory import PreferenceMemory
    from fedpal.client.runtime_cli import export as export_command
    from fedpal.common import cli

    monkeypatch.setenv("FEDPAL_PASSPHRASE", "correct horse battery")
    cli._register_commands()
    home = users["ben"][0]
    export_command(
        home=home.root, model="tiny", precision="fp32", max_rank=export.max_rank, provider="cpu", force=False
    )
    runner = CliRunner()
    script = "What should I cook tonight?\n/rate 4\n/rate 9\n/pick\n2\n/quit\n"
    result = runner.invoke(cli.app, ["chat", "--home", str(home.root), "--max-new-tokens", "6"], input=script)
    assert result.exit_code == 0, result.output
    assert "rated 4/5" in result.output and "from 1 to 5" in result.output
    with PreferenceMemory.open(home.root) as memory:
        ratings, pairs = memory.records("rating"), memory.records("pair")
    assert [r.fields["score"] for r in ratings] == [4]
    assert len(pairs) == 1 and pairs[0].fields["prompt"] == "What should I cook tonight?"


def test_adapter_on_the_top_layers_only_matches_peft(generator, tmp_path):
    base = load_base_model("tiny", device="cpu")
    model = attach_adapters(base.model, AdapterConfig(rank=CONFIG.rank, alpha=CONFIG.alpha, top_layers=1))
    _random_adapters(model, 3)
    home = ClientHome.at(tmp_path / "top")
    save_adapter(model, PERSONAL, home.adapter_dir(PERSONAL))
    activate(model, [PERSONAL])
    ids = chat_input_ids(base.tokenizer, PROMPT)
    ours = generator.next_logits(ids, generator.user_adapter(home, 0.0, 1.0))
    assert np.abs(ours - _torch_logits(model, ids)).max() < 1e-4
    with model.disable_adapter():
        assert np.abs(ours - _torch_logits(model, ids)).max() > 1e-2


def test_decode_threads_follow_the_cores_and_a_containers_quota(tmp_path):
    import os

    from fedpal.client.generator import decode_threads

    cores = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    assert decode_threads(tmp_path / "absent") == cores
    quota.write_text("max 100000\n")
    assert decode_threads(quota) == cores
    quota.write_text("50000 100000\n")  # half a CPU still decodes on one thread
    assert decode_threads(quota) == 1
    quota.write_text(f"{100000 * (cores + 8)} 100000\n")  # a quota above the cores changes nothing
    assert decode_threads(quota) == cores
    quota.write_text("garbage\n")
    assert decode_threads(quota) == cores


def test_a_generation_mode_added_through_the_registry(generator, users):
    """A mode registered by name answers through ``generate_for`` like the built-in ones."""
    from fedpal.client.generator import MODES, generation_mode

    @generation_mode("shout-test")
    def shout(generator, request):
        reply = MODES["merge"](generator, request)
        return dataclasses.replace(reply, text=reply.text.upper())

    home = users["ana"][0]
    options = DecodeOptions(max_new_tokens=6)
    try:
        merged = generator.generate_for(home, "hello there", mode="merge", options=options)
        shouted = generator.generate_for(home, "hello there", mode="shout-test", options=options)
        assert shouted.text == merged.text.upper() and shouted.tokens == merged.tokens
        assert shouted.mode == "shout-test"
    finally:
        del MODES["shout-test"]
    with pytest.raises(FedpalError, match="mode must be one of base, merge, fusion, rerank"):
        generator.generate_for(home, "hello there", mode="shout-test", options=options)
