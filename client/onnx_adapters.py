"""Convert peft adapter folders into ONNX Runtime adapter files for one export.

A file holds, for every LoRA input of the export, A as [in, r] and B as [r, out] with the
LoRA scaling folded into B, which is what the exported graph computes (x @ A @ B). A
weighted merge of several adapters is written as one adapter of the summed rank:
A = [A_1 | A_2], B = [w_1 s_1 B_1 ; w_2 s_2 B_2] gives x A B = sum_i w_i s_i x A_i B_i,
exactly the weighted sum of the adapters' updates (no SVD truncation, no approximation).

Conversion is skipped when a stamp next to the file shows the same sources (content hash),
weights and export: users switch adapters often but retrain rarely.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedpal.client.onnx_export import ExportInfo
from fedpal.client.onnx_graph import LoraInput
from fedpal.common.adapters import CONFIG_FILE, WEIGHTS_FILE, LoraName, read_adapter_files
from fedpal.common.files import atomic_path
from fedpal.common.errors import FedpalError

ADAPTER_SUFFIX = ".onnx_adapter"
STAMP_SUFFIX = ".stamp.json"
CONVERTER_VERSION = 2
"""2: packed Q/K/V inputs (export format 3)."""


def source_hash(folder: Path) -> str:
    """Content hash of a peft adapter folder (config and weights)."""
    folder = Path(folder)
    hasher = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = folder / name
        if not path.is_file():
            raise FedpalError(f"{folder} is not an adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        hasher.update(name.encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


def convert_adapters(export: ExportInfo, sources: Sequence[tuple[Path | str, float]], out_file: Path | str) -> Path:
    """Write ``sum_i w_i * adapter_i`` (rank-concatenated) as an ONNX Runtime adapter file for ``export``.

    Returns ``out_file``; nothing is rewritten when its stamp already matches the sources.
    """
    if not sources:
        raise FedpalError("no adapters to convert")
    out_file = Path(out_file)
    stamp = {
        "converter": CONVERTER_VERSION,
        "export": export.key,
        "sources": [[str(Path(s).resolve()), source_hash(Path(s)), float(w)] for s, w in sources],
    }
    stamp_file = out_file.with_name(out_file.name + STAMP_SUFFIX)
    if out_file.is_file() and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return out_file
        except ValueError:
            pass  # an unreadable stamp means convert again
    parameters = merged_parameters(export, sources)
    _write_adapter(parameters, out_file)
    stamp_file.write_text(json.dumps(stamp, indent=2))
    return out_file


def merged_parameters(export: ExportInfo, sources: Sequence[tuple[Path | str, float]]) -> dict[str, np.ndarray]:
    """The export's LoRA inputs for the weighted, rank-concatenated sum of ``sources``."""
    parts: dict[str, list[np.ndarray]] = {i.name: [] for i in export.lora_inputs}
    total_rank = 0
    dtype = np.dtype(export.lora_dtype)
    for folder, weight in sources:
        rank, slots = _adapter_slots(export, Path(folder))
        total_rank += rank
        for spec in export.lora_inputs:
            parts[spec.name].append(_input_part(spec, rank, weight, slots))
    if total_rank > export.max_rank:
        raise FedpalError(
            f"the combined adapter rank {total_rank} is larger than this export allows ({export.max_rank}); "
            "re-export with a larger --max-rank"
        )
    axis = {i.name: (1 if i.part == "A" else 0) for i in export.lora_inputs}
    return {
        name: np.ascontiguousarray(np.concatenate(arrays, axis=axis[name]).astype(dtype))
        for name, arrays in parts.items()
    }


def _input_part(spec: LoraInput, rank: int, weight: float, slots: dict) -> np.ndarray:
    """One adapter's share of one graph input: its A (or weighted B) for each module the input
    carries, zeros where the adapter has none; a packed input's B is block-diagonal."""
    modules = spec.modules()
    pairs = [slots.get((spec.layer, module), (None, None)) for module in modules]
    if spec.part == "A":
        return np.concatenate([a if a is not None else np.zeros((spec.rows, rank), np.float32) for a, _ in pairs], 1)
    out = np.zeros((rank * len(modules), spec.cols), np.float32)
    for j, (_, b) in enumerate(pairs):
        if b is not None:
            start = spec.block(modules[j])[0]
            out[j * rank : (j + 1) * rank, start : start + b.shape[1]] = weight * b
    return out


def _adapter_slots(
    export: ExportInfo, folder: Path
) -> tuple[int, dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]]:
    """Check one peft adapter against the export; return its rank and scaled (A^T, (sB)^T) per layer/module."""
    config, arrays = read_adapter_files(folder)
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise FedpalError(f"adapter at {folder} is not a plain LoRA adapter (DoRA and other types are not supported)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise FedpalError(f"adapter at {folder} uses per-module ranks or alphas, which the runtime does not support")
    rank = int(config.get("r", 0))
    alpha = float(config.get("lora_alpha", rank))
    if rank < 1:
        raise FedpalError(f"adapter at {folder} has rank {rank}")
    if rank > export.max_rank:
        raise FedpalError(f"adapter at {folder} has rank {rank}, larger than this export allows ({export.max_rank})")
    scale = alpha / np.sqrt(rank) if config.get("use_rslora") else alpha / rank
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        lora = LoraName.parse(key)
        if lora is None:
            raise FedpalError(f"adapter at {folder} has tensor {key}, which is not a LoRA A/B weight")
        layer, module, part = lora.layer, lora.module, lora.part
        if module not in export.target_modules:
            raise FedpalError(
                f"adapter at {folder} targets {module}, which the export (targets {list(export.target_modules)}) "
                "has no LoRA input for; export again for these targets"
            )
        spec = export.lora_input(layer, module, part)
        if spec is None:
            raise FedpalError(
                f"adapter at {folder} has {key}, which this export has no input for: it is for another base model"
            )
        want = (rank, spec.rows) if part == "A" else (spec.block(module)[1], rank)
        if array.shape != want:
            raise FedpalError(
                f"adapter at {folder} does not fit this export: {key} has shape {tuple(array.shape)}, expected {want} "
                "(an adapter for another base model?)"
            )
        if not np.all(np.isfinite(array)):
            raise FedpalError(f"adapter at {folder} has non-finite values in {key}")
        found.setdefault((layer, module), {})[part] = array
    slots = {}
    for slot, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise FedpalError(
                f"adapter at {folder} has lora_A without lora_B (or the reverse) for layer {slot[0]} {slot[1]}"
            )
        slots[slot] = (pair["A"].T.astype(np.float32), (scale * pair["B"]).T.astype(np.float32))
    if not slots:
        raise FedpalError(f"adapter at {folder} has no LoRA weights")
    return rank, slots


def _write_adapter(parameters: dict[str, np.ndarray], out_file: Path) -> None:
    import onnxruntime as ort

    out_file.parent.mkdir(parents=True, exist_ok=True)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(CONVERTER_VERSION)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in parameters.items()})
    with atomic_path(out_file) as tmp:
        adapter.export_adapter(str(tmp))
