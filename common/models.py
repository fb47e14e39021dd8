"""Resolve and load a base model: the embedded default, ``tiny``, a local folder or a hub id.

Every later stage (training, ONNX export) needs a local Hugging Face folder, so resolution
always ends in one; loading then reads that folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpal.common.config import fedpal_home
from fedpal.common.default_model import DEFAULT_MODEL_NAME, convert_default_model
from fedpal.common.errors import FedpalError, first_line
from fedpal.common.tiny_model import build_tiny_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT = "default"
TINY = "tiny"


@dataclass
class BaseModel:
    """A loaded base model with the folder it came from (the ONNX exporter reads the folder)."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    name: str
    path: Path
    device: "torch.device"


def resolve_device(device: str | None = None) -> "torch.device":
    """CUDA when available unless ``device`` (or ``FEDPAL_DEVICE``) says otherwise."""
    import torch

    wanted = device or os.environ.get("FEDPAL_DEVICE")
    if wanted:
        try:
            chosen = torch.device(wanted)
        except RuntimeError as err:
            raise FedpalError(f"unknown device '{wanted}': {err}") from None
        if chosen.type not in ("cpu", "cuda"):
            raise FedpalError(f"device '{wanted}' is not supported: fedpal trains and generates on cpu or cuda[:N]")
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise FedpalError(f"device '{wanted}' was asked for but CUDA is not available here")
        if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise FedpalError(
                f"device '{wanted}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return chosen
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_path(model: str = DEFAULT, seed: int = 0) -> Path:
    """A local Hugging Face folder for ``model``, converting or building it into the cache once."""
    cache = fedpal_home() / "models"
    if model == DEFAULT:
        return convert_default_model(cache / DEFAULT_MODEL_NAME)
    if model == TINY:
        return build_tiny_model(cache / f"tiny-seed{seed}", seed=seed)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedpalError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        return path.resolve()
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FedpalError(f"model '{model}' not found: no such folder, and not a hub id (owner/name)")
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # network, auth and missing-repo errors all end here
        raise FedpalError(
            f"model '{repo_id}' is not a local folder and could not be fetched from the hub: {first_line(err)}"
        ) from None


def load_base_model(
    model: str = DEFAULT,
    device: str | None = None,
    dtype: "torch.dtype | None" = None,
    seed: int = 0,
) -> BaseModel:
    """Load a base model and its tokenizer, on ``device`` (see :func:`resolve_device`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(model, seed=seed)
    target = resolve_device(device)
    _check_weights(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        raise FedpalError(f"could not load model from {path}: {first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded.to(target)
    loaded.eval()
    return BaseModel(model=loaded, tokenizer=tokenizer, name=model, path=path, device=target)


def _check_weights(path: Path) -> None:
    """Name the corrupt weights file instead of letting a deep loader error surface."""
    from safetensors import safe_open

    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            raise FedpalError(f"corrupt weights index {index}") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FedpalError(f"model folder {path} is missing weights file {missing[0]}")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise FedpalError(f"corrupt weights file {shard}: {first_line(err)}") from None
