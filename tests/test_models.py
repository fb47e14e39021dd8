"""The model layer: the embedded default, the tiny model, local folders, device choice, bad input."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import pytest
import torch

from fedpal.common.errors import FedpalError
from fedpal.common.generation import generate_reply
from fedpal.common.models import load_base_model, resolve_device, resolve_model_path
from fedpal.common.tiny_model import build_tiny_model


def test_default_model_converts_once_and_is_reused():
    first = resolve_model_path("default")
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = resolve_model_path("default")
    assert again == first
    assert weights.stat().st_mtime_ns == stamp, "a second call must reuse the cached conversion"
    assert weights.stat().st_size > 400_000_000, "fp32 SmolLM2-135M is about 540 MB"


def test_default_model_loads_and_replies():
    base = load_base_model("default", device="cpu")
    assert base.model.config.model_type == "llama"
    assert sum(p.numel() for p in base.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert base.model.dtype == torch.float32
    text, tokens = generate_reply(base, "What is the capital of France?", max_new_tokens=12)
    assert 0 < tokens <= 12
    assert "Paris" in text


def test_tiny_model_is_deterministic_from_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    assert filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)
    assert filecmp.cmp(a / "tokenizer.json", b / "tokenizer.json", shallow=False)
    assert not filecmp.cmp(a / "model.safetensors", c / "model.safetensors", shallow=False)


def test_tiny_tokenizer_round_trips_any_unicode(tiny_base):
    text = "naïve café — 東京 🙂 \t\n ok"
    ids = tiny_base.tokenizer.encode(text, add_special_tokens=False)
    assert tiny_base.tokenizer.decode(ids) == text


def test_local_folder_loads(tiny_path):
    base = load_base_model(str(tiny_path), device="cpu")
    assert base.path == tiny_path
    assert base.device == torch.device("cpu")


def test_fedpal_home_controls_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPAL_HOME", str(tmp_path))
    path = resolve_model_path("tiny", seed=7)
    assert path.parent == tmp_path / "models"


def test_device_selection(monkeypatch):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.delenv("FEDPAL_DEVICE", raising=False)
    assert resolve_device().type == expected
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setenv("FEDPAL_DEVICE", "cpu")
    assert resolve_device().type == "cpu"
    with pytest.raises(FedpalError, match="unknown device"):
        resolve_device("quantum")
    if not torch.cuda.is_available():
        with pytest.raises(FedpalError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unknown_model_path_is_one_clear_error(tmp_path):
    with pytest.raises(FedpalError, match="not found") as err:
        resolve_model_path(str(tmp_path / "nope"))
    assert "\n" not in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FedpalError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_corrupt_weights_are_named(tiny_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(FedpalError, match="corrupt weights file .*model.safetensors") as err:
        load_base_model(str(broken), device="cpu")
    assert "\n" not in str(err.value)


def test_garbage_weights_are_named(tiny_path, tmp_path):
    broken = tmp_path / "garbage"
    shutil.copytree(tiny_path, broken)
    Path(broken / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(FedpalError, match="corrupt weights file"):
        load_base_model(str(broken), device="cpu")
