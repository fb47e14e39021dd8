"""Dual LoRA adapters: peft-compatible files, wire format, FFA-LoRA, mismatch errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from fedpal.common.adapters import (
    PERSONAL,
    SHARED,
    AdapterConfig,
    activate,
    adapter_to_arrays,
    arrays_to_adapter,
    attach_adapters,
    from_array_record,
    load_adapter,
    save_adapter,
    to_array_record,
)
from fedpal.common.errors import FedpalError
from fedpal.common.models import load_base_model


def _randomize(model, name: str, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f".{name}." in param_name and "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_saved_adapter_loads_in_peft_with_same_logits(tiny_base, tiny_path, tmp_path):
    model = attach_adapters(tiny_base.model, AdapterConfig(rank=4))
    _randomize(model, PERSONAL)
    save_adapter(model, PERSONAL, tmp_path / "personal")

    ids = torch.tensor([tiny_base.tokenizer.encode("Please give me a short answer")])
    ours = attach_adapters(load_base_model(str(tiny_path), device="cpu").model, AdapterConfig(rank=4))
    load_adapter(ours, PERSONAL, tmp_path / "personal")
    activate(ours, [PERSONAL])
    theirs = PeftModel.from_pretrained(load_base_model(str(tiny_path), device="cpu").model, tmp_path / "personal")
    plain = load_base_model(str(tiny_path), device="cpu").model

    assert torch.allclose(_logits(ours, ids), _logits(theirs, ids), atol=1e-6)
    assert not torch.allclose(_logits(ours, ids), _logits(plain, ids), atol=1e-3), "the adapter must matter"


def test_fresh_adapters_leave_the_model_unchanged(tiny_base):
    ids = torch.tensor([tiny_base.tokenizer.encode("hello there")])
    before = _logits(tiny_base.model, ids)
    model = attach_adapters(tiny_base.model, AdapterConfig())
    activate(model, [SHARED, PERSONAL])
    assert torch.allclose(before, _logits(model, ids), atol=1e-6)


def test_same_init_seed_gives_same_a_matrices(tiny_path):
    a = attach_adapters(load_base_model(str(tiny_path)).model, AdapterConfig(init_seed=5))
    b = attach_adapters(load_base_model(str(tiny_path)).model, AdapterConfig(init_seed=5))
    c = attach_adapters(load_base_model(str(tiny_path)).model, AdapterConfig(init_seed=6))
    arrays_a, arrays_b, arrays_c = (adapter_to_arrays(m, SHARED) for m in (a, b, c))
    key = next(k for k in arrays_a if ".lora_A." in k)
    assert np.array_equal(arrays_a[key], arrays_b[key])
    assert not np.array_equal(arrays_a[key], arrays_c[key])


def test_only_the_trainable_adapter_gets_gradients(tiny_base):
    model = attach_adapters(tiny_base.model, AdapterConfig())
    activate(model, [SHARED, PERSONAL], trainable=PERSONAL)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{PERSONAL}." in n for n in trainable)
    assert any(".lora_A." in n for n in trainable)


def test_ffa_lora_freezes_a_and_sends_only_b(tiny_base):
    model = attach_adapters(tiny_base.model, AdapterConfig(freeze_a=True))
    activate(model, [SHARED], trainable=SHARED)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    full, only_b = adapter_to_arrays(model, SHARED), adapter_to_arrays(model, SHARED, parts="B")
    assert len(only_b) * 2 == len(full)
    assert sum(a.nbytes for a in only_b.values()) < sum(a.nbytes for a in full.values())


def test_arrays_round_trip_through_an_array_record(tiny_base):
    model = attach_adapters(tiny_base.model, AdapterConfig())
    _randomize(model, SHARED)
    arrays = adapter_to_arrays(model, SHARED)
    back = from_array_record(to_array_record(arrays))
    assert list(back) == list(arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    arrays_to_adapter(model, PERSONAL, back)
    assert all(np.array_equal(adapter_to_arrays(model, PERSONAL)[k], arrays[k]) for k in arrays)


def test_half_precision_is_handled(tiny_path):
    base = load_base_model(str(tiny_path), dtype=torch.bfloat16)
    model = attach_adapters(base.model, AdapterConfig())
    _randomize(model, SHARED)
    arrays = adapter_to_arrays(model, SHARED)
    assert all(a.dtype == np.float32 for a in arrays.values()), "numpy has no bfloat16"
    halves = adapter_to_arrays(model, SHARED, dtype=np.float16)
    assert all(a.dtype == np.float16 for a in halves.values())
    dtypes = {n: p.dtype for n, p in model.named_parameters() if f".{PERSONAL}." in n}
    arrays_to_adapter(model, PERSONAL, halves)
    assert {n: p.dtype for n, p in model.named_parameters() if f".{PERSONAL}." in n} == dtypes
    loaded = adapter_to_arrays(model, PERSONAL)
    assert all(np.allclose(loaded[k], halves[k].astype(np.float32), atol=1e-2) for k in halves)


def test_wrong_names_shapes_and_nan_are_refused(tiny_base):
    model = attach_adapters(tiny_base.model, AdapterConfig())
    arrays = adapter_to_arrays(model, SHARED)
    before = adapter_to_arrays(model, PERSONAL)
    key = next(iter(arrays))

    renamed = dict(arrays)
    renamed["layers.99.bogus"] = renamed.pop(key)
    with pytest.raises(FedpalError, match="does not fit this model: 1 tensors missing, 1 unexpected"):
        arrays_to_adapter(model, PERSONAL, renamed)
    reshaped = dict(arrays, **{key: np.zeros((3, 3), np.float32)})
    with pytest.raises(FedpalError, match=r"has shape \(3, 3\)"):
        arrays_to_adapter(model, PERSONAL, reshaped)
    poisoned = dict(arrays, **{key: np.full_like(arrays[key], np.nan)})
    with pytest.raises(FedpalError, match="non-finite"):
        arrays_to_adapter(model, PERSONAL, poisoned)
    after = adapter_to_arrays(model, PERSONAL)
    assert all(np.array_equal(before[k], after[k]) for k in before), "a refused load changes nothing"


def test_adapter_for_another_architecture_is_one_clear_error(tiny_base, tmp_path):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    other = attach_adapters(LlamaForCausalLM(config), AdapterConfig())
    save_adapter(other, SHARED, tmp_path / "other")
    model = attach_adapters(tiny_base.model, AdapterConfig())
    with pytest.raises(FedpalError, match="does not fit this model: .* has shape") as err:
        load_adapter(model, SHARED, tmp_path / "other")
    assert "\n" not in str(err.value)


def test_adapter_of_another_rank_is_refused(tiny_path, tmp_path):
    low = attach_adapters(load_base_model(str(tiny_path)).model, AdapterConfig(rank=2))
    save_adapter(low, SHARED, tmp_path / "r2")
    model = attach_adapters(load_base_model(str(tiny_path)).model, AdapterConfig(rank=8))
    with pytest.raises(FedpalError, match="has rank 2 .* has rank 8"):
        load_adapter(model, SHARED, tmp_path / "r2")


def test_corrupt_adapter_file_is_named(tiny_base, tmp_path):
    model = attach_adapters(tiny_base.model, AdapterConfig())
    folder = save_adapter(model, SHARED, tmp_path / "shared")
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FedpalError, match="corrupt adapter weights"):
        load_adapter(model, SHARED, folder)
    with pytest.raises(FedpalError, match="not an adapter folder"):
        load_adapter(model, SHARED, tmp_path)


def test_top_layers_puts_lora_only_in_the_last_layers(tiny_base, tiny_path, tmp_path):
    import re

    layers = tiny_base.model.config.num_hidden_layers
    model = attach_adapters(tiny_base.model, AdapterConfig(top_layers=1))
    found = {int(re.search(r"layers\.(\d+)\.", name)[1]) for name in adapter_to_arrays(model, SHARED)}
    assert found == {layers - 1}
    activate(model, [SHARED], trainable=SHARED)
    _randomize(model, SHARED)
    save_adapter(model, SHARED, tmp_path / "top")
    ids = torch.tensor([[1, 5, 9, 3]])
    peft_model = PeftModel.from_pretrained(load_base_model("tiny", device="cpu").model, tmp_path / "top")
    assert torch.allclose(_logits(peft_model, ids), _logits(model, ids), atol=1e-6)
    with pytest.raises(FedpalError, match="only 2 layers"):
        attach_adapters(load_base_model("tiny", device="cpu").model, AdapterConfig(top_layers=layers + 1))
    with pytest.raises(FedpalError, match="not -1"):
        attach_adapters(load_base_model("tiny", device="cpu").model, AdapterConfig(top_layers=-1))


def test_an_interrupted_save_leaves_the_previous_adapter_whole(tiny_base, tmp_path, monkeypatch):
    """An agent stopped while it writes an adapter (here: Ctrl-C as the last file is written)
    leaves the previous adapter, every file of it, and nothing half-written beside it; a
    completed save swaps the new folder in whole, also where the atomic exchange is missing."""
    import fedpal.common.adapters as adapters_module
    from fedpal.common import files

    model = attach_adapters(tiny_base.model, AdapterConfig(rank=4))
    _randomize(model, SHARED, seed=1)
    folder = save_adapter(model, SHARED, tmp_path / "shared")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    previous = adapter_to_arrays(model, SHARED)

    def interrupted(_model):
        raise KeyboardInterrupt

    _randomize(model, SHARED, seed=2)
    with monkeypatch.context() as patch:
        patch.setattr(adapters_module, "_config_of", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_adapter(model, SHARED, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
    newer = adapter_to_arrays(model, SHARED)
    load_adapter(model, SHARED, folder)
    for name, array in adapter_to_arrays(model, SHARED).items():
        np.testing.assert_array_equal(array, previous[name])

    exchanged = []
    exchange = files._exchange
    monkeypatch.setattr(files, "_exchange", lambda a, b: exchanged.append(exchange(a, b)) or exchanged[-1])
    arrays_to_adapter(model, SHARED, newer)
    save_adapter(model, SHARED, folder)
    assert exchanged == [True]  # Linux swaps the folders in one step
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    _randomize(model, SHARED, seed=3)
    latest = adapter_to_arrays(model, SHARED)
    save_adapter(model, SHARED, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
    arrays_to_adapter(model, SHARED, previous)
    load_adapter(model, SHARED, folder)
    for name, array in adapter_to_arrays(model, SHARED).items():
        np.testing.assert_array_equal(array, latest[name])


def test_a_save_sweeps_staging_folders_that_killed_writers_left(tiny_base, tmp_path):
    """A writer killed mid-save leaves a hidden staging folder; the next save of that adapter
    removes it once it is stale, and never touches one a live writer may still be filling."""
    import os
    import time

    from fedpal.common.files import STALE_STAGING_S

    model = attach_adapters(tiny_base.model, AdapterConfig(rank=4))
    stale, live = tmp_path / ".shared-killed", tmp_path / ".shared-writing"
    for leftover in (stale, live):
        leftover.mkdir()
        (leftover / "adapter_model.safetensors").write_bytes(b"half")
    old = time.time() - STALE_STAGING_S - 60
    os.utime(stale, (old, old))
    save_adapter(model, SHARED, tmp_path / "shared")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared-writing", "shared"]
