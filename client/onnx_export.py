"""Export a base model once to ONNX Runtime GenAI, with LoRA weights as run-time inputs.

Every user's adapters ride on one exported base model, so the export must not contain any
particular adapter. ``onnxruntime_genai.models.builder`` can only bake one peft adapter in
(``adapter_path``: extra ``lora_A``/``lora_B`` MatMuls whose weights are initializers).
We export with a throw-away template adapter of the right targets and then rewrite the
graph so each LoRA weight is a graph input with a symbolic rank: no adapter file is ever
baked in and any adapter of the same targets (rank up to ``max_rank``) can be attached at
run time through ``onnxruntime_genai.Adapters``. The inputs keep a zero-rank default
initializer, so a session with no adapter active runs the base model (a rank-0 LoRA branch
adds exactly zero) without feeding anything.

The graph also outputs the final hidden states (``hidden_states``, beside the logits): a
user's reward model scores replies with features read from the same session that writes
them, so reward-guided decoding needs no second model.

Exports are cached under ``fedpal_home()/"exports"/<key>``; the key names the base model
folder, targets, precision, execution provider and maximum rank, and a manifest written
last records it together with a fingerprint of the base weights, so a half-written,
mismatched or stale export is detected instead of silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


from fedpal.client.onnx_graph import LoraInput, rewrite_export
from fedpal.common.adapters import AdapterConfig
from fedpal.common.config import fedpal_home
from fedpal.common.errors import FedpalError, first_line
from fedpal.common.files import staged_folder
from fedpal.common.models import resolve_model_path

EXPORT_FORMAT = 3
"""3: Q/K/V packed into one projection with one LoRA pair (``fedpal.client.onnx_graph``)."""
MANIFEST = "fedpal_export.json"
PRECISIONS = ("int4", "int8", "fp32")
DEFAULT_PRECISION = "int8"
"""Measured on the default model (README): int8 keeps a trained style (bulleted replies 1.00 vs
0.96 in fp32) where int4 rounding undoes part of it (0.79), at 0.8x int4's tokens per second."""
QUANT_BLOCK_SIZE = {"int4": 32, "int8": 32}
"""Weights per quantization scale (the builder's ``block_size``), by precision."""
PROVIDERS = ("cpu", "cuda")
DEFAULT_MAX_RANK = 64
TEMPLATE_RANK = 8
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


@dataclass(frozen=True)
class ExportInfo:
    """The manifest of one export: what it was built from and which LoRA inputs it takes."""

    path: Path
    key: str
    base_model: str
    base_fingerprint: str
    precision: str
    execution_provider: str
    target_modules: tuple[str, ...]
    max_rank: int
    num_layers: int
    context_length: int
    lora_dtype: str
    lora_inputs: tuple[LoraInput, ...] = field(default=())
    format: int = EXPORT_FORMAT

    def lora_input(self, layer: int, module: str, part: str) -> LoraInput | None:
        """The graph input carrying one adapter (layer, module, A/B), packed or not; None if the
        export has no such LoRA."""
        return self._by_slot().get((layer, module, part))

    def _by_slot(self) -> dict[tuple[int, str, str], LoraInput]:
        return {(i.layer, m, i.part): i for i in self.lora_inputs for m in i.modules()}

    def to_json(self) -> str:
        data = asdict(self)
        data["path"] = str(self.path)
        data["target_modules"] = list(self.target_modules)
        return json.dumps(data, indent=2)

    @classmethod
    def read(cls, folder: Path) -> "ExportInfo":
        """Read the manifest in ``folder``; a missing or unreadable one is a ``FedpalError``."""
        manifest = Path(folder) / MANIFEST
        if not manifest.is_file():
            raise FedpalError(f"no complete export at {folder} (no {MANIFEST}); run: fedpal export")
        try:
            data = json.loads(manifest.read_text())
            data["path"] = Path(folder)
            data["target_modules"] = tuple(data["target_modules"])
            data["lora_inputs"] = tuple(LoraInput(**i) for i in data["lora_inputs"])
            return cls(**data)
        except (ValueError, KeyError, TypeError) as err:
            raise FedpalError(f"corrupt export manifest {manifest}: {err}") from None


def export_key(
    model_path: Path, target_modules: Sequence[str], precision: str, max_rank: int, execution_provider: str
) -> str:
    """A short stable name for one export configuration (the cache folder's name)."""
    spec = {
        "model": str(Path(model_path).resolve()),
        "targets": sorted(target_modules),
        "precision": precision,
        "provider": execution_provider,
        "max_rank": int(max_rank),
        "format": EXPORT_FORMAT,
        "block_size": QUANT_BLOCK_SIZE.get(precision),
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{Path(model_path).name}-{precision}-{execution_provider}-r{max_rank}-{digest}"


def base_fingerprint(model_path: Path) -> str:
    """Changes when the base model's config or weight files change (size and mtime, not content: fast)."""
    model_path = Path(model_path)
    hasher = hashlib.sha256((model_path / "config.json").read_bytes())
    for weights in sorted(model_path.glob("*.safetensors")) + sorted(model_path.glob("*.bin")):
        stat = weights.stat()
        hasher.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return hasher.hexdigest()[:16]


def check_provider(execution_provider: str) -> None:
    """Refuse an execution provider this machine cannot run: an export for it would never load.

    CPU is always there; CUDA needs ONNX Runtime GenAI's CUDA build and an NVIDIA GPU,
    which ``onnxruntime_genai.is_cuda_available()`` reports.
    """
    if execution_provider not in PROVIDERS:
        raise FedpalError(f"execution provider must be one of {', '.join(PROVIDERS)}, not '{execution_provider}'")
    if execution_provider == "cuda":
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            raise FedpalError(
                "this machine has no CUDA execution provider for ONNX Runtime GenAI "
                "(it needs an NVIDIA GPU and the onnxruntime-genai-cuda package); use --provider cpu"
            )


def check_loads(info: ExportInfo) -> ExportInfo:
    """Load the export once with ONNX Runtime GenAI: a model that cannot load must not be recorded as a user's."""
    import onnxruntime_genai as og

    try:
        og.Model(str(info.path))
    except Exception as err:  # ORT GenAI raises plain RuntimeErrors
        raise FedpalError(f"the export at {info.path} does not load here: {first_line(err)}") from None
    return info


def _check_options(precision: str, execution_provider: str, max_rank: int, target_modules: Sequence[str]) -> None:
    if precision not in PRECISIONS:
        raise FedpalError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    check_provider(execution_provider)
    if max_rank < 1:
        raise FedpalError(f"max rank must be at least 1, not {max_rank}")
    if not target_modules:
        raise FedpalError("an export needs at least one LoRA target module")


def export_dir(
    model: str = "default",
    precision: str = DEFAULT_PRECISION,
    target_modules: Sequence[str] | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    execution_provider: str = "cpu",
) -> Path:
    """Where the export for these settings lives (whether or not it exists yet)."""
    targets = tuple(target_modules or AdapterConfig().target_modules)
    _check_options(precision, execution_provider, max_rank, targets)
    path = resolve_model_path(model)
    return fedpal_home() / "exports" / export_key(path, targets, precision, max_rank, execution_provider)


def find_export(
    model: str = "default",
    precision: str = DEFAULT_PRECISION,
    target_modules: Sequence[str] | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    execution_provider: str = "cpu",
    home: Path | str | None = None,
) -> ExportInfo:
    """The cached export for these settings; missing or stale is a one-line ``FedpalError``.

    ``home``: the user's home, named in the hint so the suggested command runs as printed.
    """
    folder = export_dir(model, precision, target_modules, max_rank, execution_provider)
    if not folder.exists():
        where = f" --home {home}" if home is not None else ""
        raise FedpalError(
            f"no {precision} export of model '{model}' for these adapters yet; "
            f"run: fedpal export{where} --model {model} --precision {precision}"
            + (f" --provider {execution_provider}" if execution_provider != "cpu" else "")
            + (f" --max-rank {max_rank}" if max_rank != DEFAULT_MAX_RANK else "")
        )
    return check_export(ExportInfo.read(folder))


def check_export(info: ExportInfo) -> ExportInfo:
    """Refuse an export whose manifest does not match its folder or whose base model changed."""
    model_path = Path(info.base_model)
    expected = export_key(model_path, info.target_modules, info.precision, info.max_rank, info.execution_provider)
    if info.format != EXPORT_FORMAT or info.key != expected or info.path.name != info.key:
        raise FedpalError(f"export at {info.path} does not match its manifest (format or key); re-run: fedpal export")
    if not (model_path / "config.json").is_file():
        raise FedpalError(
            f"export at {info.path} was made from {model_path}, which no longer exists; re-run: fedpal export"
        )
    if base_fingerprint(model_path) != info.base_fingerprint:
        raise FedpalError(
            f"export at {info.path} is stale: base model {model_path} changed since; re-run: fedpal export"
        )
    if not (info.path / "genai_config.json").is_file() or not (info.path / "model.onnx").is_file():
        raise FedpalError(
            f"export at {info.path} is incomplete (model.onnx or genai_config.json missing); re-run: fedpal export"
        )
    return info


def export_model(
    model: str = "default",
    precision: str = DEFAULT_PRECISION,
    target_modules: Sequence[str] | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    execution_provider: str = "cpu",
    force: bool = False,
) -> ExportInfo:
    """Export ``model`` once for these settings (cached); a stale or broken cache entry is rebuilt."""
    targets = tuple(sorted(target_modules or AdapterConfig().target_modules))
    folder = export_dir(model, precision, targets, max_rank, execution_provider)
    if folder.exists() and not force:
        try:
            return check_export(ExportInfo.read(folder))
        except FedpalError:
            pass  # stale or half-written: rebuilt below
    model_path = resolve_model_path(model)
    work = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # concurrent exports never share a work folder
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        template = _template_adapter(model_path, targets, work / "template")
        raw = work / "raw"
        _run_builder(model_path, raw, template, precision, execution_provider, targets, work / "cache")
        with staged_folder(folder) as final:  # a reader finds the old export or the new one, whole
            info = _finish_export(raw, final, folder, model_path, precision, execution_provider, targets, max_rank)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


def _finish_export(
    raw: Path,
    final: Path,
    folder: Path,
    model_path: Path,
    precision: str,
    execution_provider: str,
    targets: tuple[str, ...],
    max_rank: int,
) -> ExportInfo:
    """The builder's output in ``raw`` with its LoRA lifted to inputs, into ``final``; the
    manifest is written last, so a folder without one is never mistaken for an export."""
    lora_inputs, lora_dtype, layers = rewrite_export(raw, final, targets)
    missing = sorted(set(targets) - {m for i in lora_inputs for m in i.modules()})
    if missing:
        raise FedpalError(f"the ONNX builder put no LoRA on {missing[0]} for this model; choose other target modules")
    for extra in raw.iterdir():
        if extra.is_file() and not extra.name.startswith("model.onnx"):
            shutil.copy2(extra, final / extra.name)
    context = json.loads((final / "genai_config.json").read_text())["model"]["context_length"]
    info = ExportInfo(
        path=folder,
        key=folder.name,
        base_model=str(model_path),
        base_fingerprint=base_fingerprint(model_path),
        precision=precision,
        execution_provider=execution_provider,
        target_modules=targets,
        max_rank=int(max_rank),
        num_layers=layers,
        context_length=int(context),
        lora_dtype=lora_dtype,
        lora_inputs=tuple(lora_inputs),
    )
    (final / MANIFEST).write_text(info.to_json())
    return info


def _template_adapter(model_path: Path, targets: tuple[str, ...], out: Path) -> Path:
    """A peft adapter with the right targets, only so the builder emits the LoRA subgraphs."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AdapterConfig(rank=TEMPLATE_RANK, alpha=float(TEMPLATE_RANK), target_modules=targets)
    try:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        peft_model = get_peft_model(base, config.lora_config())
    except ValueError as err:
        raise FedpalError(f"cannot put LoRA on {list(targets)} of {model_path}: {first_line(err)}") from None
    peft_model.save_pretrained(str(out))
    return out


def _run_builder(
    model_path: Path, out: Path, adapter: Path, precision: str, provider: str, targets: tuple[str, ...], cache: Path
) -> None:
    """Run the GenAI model builder in a child process (it holds a full torch copy of the model)."""
    # hidden_states: the last layer's output (after the final norm) beside the logits, read by
    # the reward model (``fedpal.client.reward``) from the same session that generates
    options = [f"adapter_path={adapter}", "include_hidden_states=true"]
    if precision in QUANT_BLOCK_SIZE:
        # LoRA MatMuls stay float over the quantized base: their weights become run-time inputs.
        options.append("nodes_to_exclude=" + ",".join(_lora_node_names(model_path, targets)))
        options.append(f"block_size={QUANT_BLOCK_SIZE[precision]}")
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(model_path),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        provider,
        "-c",
        str(cache),
        "--extra_options",
        *options,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        raise FedpalError(f"ONNX export of {model_path} failed: {lines[-1] if lines else 'no output'}")


def _lora_node_names(model_path: Path, targets: tuple[str, ...]) -> list[str]:
    layers = json.loads((model_path / "config.json").read_text()).get("num_hidden_layers", 0)
    names = []
    for layer in range(int(layers)):
        for module in targets:
            group = "attn" if module in _ATTN else "mlp"
            names += [f"/model/layers.{layer}/{group}/{module}/lora_{part}/MatMul" for part in "AB"]
    return names
