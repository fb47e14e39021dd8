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
- ``rerank``: reward-guided best-of-n. Drafts: the user's adapters' reply, the base
  model's reply (with the retrieved preferences when ``retrieval``), its plain reply and
  its replies in a few :data:`REGISTERS`; the user's reward model
  (:mod:`fedpal.client.reward`, fitted on their own pairs) scores each draft from the
  base model's hidden states and the best one is the answer. It costs one generation per
  draft and one forward pass per new draft to score; the draft generations are memoised
  (greedy only), so drafts shared between users or calls are made once per process.
``retrieval=True`` adds the user's most relevant stated preferences after the request (or to the
system message, ``retrieval_in="system"``).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpal.client.home import ClientHome
from fedpal.client.onnx_adapters import ADAPTER_SUFFIX, convert_adapters
from fedpal.client.onnx_export import DEFAULT_MAX_RANK, DEFAULT_PRECISION, ExportInfo, check_export, find_export
from fedpal.common.adapters import CONFIG_FILE, PERSONAL, SHARED
from fedpal.common.errors import FedpalError, first_line
from fedpal.common.generation import chat_input_ids, place_preferences

if TYPE_CHECKING:
    import onnxruntime_genai as og

    from fedpal.client.memory import PreferenceMemory
    from fedpal.client.reward import RewardModel

DEFAULT_MODE = "merge"
"""What ``fedpal generate`` and ``chat`` use unless told otherwise."""
MAX_LOADED_ADAPTERS = 32
MEMO_SIZE = 4096
REGISTERS = (
    "Answer in one short sentence.",
    "Answer with a bulleted list of three to five points.",
    "Answer warmly and enthusiastically, then ask me a follow-up question.",
    "Give a detailed answer with a concrete example.",
)
"""Instructions that draft the reranked replies in different registers (short, listed, warm,
detailed): generic ways of answering, not anyone's preference, so the user's reward has
something to choose from. The simulation's candidate styles use the same instructions."""

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
    draft: str | None = None
    """In rerank mode, which draft won (``adapter``, ``base``, ``retrieval`` or a register)."""

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> str:
        """The one-line JSON the CLI prints."""
        data = {"text": self.text, "tokens": self.tokens, "seconds": round(self.seconds, 4), "mode": self.mode}
        if self.draft is not None:
            data["draft"] = self.draft
        return json.dumps(data)


def home_export(home: ClientHome, model: str | None = None, precision: str | None = None) -> ExportInfo:
    """The export ``home`` answers with: the one ``fedpal export`` recorded there, unless ``model``
    or ``precision`` name another (cached) one. Reads manifests only: no model is loaded."""
    record = home.export_record()
    if record is None and model is None and precision is None:
        raise FedpalError(f"no export for {home.root} yet; run: fedpal export --home {home.root}")
    record = record or {}
    return find_export(
        model or record.get("model", "default"),
        precision or record.get("precision", DEFAULT_PRECISION),
        home.adapter_targets(),
        int(record.get("max_rank", DEFAULT_MAX_RANK)),
        record.get("provider", "cpu"),
        home=home.root,
    )


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota of this container ("max 100000": none; "200000 100000": 2 CPUs)."""


def decode_threads(cpu_max: Path = CPU_MAX) -> int:
    """Threads ONNX Runtime decodes with: the CPU cores this process may run on, capped by a
    container's CPU quota (a 2-CPU container on a 64-core host would otherwise start 64).

    Left unset, ORT GenAI 0.18 decoded the default model at 40-57 tok/s on the 2-core machine
    (one thread: 37-39 tok/s); set to 2 it gave 71-76 tok/s int8 and 83-91 int4 (greedy, 40
    tokens, 12 prompts, 2026-12-01), with the same replies.
    """
    import math
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the cores are what there is
    return cores


class PersonalizedGenerator:
    """One loaded ORT GenAI model that generates for any user, hot-swapping their adapter files.

    ``threads``: ONNX Runtime's intra-op threads (default :func:`decode_threads`).
    """

    def __init__(self, export: ExportInfo, threads: int | None = None) -> None:
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        self.export = check_export(export)
        try:
            config = og.Config(str(export.path))
            options = {"intra_op_num_threads": int(threads or decode_threads())}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(config)
        except Exception as err:  # ORT GenAI raises plain RuntimeErrors for unreadable models
            raise FedpalError(f"could not load the export at {export.path}: {first_line(err)}") from None
        self.adapters = og.Adapters(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(export.path)
        self._og_tokenizer = og.Tokenizer(self.model)
        eos = json.loads((export.path / "genai_config.json").read_text())["model"]["eos_token_id"]
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self._loaded: OrderedDict[str, tuple[tuple[int, int], str]] = OrderedDict()
        self._serial = 0
        self._memo: OrderedDict[tuple, Reply] = OrderedDict()
        self._features: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._rewards: dict[tuple, "RewardModel | None"] = {}
        self._memories: dict[tuple[str, str | None], "PreferenceMemory"] = {}

    @classmethod
    def open(
        cls,
        model: str = "default",
        precision: str = DEFAULT_PRECISION,
        target_modules: Sequence[str] | None = None,
        max_rank: int = DEFAULT_MAX_RANK,
        execution_provider: str = "cpu",
    ) -> "PersonalizedGenerator":
        """Load the cached export for these settings (``fedpal export`` makes it)."""
        return cls(find_export(model, precision, target_modules, max_rank, execution_provider))

    @classmethod
    def for_home(
        cls, home: ClientHome | Path | str, model: str | None = None, precision: str | None = None
    ) -> "PersonalizedGenerator":
        """The generator a user's home answers with: the export ``fedpal export`` recorded there,
        unless ``model`` or ``precision`` name another (cached) one."""
        return cls(home_export(home if isinstance(home, ClientHome) else ClientHome.at(home), model, precision))

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
                f"the prompt is {len(ids)} tokens, longer than the model's context of {self.export.context_length} "
                "tokens"
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
            raise FedpalError(f"could not load adapter file {path}: {first_line(err)}") from None
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

    def user_adapter(self, home: ClientHome | Path | str, w_shared: float = 1.0, w_personal: float = 1.0) -> Path:
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
                f"{home.root} has no trained shared or personal adapter with a non-zero weight; train first or use "
                "--mode base"
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

    def _stream_fused(
        self, ids: list[int], options: DecodeOptions, parts: Sequence[tuple[Adapter, float]]
    ) -> Iterator[int]:
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
        """Generate a whole reply; ``on_token`` receives the text of each token as it is made.

        Greedy replies without streaming are memoised per prompt, adapter file version and
        options: the same call made again (by another user's rerank, say) is free.
        """
        start = time.perf_counter()
        ids = self.prompt_ids(prompt, system)
        options = options or DecodeOptions()
        key = None
        if on_token is None and not options.do_sample:
            key = (
                tuple(ids),
                self._adapter_key(adapter),
                tuple((a and self._adapter_key(a), w) for a, w in fusion or ()),
                options.max_new_tokens,
            )
            if key in self._memo:
                self._memo.move_to_end(key)
                return replace(self._memo[key], mode=mode or self._memo[key].mode)
        stream = self._og_tokenizer.create_stream() if on_token is not None else None
        tokens = []
        for token in self.stream(ids, adapter=adapter, options=options, fusion=fusion):
            tokens.append(token)
            if stream is not None:
                on_token(stream.decode(token))
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        label = mode or ("fusion" if fusion is not None else "merge" if adapter is not None else "base")
        reply = Reply(text, tuple(tokens), time.perf_counter() - start, label, len(ids))
        if key is not None:
            self._memo[key] = reply
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        return reply

    def clear_memo(self) -> None:
        """Forget memoised replies and features (benchmarks time real work with it)."""
        self._memo.clear()
        self._features.clear()

    def _adapter_key(self, adapter: Adapter) -> tuple | None:
        if adapter is None:
            return None
        path = Path(adapter).resolve()
        stat = path.stat() if path.is_file() else None
        return (str(path), stat.st_mtime_ns if stat else None, stat.st_size if stat else None)

    # -- reward-guided decoding --------------------------------------------------------------

    def reply_features(self, prompt: str, reply: str, system: str | None = None) -> np.ndarray:
        """What the reward model sees of ``reply`` to ``prompt``: the base model's last hidden
        state averaged over the reply's tokens, and the reply's log length in tokens."""
        key = (prompt, system, reply)
        cached = self._features.get(key)
        if cached is not None:
            return cached
        context = chat_input_ids(self.tokenizer, prompt, system)
        reply_ids = list(self.tokenizer(reply, add_special_tokens=False)["input_ids"]) + [min(self.eos_token_ids)]
        ids = self._fits(context + reply_ids)
        generator = self.new_generator(len(ids), DecodeOptions(max_new_tokens=1))
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        hidden = np.asarray(generator.get_output("hidden_states"), dtype=np.float64).reshape(len(ids), -1)
        features = np.concatenate([hidden[len(context) :].mean(axis=0), [np.log1p(len(reply_ids))]])
        self._features[key] = features
        while len(self._features) > MEMO_SIZE:
            self._features.popitem(last=False)
        return features

    def memory(self, home: ClientHome, passphrase: str | None = None) -> "PreferenceMemory | None":
        """The user's memory, opened once per generator (None: the home has no memory yet).

        Unlocking costs an Argon2id derivation (~0.1-0.2 s), more than a short reply; the open
        memory sees later writes from any process (it reloads when SQLite's data version moves).
        """
        from fedpal.client.memory import PreferenceMemory

        if PreferenceMemory.key_source(home.root) is None:
            return None  # no memory yet: nothing stated, and opening would create one
        key = (str(home.root), passphrase)
        if key not in self._memories:
            self._memories[key] = PreferenceMemory.open(home.root, passphrase=passphrase)
        return self._memories[key]

    def stated_preferences(self, home: ClientHome, prompt: str, passphrase: str | None = None, k: int = 5) -> list[str]:
        """The user's ``k`` stated preferences most relevant to ``prompt``, from their encrypted memory."""
        memory = self.memory(home, passphrase)
        return list(memory.stated_preferences(prompt, k=k)) if memory is not None else []

    def user_reward(self, home: ClientHome, passphrase: str | None = None) -> "RewardModel | None":
        """The reward model of the user in ``home``, fitted on their memory's pairs (None: too few pairs).

        It is saved beside the runtime adapters with a fingerprint of the pairs, and
        refitted only when the memory's pairs change.
        """
        from fedpal.client.reward import MIN_PAIRS, REWARD_FILE, RewardModel, fit_reward, pairs_fingerprint

        memory = self.memory(home, passphrase)
        if memory is None:
            return None
        version = (str(home.root), memory.version())
        if version in self._rewards:
            return self._rewards[version]
        pairs = memory.preference_pairs()
        triples = [(p.prompt, p.chosen, p.rejected) for p in pairs]
        fingerprint = pairs_fingerprint(triples)
        path = home.runtime / self.export.key / REWARD_FILE
        model = None
        if path.is_file():
            saved = RewardModel.load(path)
            model = saved if saved.fingerprint == fingerprint else None
        if model is None and len(pairs) >= MIN_PAIRS:
            chosen = np.stack([self.reply_features(p, c) for p, c, _ in triples])
            rejected = np.stack([self.reply_features(p, r) for p, _, r in triples])
            model = fit_reward(chosen, rejected, [p for p, _, _ in triples], fingerprint)
            model.save(path)
        self._rewards[version] = model
        return model

    def rerank(
        self,
        home: ClientHome,
        prompt: str,
        system: str | None,
        context: tuple[str, str | None],
        options: DecodeOptions | None,
        w_shared: float,
        w_personal: float,
        passphrase: str | None,
        label: str,
    ) -> Reply:
        """Reward-guided best-of-n (see the module docstring): ``prompt``/``system`` as the user
        asked, ``context`` the same with the retrieved preferences placed."""
        start = time.perf_counter()
        drafts: dict[str, Reply] = {}
        if _trained(home, w_shared, w_personal):
            drafts["adapter"] = self.generate(
                context[0], self.user_adapter(home, w_shared, w_personal), options, context[1]
            )
        if context != (prompt, system):
            drafts["retrieval"] = self.generate(context[0], None, options, context[1])
        drafts["base"] = self.generate(prompt, None, options, system)
        for register in REGISTERS:
            drafts[register] = self.generate(f"{prompt}\n\n{register}", None, options, system)
        reward = self.user_reward(home, passphrase)
        if reward is None:  # too few pairs to learn from: the adapters' reply, as merge would give
            name = next(iter(drafts))
        else:
            texts = {name: reply.text for name, reply in drafts.items() if reply.text}
            if not texts:
                name = next(iter(drafts))
            else:
                scores = reward.scores(np.stack([self.reply_features(prompt, text, system) for text in texts.values()]))
                name = list(texts)[int(np.argmax(scores))]
        best = drafts[name]
        return replace(best, seconds=time.perf_counter() - start, mode=label, draft=name)

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
        asked = (prompt, system)
        if retrieval:
            prompt, system = place_preferences(
                prompt, system, self.stated_preferences(home, prompt, passphrase), retrieval_in
            )
        request = ModeRequest(
            home,
            prompt,
            system,
            asked,
            options,
            w_base,
            w_shared,
            w_personal,
            passphrase,
            on_token,
            mode + ("+retrieval" if retrieval else ""),
        )
        return MODES[mode](self, request)


@dataclass(frozen=True)
class ModeRequest:
    """One reply to make in a generation mode: the user's home, the prompt as the model sees it
    (retrieved preferences placed), as the user asked it (``asked``), and the mode's weights."""

    home: ClientHome
    prompt: str
    system: str | None
    asked: tuple[str, str | None]
    options: DecodeOptions | None
    w_base: float
    w_shared: float
    w_personal: float
    passphrase: str | None
    on_token: Callable[[str], None] | None
    label: str
    """What the reply's ``mode`` field says (``merge+retrieval``, ...)."""


GenerationMode = Callable[[PersonalizedGenerator, ModeRequest], Reply]
MODES: dict[str, GenerationMode] = {}
"""Generation modes by name: ``fedpal generate --mode NAME`` and ``generate_for(mode=NAME)``."""


def generation_mode(name: str) -> Callable[[GenerationMode], GenerationMode]:
    """Register a generation mode under ``name`` (a decorator)::

    @generation_mode("shout")
    def shout(generator, request):
        reply = MODES["merge"](generator, request)
        return replace(reply, text=reply.text.upper())
    """

    def register(mode: GenerationMode) -> GenerationMode:
        MODES[name] = mode
        return mode

    return register


@generation_mode("base")
def _base(generator: PersonalizedGenerator, r: ModeRequest) -> Reply:
    """The base model, no adapter."""
    return generator.generate(r.prompt, None, r.options, r.system, on_token=r.on_token, mode=r.label)


@generation_mode("merge")
def _merge(generator: PersonalizedGenerator, r: ModeRequest) -> Reply:
    """The user's adapters merged by weight into one LoRA pair (the base model until one is trained)."""
    if not _trained(r.home, r.w_shared, r.w_personal):  # nothing trained, or nothing passed the guard yet
        return generator.generate(
            r.prompt, None, r.options, r.system, on_token=r.on_token, mode=r.label.replace("merge", "base")
        )
    adapter = generator.user_adapter(r.home, r.w_shared, r.w_personal)
    return generator.generate(r.prompt, adapter, r.options, r.system, on_token=r.on_token, mode=r.label)


@generation_mode("fusion")
def _fusion(generator: PersonalizedGenerator, r: ModeRequest) -> Reply:
    """The base model's and each adapter's next-token distributions mixed by weight."""
    parts: list[tuple[Adapter, float]] = [(None, r.w_base)]
    for name, weight in ((SHARED, r.w_shared), (PERSONAL, r.w_personal)):
        if not weight:
            continue
        if not (r.home.adapter_dir(name) / CONFIG_FILE).is_file():
            raise FedpalError(
                f"fusion gives the {name} adapter weight {weight:g}, but {r.home.root} has no {name} adapter"
            )
        one = (1.0, 0.0) if name == SHARED else (0.0, 1.0)
        parts.append((generator.user_adapter(r.home, *one), weight))
    return generator.generate(r.prompt, None, r.options, r.system, fusion=parts, on_token=r.on_token, mode=r.label)


@generation_mode("rerank")
def _rerank(generator: PersonalizedGenerator, r: ModeRequest) -> Reply:
    """Reward-guided best-of-n among drafts (see the module docstring)."""
    reply = generator.rerank(
        r.home, *r.asked, (r.prompt, r.system), r.options, r.w_shared, r.w_personal, r.passphrase, r.label
    )
    if r.on_token is not None:
        r.on_token(reply.text)
    return reply


def _trained(home: ClientHome, w_shared: float, w_personal: float) -> bool:
    """Whether the home has an adapter with a non-zero weight to answer with."""
    return any(
        weight and (home.adapter_dir(name) / CONFIG_FILE).is_file()
        for name, weight in ((SHARED, w_shared), (PERSONAL, w_personal))
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
