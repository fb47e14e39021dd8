"""Local adapter training on the user's own device: DPO on preference pairs, SFT on examples.

Both adapters live in one peft model (``fedpal.common.adapters``). Training one of them
uses as DPO reference "the model without that adapter": the base, plus the received
shared adapter when the personal one is trained. The reference is reached by switching
adapters off, not by a second copy of the model, and its log-probabilities are computed
once per pair before the first step and cached: after that a DPO step costs one forward
and one backward, where a trainer that re-runs the reference each step pays an extra
forward. In every pass a pair's chosen and rejected replies share one copy of their
prompt (``fedpal.client.dpo.pack_sequences``), and the LM head and ``log_softmax`` run only
where a reply token is predicted. TRL's ``DPOTrainer`` does not fit this: it knows one
adapter, and its reference with peft is "all adapters off", which is wrong for the
personal adapter.

Given held-out pairs (the user's own, on prompts the run never trains on), training
stops on them rather than on a step count: the objective being trained (DPO loss, plus
the SFT term's per-token NLL of the chosen replies for "both") is measured on them before
the first step and every ``eval_every`` steps, the weights with the lowest held-out loss
are kept, and ``patience`` evaluations without improvement end the run. ``steps`` is then
only a ceiling. A user's 20-200 pairs overfit within a few epochs (the training loss goes
to 0 while replies start repeating the form the pairs differ in); the held-out loss turns
first. The DPO term alone is a poor stopping signal at a high ``beta``: it saturates
after a few steps, while the chosen replies' form (bullets, say) is still being learned;
on the style suite it stopped "bulleted" users at step 8 with 17% bulleted replies.

A checkpoint (adapter tensors, optimizer, step, RNG, early-stopping state) lets a killed
run resume and end with the weights an uninterrupted run would have. A non-finite loss,
gradient or weight stops training and puts back the last good weights instead of
returning a broken adapter.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpal.client.dpo import IGNORE, Encoded, dpo_loss, encode_reply, pack_sequences, packed_logprobs
from fedpal.common.adapters import activate
from fedpal.common.files import atomic_path
from fedpal.common.errors import FedpalError
from fedpal.common.generation import chat_input_ids
from fedpal.common.types import PreferencePair, SFTExample

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from fedpal.common.models import BaseModel
    from fedpal.common.settings import FederationSettings

log = logging.getLogger("fedpal.client")

OBJECTIVES = ("dpo", "sft", "both")
CHECKPOINT_VERSION = 1
NO_PAIRS = (
    "no preference pairs to train on: add some to the memory first "
    "(/rate and /pick in `fedpal chat`, or `fedpal memory add pair PROMPT CHOSEN REJECTED`)"
)
NO_EXAMPLES = (
    "nothing to train on: SFT needs examples or preference pairs in the memory "
    "(`fedpal memory add pair PROMPT CHOSEN REJECTED` gives both)"
)

EARLIER_KEPT = 3
"""Earlier held-out improvements a run keeps to fall back on (``LocalTrainer.fall_back``)."""


@dataclass
class TrainConfig:
    """How one local training run goes.

    ``batch_size``/``max_length`` left at ``None`` come from the device profile.
    ``proximal_mu`` > 0 adds FedProx's ``mu/2 * ||w - w_received||^2`` over the trained
    adapter, which keeps a client's shared update near the global one on skewed data.
    ``sft_weight`` scales the SFT term of the "both" objective. ``checkpoint_every`` = 0
    writes no checkpoints even with a checkpoint folder. ``eval_every`` and ``patience``
    drive early stopping when the run is given held-out pairs (see the module docstring).
    """

    objective: str = "dpo"
    steps: int = 30
    learning_rate: float = 5e-4
    beta: float = 0.1
    batch_size: int | None = None
    max_length: int | None = None
    seed: int = 0
    proximal_mu: float = 0.0
    time_budget_s: float | None = None
    sft_weight: float = 1.0
    checkpoint_every: int = 10
    max_grad_norm: float = 1.0
    threads: int | None = None
    eval_every: int = 4
    patience: int = 3

    @classmethod
    def for_federation(cls, settings: FederationSettings, **changes: Any) -> "TrainConfig":
        """How a federation's client trains, from the federation's settings (``changes`` on top)."""
        return cls(
            objective=settings.objective,
            learning_rate=settings.learning_rate,
            beta=settings.dpo_beta,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            checkpoint_every=0,
            threads=settings.client_threads,
            **changes,
        )

    def validate(self) -> None:
        """Raise a one-line ``FedpalError`` naming the first bad setting."""
        if self.objective not in OBJECTIVES:
            raise FedpalError(f"objective must be one of {', '.join(OBJECTIVES)}, not '{self.objective}'")
        checks = [
            ("steps", self.steps >= 1, "at least 1"),
            ("learning_rate", self.learning_rate > 0 and math.isfinite(self.learning_rate), "a positive number"),
            ("beta", self.beta > 0 and math.isfinite(self.beta), "a positive number"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, "at least 1"),
            ("max_length", self.max_length is None or self.max_length >= 8, "at least 8"),
            ("proximal_mu", self.proximal_mu >= 0, "0 (off) or positive"),
            ("time_budget_s", self.time_budget_s is None or self.time_budget_s > 0, "positive"),
            ("sft_weight", self.sft_weight >= 0, "0 or positive"),
            ("checkpoint_every", self.checkpoint_every >= 0, "0 (off) or positive"),
            ("max_grad_norm", self.max_grad_norm > 0, "positive"),
            ("threads", self.threads is None or self.threads >= 1, "at least 1"),
            ("eval_every", self.eval_every >= 1, "at least 1"),
            ("patience", self.patience >= 1, "at least 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise FedpalError(f"train setting {name}={getattr(self, name)!r} must be {want}")


@dataclass
class TrainResult:
    """Summary of one run. ``stopped``: "steps" (budget reached), "time" (time budget),
    "nan" (non-finite loss, last good weights kept), "early" (the held-out loss stopped
    improving). Reward margins are the mean implicit reward margin of the first and the
    last step's batch (0 for pure SFT).

    With held-out pairs, ``heldout_*_first`` describe the adapter as it came in and
    ``heldout_*_best`` the weights the run kept (from ``best_step``): the objective's loss
    (what early stopping minimizes), the DPO loss alone (``preference_loss``: how well the
    pairs are ranked), the share of pairs whose implicit reward ranks chosen above
    rejected (ties count one half) and the mean reward margin. Without held-out pairs they
    are ``None``.
    """

    adapter: str
    objective: str
    pairs: int
    examples: int
    steps: int
    loss_first: float
    loss_last: float
    seconds: float
    device: str
    stopped: str
    reward_margin_first: float
    reward_margin_last: float
    resumed_from: int = 0
    batch_size: int = 0
    max_length: int = 0
    note: str = ""
    heldout_pairs: int = 0
    best_step: int | None = None
    heldout_loss_first: float | None = None
    heldout_loss_best: float | None = None
    heldout_preference_loss_first: float | None = None
    heldout_preference_loss_best: float | None = None
    heldout_accuracy_first: float | None = None
    heldout_accuracy_best: float | None = None
    heldout_margin_first: float | None = None
    heldout_margin_best: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HeldoutScore:
    """How an adapter does on held-out pairs: lower ``loss`` (the trained objective) is better;
    ``preference_loss``, ``accuracy`` and ``margin`` say how it ranks them against the reference."""

    loss: float
    preference_loss: float
    accuracy: float
    margin: float

    @classmethod
    def of(
        cls, margins: "torch.Tensor", objective: str = "dpo", chosen_nll: float = 0.0, sft_weight: float = 1.0
    ) -> "HeldoutScore":
        """From per-pair implicit reward margins (``beta`` already applied) and, for the "sft"
        and "both" objectives, the chosen replies' mean per-token NLL."""
        import torch.nn.functional as F

        margins = margins.detach().float()
        wins = (margins > 0).float() + 0.5 * (margins == 0).float()
        preference = float(-F.logsigmoid(margins).mean())
        loss = {"dpo": preference, "sft": chosen_nll, "both": preference + sft_weight * chosen_nll}[objective]
        return cls(loss, preference, float(wins.mean()), float(margins.mean()))


@dataclass
class TrainingState:
    """Where a run stands after its last finished step: what a checkpoint saves with the
    weights and the optimizer, and a resumed run continues from."""

    step: int = 0
    loss_first: float = math.nan
    margin_first: float = 0.0
    loss_last: float = math.nan
    margin_last: float = 0.0

    def record(self, loss: float, margin: float) -> None:
        """One more step finished with this ``loss`` and reward ``margin``."""
        if self.step == 0:
            self.loss_first, self.margin_first = loss, margin
        self.step += 1
        self.loss_last, self.margin_last = loss, margin

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "TrainingState":
        return cls(**{f.name: payload[f.name] for f in fields(cls)})


class LocalTrainer:
    """Trains one adapter of a dual-adapter peft model in place (saving is the caller's)."""

    def __init__(
        self,
        base: "BaseModel",
        peft_model: "PeftModel",
        config: TrainConfig,
        checkpoint_dir: Path | None = None,
    ) -> None:
        import torch

        from fedpal.client.device_profile import profile_device

        config.validate()
        self.base = base
        self.model = peft_model
        self.config = config
        self.tokenizer = base.tokenizer
        self.device = next(peft_model.parameters()).device
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._last_run: tuple | None = None  # (judge, params, reference adapters, adapter) for fall_back
        if config.batch_size is None or config.max_length is None:
            profile = profile_device(
                peft_model,
                self.device,
                sequences_per_example=1 if config.objective == "sft" else 2,
                max_length=config.max_length,
                batch_size=config.batch_size,
            )
            self.batch_size, self.max_length = profile.batch_size, profile.max_length
            log.info(
                "training %d x %d tokens per step on %s (%s)",
                self.batch_size,
                self.max_length,
                profile.device,
                profile.reason,
            )
        else:
            self.batch_size, self.max_length = config.batch_size, config.max_length
        self._trims_logits = "logits_to_keep" in inspect.signature(peft_model.get_base_model().forward).parameters
        # a pair's replies share their prompt's row through a custom 4D attention mask, which
        # sdpa takes as booleans and eager as additive floats; other kernels get one row per reply
        attention = getattr(peft_model.get_base_model().config, "_attn_implementation", None)
        self._shares_prompts = attention in ("sdpa", "eager")
        self._additive_mask = attention == "eager"
        self.autocast_dtype = None
        if self.device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.device.type == "cpu" and config.threads:
            torch.set_num_threads(config.threads)

    # ------------------------------------------------------------------ data
    def _encode_pairs(self, pairs: Sequence[PreferencePair]) -> list[tuple[Encoded, Encoded]]:
        encoded = []
        for pair in pairs:
            prompt = chat_input_ids(self.tokenizer, pair.prompt, pair.system)
            encoded.append(
                (
                    encode_reply(self.tokenizer, prompt, pair.chosen, self.max_length),
                    encode_reply(self.tokenizer, prompt, pair.rejected, self.max_length),
                )
            )
        return encoded

    def _encode_examples(self, examples: Sequence[SFTExample]) -> list[Encoded]:
        return [
            encode_reply(
                self.tokenizer, chat_input_ids(self.tokenizer, ex.prompt, ex.system), ex.response, self.max_length
            )
            for ex in examples
        ]

    def _logprobs(self, groups: Sequence[Sequence[Encoded]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Summed reply log-probability of each sequence in ``groups`` and its scored-token count.

        One forward pass; a group's sequences (a pair's chosen and rejected) share one copy
        of their prompt when the model's attention takes a custom mask (``pack_sequences``).
        The LM head (49k-wide on SmolLM2) runs only from the first position that predicts a
        reply token on (``logits_to_keep``), and ``log_softmax`` only where a reply token is
        predicted.
        """
        import torch

        batch = pack_sequences(groups, self.tokenizer.pad_token_id, share_prompts=self._shares_prompts).to(self.device)
        kwargs: dict[str, Any] = {"attention_mask": batch.attention}
        if batch.positions is not None:
            kwargs["position_ids"] = batch.positions
            if self._additive_mask:
                dtype = next(self.model.parameters()).dtype
                blocked = torch.zeros(batch.attention.shape, dtype=dtype, device=self.device)
                kwargs["attention_mask"] = blocked.masked_fill(~batch.attention, torch.finfo(dtype).min)
        offset = 0
        if self._trims_logits:
            offset = batch.first_source
            kwargs["logits_to_keep"] = batch.ids.shape[1] - offset
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(input_ids=batch.ids, **kwargs).logits
        return packed_logprobs(logits, batch, offset)

    # ------------------------------------------------------------- reference
    def _pair_logprobs(self, encoded: Sequence[tuple[Encoded, Encoded]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Summed reply log-probs of chosen and rejected under the current activation, no grad."""
        import torch

        chosen, rejected = [], []
        with torch.no_grad():
            for start in range(0, len(encoded), self.batch_size):
                logps, _ = self._logprobs(encoded[start : start + self.batch_size])
                chosen.append(logps[0::2])
                rejected.append(logps[1::2])
        return torch.cat(chosen), torch.cat(rejected)

    def _reference_logprobs(
        self, encoded: Sequence[tuple[Encoded, Encoded]], reference_adapters: Sequence[str]
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Log-probs under the model without the trained adapter: base (+ reference adapters)."""
        self.model.eval()
        if reference_adapters:
            activate(self.model, active=list(reference_adapters), trainable=None)
            return self._pair_logprobs(encoded)
        with self.model.disable_adapter():
            return self._pair_logprobs(encoded)

    def _used_reference_logprobs(
        self, encoded: Sequence[tuple[Encoded, Encoded]], reference_adapters: Sequence[str]
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Reference log-probs of the pairs this run's batches will draw (NaN for the others).

        Batches are a pure function of (seed, step), so the pairs a run of ``steps`` steps
        uses are known up front; a memory grows with every interaction while a run's step
        budget does not, and scoring every pair would cost more than the training itself.
        """
        import torch

        cfg = self.config
        used = sorted(
            {i for step in range(cfg.steps) for i in _batch_indices(len(encoded), self.batch_size, cfg.seed, step)}
        )
        chosen, rejected = self._reference_logprobs([encoded[i] for i in used], reference_adapters)
        index = torch.tensor(used, device=chosen.device)
        ref_chosen = torch.full((len(encoded),), float("nan"), dtype=chosen.dtype, device=chosen.device)
        ref_rejected = ref_chosen.clone()
        ref_chosen[index], ref_rejected[index] = chosen, rejected
        return ref_chosen, ref_rejected

    def reward_margins(
        self, adapter: str, pairs: Sequence[PreferencePair], reference_adapters: Sequence[str] = ()
    ) -> list[float]:
        """Implicit reward margin ``beta * ((pc - rc) - (pr - rr))`` of each pair, now.

        Positive means the adapter moved the model towards the chosen reply relative to
        the reference; used to check generalisation on pairs the trainer never saw.
        """
        reference_adapters = _check_adapters(self.model, adapter, reference_adapters)
        encoded = self._encode_pairs(pairs)
        ref_c, ref_r = self._reference_logprobs(encoded, reference_adapters)
        activate(self.model, active=[*reference_adapters, adapter], trainable=None)
        pol_c, pol_r = self._pair_logprobs(encoded)
        return dpo_loss(pol_c, pol_r, ref_c, ref_r, self.config.beta).margins.tolist()

    # ----------------------------------------------------------------- train
    def train(
        self,
        adapter: str,
        pairs: list[PreferencePair],
        examples: list[SFTExample] = (),
        reference_adapters: Sequence[str] = (),
        progress: bool = True,
        callback: Callable[[int, float], None] | None = None,
        heldout: Sequence[PreferencePair] = (),
    ) -> TrainResult:
        """Train ``adapter`` in place for ``config.steps`` steps (or until early stopping, a budget or NaN).

        The forward pass uses ``reference_adapters`` + ``adapter``; only ``adapter``
        learns. ``heldout`` pairs (never trained on) turn on early stopping and the run
        ends with the weights that ranked them best. ``callback(step, loss)`` runs after
        every finished step. With a checkpoint folder, a run of the same data, settings and
        starting weights resumes from the last checkpoint; a finished run removes it.
        """
        import torch

        cfg = self.config
        start = time.perf_counter()
        reference_adapters = _check_adapters(self.model, adapter, reference_adapters)
        pairs, examples, heldout = list(pairs), list(examples), list(heldout)
        if cfg.objective in ("dpo", "both") and not pairs:
            raise FedpalError(NO_PAIRS)
        sft_rows = _sft_rows(cfg.objective, pairs, examples)
        if cfg.objective == "sft" and not sft_rows:
            raise FedpalError(NO_EXAMPLES)

        activate(self.model, active=[*reference_adapters, adapter], trainable=adapter)
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not params:
            raise FedpalError(f"adapter '{adapter}' has no trainable weights")
        fingerprint = self._fingerprint(adapter, reference_adapters, pairs, examples, heldout)

        encoded_pairs = self._encode_pairs(pairs) if cfg.objective != "sft" else []
        encoded_sft = self._encode_examples(sft_rows)
        ref_chosen = ref_rejected = None
        if encoded_pairs:
            ref_chosen, ref_rejected = self._used_reference_logprobs(encoded_pairs, reference_adapters)
        judge = _HeldoutJudge(self, adapter, reference_adapters, heldout) if heldout else None
        activate(self.model, active=[*reference_adapters, adapter], trainable=adapter)

        anchors = [p.detach().clone() for _, p in params] if cfg.proximal_mu > 0 else []
        last_good = [p.detach().clone() for _, p in params]
        optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.learning_rate, weight_decay=0.0)
        scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)

        state = TrainingState()
        resumed = self._load_checkpoint(adapter, fingerprint, params, optimizer)
        if resumed is not None:
            state = TrainingState.from_payload(resumed)
            for good, (_, p) in zip(last_good, params):
                good.copy_(p.detach())
            if judge is not None:
                judge.restore(resumed["early"])
        elif judge is not None:
            judge.evaluate(0, params)
        resumed_from = state.step
        stopped, note = "steps", ""

        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), _progress_bar(progress) as bar:
            if resumed is None:
                torch.manual_seed(cfg.seed)
            else:
                _set_rng(resumed["rng"], self.device)
            task = bar.add_task(f"train {adapter} ({cfg.objective})", total=cfg.steps, completed=state.step, loss="")
            self.model.train()
            while state.step < cfg.steps:
                step = state.step
                loss, margin = self._loss(step, encoded_pairs, encoded_sft, params, anchors, ref_chosen, ref_rejected)
                broken = self._update(loss, params, optimizer, scaler)
                if broken == "overflow":
                    continue  # fp16 overflow: the scaler skipped this step and lowered its scale
                if broken is not None:
                    stopped = "nan"
                    note = f"{broken} became non-finite at step {step + 1}; kept the weights of step {step}"
                    break
                for good, (_, p) in zip(last_good, params):
                    good.copy_(p.detach())
                state.record(float(loss.detach()), margin)
                bar.update(task, completed=state.step, loss=f"loss {state.loss_last:.4f}")
                exhausted = False
                if judge is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                    exhausted = judge.evaluate(state.step, params)
                    self.model.train()
                if self._due_for_checkpoint(state.step):
                    self._save_checkpoint(adapter, fingerprint, params, optimizer, state, judge)
                if callback is not None:
                    callback(state.step, state.loss_last)
                if exhausted:
                    stopped = "early"
                    note = (
                        f"held-out loss did not improve for {cfg.patience} evaluations; "
                        f"kept the weights of step {judge.best_step}"
                    )
                    break
                if (
                    cfg.time_budget_s is not None
                    and time.perf_counter() - start >= cfg.time_budget_s
                    and state.step < cfg.steps
                ):
                    stopped, note = "time", f"time budget of {cfg.time_budget_s:g}s reached after {state.step} steps"
                    break
        self.model.eval()
        with torch.no_grad():
            kept = judge.best_weights if judge is not None else last_good if stopped == "nan" else None
            for good, (_, p) in zip(kept or [], params):
                p.copy_(good)
        activate(self.model, active=[*reference_adapters, adapter], trainable=None)
        self._clear_checkpoint(adapter)
        self._last_run = (judge, params, reference_adapters, adapter)
        if resumed_from:
            note = (note + "; " if note else "") + f"resumed from the checkpoint of step {resumed_from}"
        scores = judge.summary() if judge is not None else {}
        return TrainResult(
            adapter=adapter,
            objective=cfg.objective,
            pairs=len(pairs),
            examples=len(examples),
            steps=state.step,
            loss_first=state.loss_first,
            loss_last=state.loss_last,
            seconds=round(time.perf_counter() - start, 3),
            device=str(self.device),
            stopped=stopped,
            reward_margin_first=state.margin_first,
            reward_margin_last=state.margin_last,
            resumed_from=resumed_from,
            batch_size=self.batch_size,
            max_length=self.max_length,
            note=note,
            **scores,
        )

    def _update(self, loss: "torch.Tensor", params: list, optimizer: Any, scaler: Any) -> str | None:
        """One optimizer step on ``loss``; what became non-finite (loss, gradient, weights), if
        anything, or ``overflow`` when fp16 scaling skipped the step."""
        import torch

        if not torch.isfinite(loss):
            return "loss"
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], self.config.max_grad_norm)
        if not torch.isfinite(grad_norm):
            if scaler.is_enabled():
                scaler.update()
                return "overflow"
            return "gradient"
        scaler.step(optimizer)
        scaler.update()
        if not all(torch.isfinite(p).all() for _, p in params):
            return "weights"
        return None

    def fall_back(self, result: TrainResult) -> TrainResult | None:
        """Put the last run's previous held-out improvement into the adapter (None: there is none).

        Used when the best weights fail a check the held-out loss cannot see (the degeneration
        guard): a later improvement can read worse than an earlier one, e.g. an "add an
        example" style that starts restating the request. Earlier weights are kept in memory
        only, so a resumed run falls back no further than its resume point.
        """
        import torch

        if self._last_run is None or self._last_run[0] is None or not self._last_run[0].earlier:
            return None
        judge, params, reference_adapters, adapter = self._last_run
        step, score, weights = judge.earlier.pop()
        with torch.no_grad():
            for good, (_, p) in zip(weights, params):
                p.copy_(good)
        activate(self.model, active=[*reference_adapters, adapter], trainable=None)
        note = f"kept the weights of step {step}: those of step {result.best_step} failed a later check"
        return replace(result, note=(result.note + "; " if result.note else "") + note, **judge.summary(step, score))

    def _loss(self, step, encoded_pairs, encoded_sft, params, anchors, ref_chosen, ref_rejected):
        """Loss of one step's batch and its mean reward margin (0 without DPO)."""
        import torch

        cfg = self.config
        pair_idx = _batch_indices(len(encoded_pairs), self.batch_size, cfg.seed, step)
        sft_idx = _batch_indices(len(encoded_sft), self.batch_size, cfg.seed + 1, step)
        # sequences in order: chosen 0, rejected 0, chosen 1, ..., then the SFT examples
        groups = [encoded_pairs[i] for i in pair_idx] + [(encoded_sft[i],) for i in sft_idx]
        logps, counts = self._logprobs(groups)
        b = len(pair_idx)
        loss = torch.zeros((), device=self.device)
        margin = 0.0
        if b:
            out = dpo_loss(
                logps[0 : 2 * b : 2], logps[1 : 2 * b : 2], ref_chosen[pair_idx], ref_rejected[pair_idx], cfg.beta
            )
            loss = out.losses.mean()
            margin = float(out.margins.mean())
        if cfg.objective != "dpo":
            rows = [2 * i for i in range(b)] + list(range(2 * b, len(logps)))
            nll = -logps[rows].sum() / counts[rows].sum().clamp(min=1)
            loss = loss + (cfg.sft_weight * nll if cfg.objective == "both" else nll)
        if anchors:
            prox = sum(((p - a) ** 2).sum() for (_, p), a in zip(params, anchors))
            loss = loss + 0.5 * cfg.proximal_mu * prox
        return loss, margin

    # ------------------------------------------------------------ checkpoint
    def _fingerprint(self, adapter, reference_adapters, pairs, examples, heldout=()) -> str:
        """What must match for a checkpoint to be resumed: data, settings and starting weights."""
        settings = {
            f.name: getattr(self.config, f.name)
            for f in fields(self.config)
            if f.name not in ("steps", "time_budget_s", "checkpoint_every", "threads")
        }
        digest = hashlib.sha256()
        digest.update(
            json.dumps(
                {
                    "version": CHECKPOINT_VERSION,
                    "adapter": adapter,
                    "reference": list(reference_adapters),
                    "settings": settings,
                    "batch_size": self.batch_size,
                    "max_length": self.max_length,
                    "pairs": [[p.prompt, p.chosen, p.rejected] for p in pairs],
                    "examples": [[e.prompt, e.response] for e in examples],
                    "heldout": [[p.prompt, p.chosen, p.rejected] for p in heldout],
                },
                sort_keys=True,
            ).encode()
        )
        involved = {adapter, *reference_adapters}
        for name, param in sorted(self.model.named_parameters(), key=lambda item: item[0]):
            if "lora_" in name and set(name.split(".")) & involved:
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _checkpoint_path(self, adapter: str) -> Path | None:
        return self.checkpoint_dir / f"{adapter}.ckpt.pt" if self.checkpoint_dir is not None else None

    def _due_for_checkpoint(self, step: int) -> bool:
        every = self.config.checkpoint_every
        return self.checkpoint_dir is not None and every > 0 and step % every == 0 and step < self.config.steps

    def _save_checkpoint(self, adapter, fingerprint, params, optimizer, state, judge=None) -> None:
        import torch

        path = self._checkpoint_path(adapter)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "fingerprint": fingerprint,
            "adapter_state": {n: p.detach().cpu().clone() for n, p in params},
            "optimizer": optimizer.state_dict(),
            "rng": _get_rng(self.device),
            "early": judge.state() if judge is not None else None,
            **asdict(state),
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    def _load_checkpoint(self, adapter, fingerprint, params, optimizer) -> dict | None:
        """The checkpoint's payload (weights and optimizer already restored), if it is this run's."""
        import torch

        path = self._checkpoint_path(adapter)
        if path is None or not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a checkpoint cut off by the kill it was meant to survive
            return None
        if payload.get("fingerprint") != fingerprint:
            return None
        with torch.no_grad():
            for name, param in params:
                param.copy_(payload["adapter_state"][name].to(param.device))
        optimizer.load_state_dict(payload["optimizer"])
        return payload

    def _clear_checkpoint(self, adapter: str) -> None:
        path = self._checkpoint_path(adapter)
        if path is not None and path.is_file():
            path.unlink()


class _HeldoutJudge:
    """Early stopping on held-out pairs: scores the adapter now and then, keeps the best weights.

    The reference log-probs of the held-out pairs are computed once, like the training
    pairs'; each evaluation then costs one no-grad forward over the held-out replies.
    """

    def __init__(
        self, trainer: LocalTrainer, adapter: str, reference_adapters: Sequence[str], heldout: Sequence[PreferencePair]
    ) -> None:
        self.trainer, self.adapter, self.reference = trainer, adapter, list(reference_adapters)
        self.encoded = trainer._encode_pairs(heldout)
        self.chosen_tokens = sum(sum(label != IGNORE for label in labels) for (_, labels), _ in self.encoded)
        self.ref_chosen, self.ref_rejected = trainer._reference_logprobs(self.encoded, self.reference)
        self.first: HeldoutScore | None = None
        self.best: HeldoutScore | None = None
        self.best_step = 0
        self.best_weights: list = []
        self.bad_evals = 0
        self.earlier: list[tuple[int, HeldoutScore, list]] = []
        """Improvements before the best one that also rank the pairs better than the first
        evaluation, newest last (at most ``EARLIER_KEPT``; not checkpointed)."""

    def score(self) -> HeldoutScore:
        """The held-out score of the adapter's current weights."""
        trainer = self.trainer
        trainer.model.eval()
        activate(trainer.model, active=[*self.reference, self.adapter], trainable=self.adapter)
        chosen, rejected = trainer._pair_logprobs(self.encoded)
        cfg = trainer.config
        out = dpo_loss(chosen, rejected, self.ref_chosen, self.ref_rejected, cfg.beta)
        chosen_nll = float(-chosen.sum()) / max(self.chosen_tokens, 1)
        return HeldoutScore.of(out.margins, cfg.objective, chosen_nll, cfg.sft_weight)

    def evaluate(self, step: int, params) -> bool:
        """Score at ``step``; True when ``patience`` evaluations in a row brought no improvement."""
        current = self.score()
        if self.first is None:
            self.first = current
        if self.best is None or current.loss < self.best.loss - 1e-4:
            # an earlier improvement is only worth falling back on if it also ranks the pairs better
            if self.best is not None and self.best_step > 0 and self.best.preference_loss < self.first.preference_loss:
                self.earlier = [*self.earlier, (self.best_step, self.best, self.best_weights)][-EARLIER_KEPT:]
            self.best, self.best_step, self.bad_evals = current, step, 0
            self.best_weights = [p.detach().clone() for _, p in params]
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.trainer.config.patience

    def state(self) -> dict:
        return {
            "first": self.first,
            "best": self.best,
            "best_step": self.best_step,
            "best_weights": [w.cpu() for w in self.best_weights],
            "bad_evals": self.bad_evals,
        }

    def restore(self, state: dict) -> None:
        device = self.trainer.device
        self.first, self.best, self.best_step = state["first"], state["best"], state["best_step"]
        self.best_weights = [w.to(device) for w in state["best_weights"]]
        self.bad_evals = state["bad_evals"]

    def summary(self, step: int | None = None, best: HeldoutScore | None = None) -> dict:
        """The ``TrainResult`` fields this judge fills (for ``step``/``best``: an earlier improvement)."""
        step, best = (self.best_step, self.best) if best is None else (step, best)
        return {
            "heldout_pairs": len(self.encoded),
            "best_step": step,
            "heldout_loss_first": self.first.loss,
            "heldout_loss_best": best.loss,
            "heldout_preference_loss_first": self.first.preference_loss,
            "heldout_preference_loss_best": best.preference_loss,
            "heldout_accuracy_first": self.first.accuracy,
            "heldout_accuracy_best": best.accuracy,
            "heldout_margin_first": self.first.margin,
            "heldout_margin_best": best.margin,
        }


def _check_adapters(model, adapter: str, reference_adapters: Sequence[str]) -> list[str]:
    known = sorted(model.peft_config)
    for name in [adapter, *reference_adapters]:
        if name not in model.peft_config:
            raise FedpalError(f"unknown adapter '{name}'; the model has {known}")
    if adapter in reference_adapters:
        raise FedpalError(f"adapter '{adapter}' cannot be its own DPO reference")
    return list(reference_adapters)


def _sft_rows(objective: str, pairs: Sequence[PreferencePair], examples: Sequence[SFTExample]) -> list[SFTExample]:
    """The SFT data of an objective: "sft" learns examples and chosen replies; "both"
    already scores the chosen replies in each DPO batch, so only the other examples."""
    if objective == "dpo":
        return []
    chosen = [SFTExample(p.prompt, p.chosen, p.source_id) for p in pairs]
    if objective == "sft":
        return _dedupe([*examples, *chosen])
    taken = {(c.prompt, c.response) for c in chosen}
    return [ex for ex in _dedupe(examples) if (ex.prompt, ex.response) not in taken]


def _dedupe(examples: Sequence[SFTExample]) -> list[SFTExample]:
    seen, out = set(), []
    for ex in examples:
        if (ex.prompt, ex.response) not in seen:
            seen.add((ex.prompt, ex.response))
            out.append(ex)
    return out


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Items of ``step``'s batch: consecutive slices of per-epoch shuffles.

    A pure function of (seed, step), so a resumed run sees the batches the killed one
    would have seen without saving a data-loader state.
    """
    import torch

    if n == 0:
        return []
    size = min(batch_size, n)
    per_epoch = n // size
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return order[slot * size : (slot + 1) * size]


def _get_rng(device) -> dict:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict, device) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None


def _progress_bar(enabled: bool):
    """A rich bar on stderr (stdout stays clean for ``--json``), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[loss]}"),
        console=Console(stderr=True),
    )
