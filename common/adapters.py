"""The two LoRA adapters fedpal puts on one base model, and their (de)serialization.

``shared`` is trained by every client and averaged by the server; ``personal`` never
leaves the client. Both live in one peft model so switching between them costs nothing
and the base weights exist once. With ``freeze_a`` (FFA-LoRA) the A matrices are fixed
from a common seed and only B is trained and sent, which makes averaging exact.

On disk an adapter is a standard peft folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads; on the wire
it is a dict of named numpy arrays carried in a Flower ``ArrayRecord``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpal.common.errors import FedpalError, first_line

if TYPE_CHECKING:
    from fedpal.common.settings import FederationSettings
    import torch
    from flwr.app import ArrayRecord
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

SHARED = "shared"
PERSONAL = "personal"
ADAPTER_NAMES = (SHARED, PERSONAL)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FEDPAL_FILE = "fedpal_adapter.json"
FINGERPRINT_KEY = "adapter-fingerprint"


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA settings shared by both adapters (they must match for rank-concatenated merges)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))
    dropout: float = 0.0
    freeze_a: bool = False
    init_seed: int = 0
    top_layers: int = 0
    """LoRA only in the last ``top_layers`` decoder layers (0: all). Backpropagation then stops
    below them, so a training step costs less, and DP noise covers fewer coordinates."""

    @classmethod
    def for_rank(cls, rank: int | None) -> "AdapterConfig":
        """New adapters of ``rank`` (None: the default), with alpha = 2 x rank: the scale the
        defaults were measured at (rank 8, alpha 16), kept when only the rank changes."""
        return cls() if rank is None else cls(rank=rank, alpha=2.0 * rank)

    def lora_config(self, num_layers: int | None = None) -> "LoraConfig":
        """peft's config; ``num_layers`` (the model's decoder layers) is needed when ``top_layers`` is set."""
        from peft import LoraConfig

        if self.top_layers < 0:
            raise FedpalError(
                f"top_layers must be 0 (all layers) or a positive number of last layers, not {self.top_layers}"
            )
        layers = None
        if self.top_layers:
            if num_layers is None:
                raise ValueError("lora_config needs the model's number of layers when top_layers is set")
            if self.top_layers > num_layers:
                raise FedpalError(f"top_layers is {self.top_layers} but the model has only {num_layers} layers")
            layers = list(range(num_layers - self.top_layers, num_layers))
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            bias="none",
            task_type="CAUSAL_LM",
            layers_to_transform=layers,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_settings(cls, settings: FederationSettings) -> "AdapterConfig":
        """From the federation's settings, so the server, every client and the simulator build the same adapters."""
        return cls(
            rank=settings.lora_rank,
            alpha=settings.lora_alpha,
            target_modules=tuple(t.strip() for t in settings.lora_targets.split(",") if t.strip()),
            freeze_a=settings.ffa_lora,
            init_seed=settings.seed,
            top_layers=settings.lora_top_layers,
        )

    @classmethod
    def from_dict(cls, data: Mapping) -> "AdapterConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "target_modules" in known:
            known["target_modules"] = tuple(known["target_modules"])
        return cls(**known)


def attach_adapters(
    model: "PreTrainedModel", config: AdapterConfig, names: Sequence[str] = ADAPTER_NAMES
) -> "PeftModel":
    """Wrap ``model`` with one LoRA adapter per name, A initialised from ``config.init_seed``.

    Every client calling this with the same config gets the same A matrices, which
    FFA-LoRA relies on; B starts at zero so a fresh adapter leaves the model unchanged.
    """
    import torch
    from peft import get_peft_model

    lora = config.lora_config(model.config.num_hidden_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        peft_model = get_peft_model(model, lora, adapter_name=names[0])
        for name in names[1:]:
            torch.manual_seed(config.init_seed)
            peft_model.add_adapter(name, lora)
    peft_model.fedpal_adapter_config = config
    activate(peft_model, active=[names[0]], trainable=None)
    return peft_model


def activate(model: "PeftModel", active: Sequence[str], trainable: str | None = None) -> None:
    """Let the ``active`` adapters take part in the forward pass; only ``trainable`` learns.

    peft's ``set_adapter`` marks every active adapter trainable, so the others are frozen
    again here, and under FFA-LoRA so are the A matrices.
    """
    unknown = [n for n in [*active, trainable] if n is not None and n not in model.peft_config]
    if unknown:
        raise FedpalError(f"unknown adapter '{unknown[0]}'; the model has {sorted(model.peft_config)}")
    if trainable is not None and trainable not in active:
        raise FedpalError(f"adapter '{trainable}' must be active to be trained")
    model.base_model.set_adapter(list(active))
    freeze_a = _config_of(model).freeze_a
    for param_name, param in model.named_parameters():
        if "lora_" not in param_name:
            continue
        owner = _adapter_of(param_name)
        wants_grad = owner == trainable and not (freeze_a and ".lora_A." in param_name)
        param.requires_grad_(wants_grad)


def _config_of(model: "PeftModel") -> AdapterConfig:
    config = getattr(model, "fedpal_adapter_config", None)
    if config is None:
        raise FedpalError("this model was not prepared with fedpal.common.adapters.attach_adapters")
    return config


@dataclass(frozen=True)
class LoraName:
    """What a peft LoRA weight's name says: ``...layers.<layer>.<block>.<module>.lora_<A|B>[.<adapter>].weight``
    (a model's parameters carry the adapter's name; a saved adapter's keys do not)."""

    layer: int
    module: str
    part: str
    adapter: str | None

    _PATTERN = re.compile(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])(?:\.(\w+))?\.weight$")

    @classmethod
    def parse(cls, name: str) -> "LoraName | None":
        """The parts of ``name``; None when it is not a LoRA A/B weight."""
        match = cls._PATTERN.search(name)
        return cls(int(match[1]), match[2], match[3], match[4]) if match else None


def _adapter_of(param_name: str) -> str | None:
    lora = LoraName.parse(param_name)
    return lora.adapter if lora is not None else None


def adapter_state(model: "PeftModel", name: str, parts: str = "AB") -> dict[str, "torch.Tensor"]:
    """The adapter's tensors under peft's saved names; ``parts="B"`` keeps only lora_B (FFA-LoRA)."""
    from peft import get_peft_model_state_dict

    if name not in model.peft_config:
        raise FedpalError(f"unknown adapter '{name}'; the model has {sorted(model.peft_config)}")
    state = get_peft_model_state_dict(model, adapter_name=name)
    if parts == "B":
        state = {k: v for k, v in state.items() if ".lora_B." in k}
    elif parts != "AB":
        raise FedpalError(f"parts must be 'AB' or 'B', not '{parts}'")
    return state


def adapter_to_arrays(
    model: "PeftModel", name: str, parts: str = "AB", dtype: np.dtype | str | None = None
) -> dict[str, np.ndarray]:
    """Named numpy copies of the adapter (bf16 becomes fp32: numpy has no bfloat16)."""
    import torch

    arrays = {}
    for key, tensor in adapter_state(model, name, parts).items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        array = tensor.numpy().copy()
        arrays[key] = array.astype(dtype) if dtype is not None else array
    return arrays


def arrays_to_adapter(model: "PeftModel", name: str, arrays: Mapping[str, np.ndarray], parts: str = "AB") -> None:
    """Load named arrays into adapter ``name`` after checking names, shapes and finiteness.

    A mismatch raises instead of loading part of the adapter: a silent partial load would
    leave the model in a state nobody asked for.
    """
    import torch
    from peft import set_peft_model_state_dict

    expected = adapter_state(model, name, parts)
    check_arrays(expected, arrays, what=f"adapter '{name}'")
    current = adapter_state(model, name, "AB")
    for key, array in arrays.items():
        current[key] = torch.from_numpy(np.asarray(array)).to(dtype=expected[key].dtype)
    result = set_peft_model_state_dict(model, current, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise FedpalError(f"adapter '{name}' did not take tensor {unexpected[0]}")


def check_arrays(
    expected: Mapping[str, "torch.Tensor | np.ndarray"], arrays: Mapping[str, np.ndarray], what: str
) -> None:
    """Raise a one-line ``FedpalError`` unless ``arrays`` has exactly the expected names and shapes."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise FedpalError(
            f"{what} does not fit this model: {len(missing)} tensors missing, {len(extra)} unexpected ({detail})"
        )
    for key, array in arrays.items():
        want = tuple(expected[key].shape)
        got = tuple(np.shape(array))
        if want != got:
            raise FedpalError(f"{what} does not fit this model: {key} has shape {got}, the model expects {want}")
        if not np.all(np.isfinite(np.asarray(array, dtype=np.float64))):
            raise FedpalError(f"{what} has non-finite values (NaN or Inf) in {key}")


def save_adapter(model: "PeftModel", name: str, directory: Path | str) -> Path:
    """Write adapter ``name`` as a standard peft folder that ``PeftModel.from_pretrained`` reads.

    The folder is written beside ``directory`` and swapped in whole: an agent killed in
    the middle (or a power loss) leaves the previous adapter, never new weights with an
    old config, and chat reading it meanwhile finds one complete adapter or the other.
    """
    from safetensors.torch import save_file

    from fedpal.common.files import staged_folder

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state(model, name).items()}
    with staged_folder(directory) as staging:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        model.peft_config[name].save_pretrained(str(staging))
        (staging / FEDPAL_FILE).write_text(json.dumps({"adapter": name, **_config_of(model).to_dict()}, indent=2))
    return directory


def read_adapter_files(directory: Path | str) -> tuple[dict, dict[str, np.ndarray]]:
    """The peft config and the tensors of a saved adapter folder, as numpy arrays."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FedpalError(f"{directory} is not an adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise FedpalError(f"corrupt adapter config {config_path}: {err}") from None
    try:
        arrays = {k: v.float().numpy() for k, v in load_file(str(weights_path)).items()}
    except Exception as err:  # safetensors has its own error types for bad files
        raise FedpalError(f"corrupt adapter weights {weights_path}: {first_line(err)}") from None
    return config, arrays


def load_adapter(model: "PeftModel", name: str, directory: Path | str) -> None:
    """Load a saved adapter folder into adapter ``name``; a folder for another model is refused."""
    config, arrays = read_adapter_files(directory)
    ours = model.peft_config[name] if name in model.peft_config else None
    if ours is None:
        raise FedpalError(f"unknown adapter '{name}'; the model has {sorted(model.peft_config)}")
    if config.get("r") != ours.r or sorted(config.get("target_modules") or []) != sorted(ours.target_modules):
        raise FedpalError(
            f"adapter at {directory} has rank {config.get('r')} on {sorted(config.get('target_modules') or [])}; "
            f"this model's '{name}' adapter has rank {ours.r} on {sorted(ours.target_modules)}"
        )
    arrays_to_adapter(model, name, arrays)


def adapter_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """A short hash of the tensor names and shapes, in order: a client sends it with its
    update so the server can refuse an update for another adapter layout by name."""
    text = "\n".join(f"{name}:{tuple(np.shape(array))}" for name, array in arrays.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_array_record(arrays: Mapping[str, np.ndarray]) -> "ArrayRecord":
    """Named arrays into a Flower ``ArrayRecord`` (names kept, order kept)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: "ArrayRecord") -> dict[str, np.ndarray]:
    """A Flower ``ArrayRecord`` back into named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}
