"""Personalized decoding: one exported base model, each user's adapters hot-swapped per call.

The ONNX Runtime GenAI model is loaded once; a user's adapters are ONNX Runtime adapter
files (see ``onnx_adapters``) loaded into the model's ``Adapters`` registry and activated on
a fresh generator per call, so switching users costs an adapter load, not a model load.

Modes, chosen per call:
- ``base``: the base model alone;
- ``merge``: one adapter, ``w_shared * shared + w_personal * personal`` (rank-concatenated);
- ``fusion``: MOD-style decoding, the next token drawn from
  ``softmax(sum_i w_i log p_i)`` over base, shared and personal, each running in its own
  generator (``set_active_adapter`` only adds adapters, so one generator per combination).
``retrieval=True`` adds the user's most relevant stated preferences after the request (or to the
system message, ``retrieval_in="system"``).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpal.client.home import ClientHome
from fedpal.client.onnx_adapters import ADAPTER_SUFFIX, convert_adapters
from fedpal.client.onnx_export import DEFAULT_MAX_RANK, ExportInfo, check_export, find_export
from fedpal.common.adapters import CONFIG_FILE, PERSONAL, SHARED
from fedpal.common.errors import FedpalError
from fedpal.common.generation import chat_input_ids, place_preferences

if TYPE_CHECKING:
    import onnxruntime_genai as og

MODES = ("base", "merge", "fusion")
MAX_LOADED_ADAPTERS = 32

Adapter = Path | str | None


@dataclass(frozen=True)
class DecodeOptions:
    """How to pick tokens: greedy by default; sampling with temperature, top-p (and top-k) and a seed."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise FedpalError(f"max new tokens must be at least 1, not {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise FedpalError(f"temperature must be positive when sampling, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FedpalError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise FedpalError(f"top-k must be 0 (off) or positive, not {self.top_k}")


@dataclass(frozen=True)
class Reply:
    """One generated reply and what it cost."""

    text: str
    token_ids: tuple[int, ...]
    seconds: float
    mode: str
    prompt_tokens: int

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> str:
        """The one-line JSON the CLI prints."""
        return json.dumps({"text": self.text, "tokens": self.tokens, "seconds": round(self.seconds, 4), "mode": self.mode})


class PersonalizedGenerator:
    """One loaded ORT GenAI model that generates for any user, hot-swapping their adapter files."""

    def __init__(self, export: ExportInfo) -> None:
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        self.export = check_export(export)
        try:
            self.model = og.Model(str(export.path))
        except Exception as err:  # ORT GenAI raises plain RuntimeErrors for unreadable models
            raise FedpalError(f"could not load the export at {export.path}: {str(err).splitlines()[0]}") from None
        self.adapters = og.Adapters(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(export.path)
        self._og_tokenizer = og.Tokenizer(self.model)
        eos = json.loads((export.path / "genai_config.json").read_text())["model"]["eos_token_id"]
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self._loaded: OrderedDict[str, tuple[tuple[int, int], str]] = OrderedDict()
        self._serial = 0

    @classmethod
    def open(
        cls,
        model: str = "default",
        precision: str = "int4",
        target_modules: Sequence[str] | None = None,
        max_rank: int = DEFAULT_MAX_RANK,
        execution_provider: str = "cpu",
    ) -> "PersonalizedGenerator":
        """Load the cached export for these settings (``fedpal export`` makes it)."""
        return cls(find_export(model, precision, target_modules, max_rank, execution_provider))

    # -- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """Token ids of ``prompt`` in the base model's chat template; empty or too long is refused."""
        if not prompt or not prompt.strip():
            raise FedpalError("the prompt is empty")
        return self._fits(chat_input_ids(self.tokenizer, prompt, system))

    def _fits(self, ids: list[int]) -> list[int]:
        if not ids:
            raise FedpalError("the prompt is empty")
        if len(ids) >= self.export.context_length:
            raise FedpalError(
                f"the prompt is {len(ids)} tokens, longer than the model's context of {self.export.context_length} tokens"
            )
        return ids

    # -- adapters --------------------------------------------------------------------------

    def attach(self, adapter_file: Path | str) -> str:
        """Load an adapter file into the model's registry (once per file version); returns its name.

        A file rewritten since it was loaded is loaded again under a new name and the old
        version unloaded; beyond ``MAX_LOADED_ADAPTERS`` the least recently used goes.
        """
        path = Path(adapter_file).resolve()
        if not path.is_file():
            raise FedpalError(f"no adapter file at {path}")
        stat = path.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        key = str(path)
        cached = self._loaded.get(key)
        if cached is not None and cached[0] == version:
            self._loaded.move_to_end(key)
            return cached[1]
        if cached is not None:
            self._unload(key)
        self._serial += 1
        name = f"a{self._serial}"
        try:
            self.adapters.load(key, name)
        except Exception as err:  # ORT raises RuntimeError with the flatbuffer/loader message
            raise FedpalError(f"could not load adapter file {path}: {str(err).splitlines()[0]}") from None
        self._loaded[key] = (version, name)
        while len(self._loaded) > MAX_LOADED_ADAPTERS:
            self._unload(next(iter(self._loaded)))
        return name

    def _unload(self, key: str) -> None:
        _, name = self._loaded.pop(key)
        try:
            self.adapters.unload(name)
        except RuntimeError:
            pass  # still active in a live generator, so ORT keeps it; its unique name is never reused

    def user_adapter(
        self, home: ClientHome | Path | str, w_shared: float = 1.0, w_personal: float = 1.0
    ) -> Path:
        """The user's ``w_shared * shared + w_personal * personal`` adapter file, converted if needed.

        Adapters the user has not trained yet (no folder) or weighted 0 are left out.
        """
        home = home if isinstance(home, ClientHome) else ClientHome.at(home)
        sources = [
            (home.adapter_dir(name), weight)
            for name, weight in ((SHARED, w_shared), (PERSONAL, w_personal))
            if weight != 0 and (home.adapter_dir(name) / CONFIG_FILE).is_file()
        ]
        if not sources:
            raise FedpalError(
                f"{home.root} has no trained shared or personal adapter with a non-zero weight; train first or use --mode base"
            )
        label = "-".join(f"{Path(folder).name}{weight:g}" for folder, weight in sources)
        out = home.runtime / f"{self.export.key}" / f"{label}{ADAPTER_SUFFIX}"
        return convert_adapters(self.export, sources, out)

    # -- decoding --------------------------------------------------------------------------

    def new_generator(self, prompt_len: int, options: DecodeOptions, adapter: Adapter = None) -> "og.Generator":
        """A fresh ORT GenAI generator with ``adapter`` active: the unit of an adapter swap."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        search = {
            "max_length": min(self.export.context_length, prompt_len + options.max_new_tokens),
            "do_sample": options.do_sample,
            "batch_size": 1,
        }
        if options.do_sample:
            search.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
            if options.seed is not None:
                search["random_seed"] = int(options.seed)
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, self.attach(adapter))
        return generator

    def stream(
        self,
        prompt: str | Sequence[int],
        adapter: Adapter = None,
        options: DecodeOptions | None = None,
        system: str | None = None,
        fusion: Sequence[tuple[Adapter, float]] | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one by one until EOS or the token limit (EOS is not yielded).

        ``fusion`` replaces ``adapter`` with a list of (adapter or None for base, weight).
        """
        options = options or DecodeOptions()
        options.check()
        ids = self._fits(list(prompt)) if not isinstance(prompt, str) else self.prompt_ids(prompt, system)
        if fusion is not None:
            yield from self._stream_fused(ids, options, fusion)
            return
        generator = self.new_generator(len(ids), options, adapter)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_token_ids:
                return
            yield token

    def _stream_fused(self, ids: list[int], options: DecodeOptions, parts: Sequence[tuple[Adapter, float]]) -> Iterator[int]:
        """MOD-style decoding: ORT GenAI has no multi-model fusion, so the per-token
        combination is done here. The first component's generator samples from the fused
        log-probabilities (``set_logits``), so greedy/temperature/top-p/seed are ORT's own;
        the others are fed the chosen token."""
        active = [(adapter, float(weight)) for adapter, weight in parts if weight != 0]
        if not active:
            raise FedpalError("fusion needs at least one non-zero weight")
        generators = [(self.new_generator(len(ids), options, adapter), weight) for adapter, weight in active]
        for generator, _ in generators:
            generator.append_tokens(np.asarray([ids], dtype=np.int32))
        leader = generators[0][0]
        while not leader.is_done():
            fused = None
            for generator, weight in generators:
                logits = generator.get_logits().astype(np.float64)
                term = weight * _log_softmax(logits)
                fused = term if fused is None else fused + term
            leader.set_logits(fused.astype(np.float32))
            leader.generate_next_token()
            token = int(leader.get_next_tokens()[0])
            if token in self.eos_token_ids:
                return
            yield token
            if leader.is_done():
                return
            for generator, _ in generators[1:]:
                generator.append_tokens(np.asarray([[token]], dtype=np.int32))

    def generate(
        self,
        prompt: str,
        adapter: Adapter = None,
        options: DecodeOptions | None = None,
        system: str | None = None,
        fusion: Sequence[tuple[Adapter, float]] | None = None,
        on_token: Callable[[str], None] | None = None,
        mode: str | None = None,
    ) -> Reply:
        """Generate a whole reply; ``on_token`` receives the text of each token as it is made."""
        start = time.perf_counter()
        ids = self.prompt_ids(prompt, system)
        stream = self._og_tokenizer.create_stream() if on_token is not None else None
        tokens = []
        for token in self.stream(ids, adapter=adapter, options=options, fusion=fusion):
            tokens.append(token)
            if stream is not None:
                on_token(stream.decode(token))
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        label = mode or ("fusion" if fusion is not None else "merge" if adapter is not None else "base")
        return Reply(text, tuple(tokens), time.perf_counter() - start, label, len(ids))

    def next_logits(self, ids: Sequence[int], adapter: Adapter = None) -> np.ndarray:
        """Logits of the token after ``ids`` (a vector over the vocabulary), for checks and scoring."""
        generator = self.new_generator(len(ids), DecodeOptions(max_new_tokens=1), adapter)
        generator.append_tokens(np.asarray([list(ids)], dtype=np.int32))
        return np.array(generator.get_logits()).reshape(-1)

    def generate_for(
        self,
        home: ClientHome | Path | str,
        prompt: str,
        mode: str = "merge",
        w_shared: float = 1.0,
        w_personal: float = 1.0,
        w_base: float = 0.0,
        retrieval: bool = False,
        passphrase: str | None = None,
        options: DecodeOptions | None = None,
        system: str | None = None,
        on_token: Callable[[str], None] | None = None,
        retrieval_in: str = "prompt",
    ) -> Reply:
        """Reply to ``prompt`` as the user living in ``home`` would want, in the given mode.

        merge weights: ``w_shared``, ``w_personal``; fusion weights: ``w_base``, ``w_shared``, ``w_personal``.
        ``retrieval`` adds the user's most relevant stated preferences to the ``retrieval_in``
        (``prompt`` or ``system``; see :func:`fedpal.common.generation.place_preferences`).
        """
        if mode not in MODES:
            raise FedpalError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
        home = home if isinstance(home, ClientHome) else ClientHome.at(home)
        if not prompt or not prompt.strip():
            raise FedpalError("the prompt is empty")
        if retrieval:
            prompt, system = place_preferences(prompt, system, retrieve_preferences(home, prompt, passphrase), retrieval_in)
        label = mode + ("+retrieval" if retrieval else "")
        if mode == "base":
            return self.generate(prompt, None, options, system, on_token=on_token, mode=label)
        if mode == "merge":
            adapter = self.user_adapter(home, w_shared, w_personal)
            return self.generate(prompt, adapter, options, system, on_token=on_token, mode=label)
        parts: list[tuple[Adapter, float]] = [(None, w_base)]
        for name, weight in ((SHARED, w_shared), (PERSONAL, w_personal)):
            if not weight:
                continue
            if not (home.adapter_dir(name) / CONFIG_FILE).is_file():
                raise FedpalError(f"fusion gives the {name} adapter weight {weight:g}, but {home.root} has no {name} adapter")
            one = (1.0, 0.0) if name == SHARED else (0.0, 1.0)
            parts.append((self.user_adapter(home, *one), weight))
        return self.generate(prompt, None, options, system, fusion=parts, on_token=on_token, mode=label)


def retrieve_preferences(home: ClientHome, prompt: str, passphrase: str | None = None, k: int = 5) -> list[str]:
    """The user's ``k`` stated preferences most relevant to ``prompt``, from their encrypted memory."""
    from fedpal.client.memory import PreferenceMemory

    if PreferenceMemory.key_source(home.root) is None:
        return []  # no memory yet: nothing stated, and opening would create one
    with PreferenceMemory.open(home.root, passphrase=passphrase) as memory:
        return list(memory.stated_preferences(prompt, k=k))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
