"""Membership inference against a LoRA adapter: did this reply take part in its training?

An adapter fitted on a user's pairs makes their chosen replies likelier than a model that
never saw them would. A plain loss threshold mistakes "easy text" for "seen text", so both
attacks here calibrate: the loss-ratio attack against the base model the adapter was
trained from, RMIA against reference adapters trained the same way on other data from
the same population. Each attack gives one score per text, higher meaning "member", and
``roc`` turns member and non-member scores into the numbers a privacy audit reports: AUC
and, since an attack that is right about a few members with certainty matters more than
one slightly better than chance on all, the true-positive rate at a low false-positive
rate (Carlini et al. 2022, "Membership Inference Attacks From First Principles").

The reference adapters are fedpal's own: ``train_reference_adapters`` trains them with
the same ``LocalTrainer`` and settings the attacked adapter was trained with, so the only
difference between them and the target is the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from fedpal.simulations.privacy.likelihood import Scored, reply_logprobs

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from fedpal.client.trainer import TrainConfig
    from fedpal.common.models import BaseModel
    from fedpal.common.types import PreferencePair

ROC_POINTS = 200
"""Most points a ``MiaResult`` keeps of its ROC curve: enough for a plot, small in a report."""


@dataclass(frozen=True)
class MiaResult:
    """How well an attack's scores separate members from non-members.

    ``fpr``/``tpr`` are the ROC curve from (0, 0) to (1, 1), thinned to at most
    ``ROC_POINTS`` points spread evenly over log FPR (for plots on log axes); ``auc``
    and the TPRs come from the full curve.
    """

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    members: int
    nonmembers: int
    fpr: list[float]
    tpr: list[float]

    def to_dict(self) -> dict:
        """JSON-ready, with the report's key names."""
        return {
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "tpr_at_0.1pct_fpr": self.tpr_at_0_1pct_fpr,
            "members": self.members,
            "nonmembers": self.nonmembers,
            "fpr": list(self.fpr),
            "tpr": list(self.tpr),
        }


def _scores(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"no {what} scores")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} scores must be finite")
    return array


def auc_mann_whitney(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(a random member outscores a random non-member), ties counted one half.

    This is the Mann-Whitney U statistic over ``n_members * n_nonmembers``, equal to the
    area under the ROC curve with straight lines between its vertices.
    """
    ordered = np.sort(nonmember_scores)
    below = np.searchsorted(ordered, member_scores, side="left")
    at_or_below = np.searchsorted(ordered, member_scores, side="right")
    wins = below.sum() + 0.5 * (at_or_below - below).sum()
    return float(wins / (member_scores.size * nonmember_scores.size))


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR of "member if score >= t" for every distinct score t, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([member_scores, nonmember_scores]))[::-1]
    members, nonmembers = np.sort(member_scores), np.sort(nonmember_scores)
    tpr = (members.size - np.searchsorted(members, thresholds, side="left")) / members.size
    fpr = (nonmembers.size - np.searchsorted(nonmembers, thresholds, side="left")) / nonmembers.size
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR among the curve's points with FPR <= ``target``."""
    return float(tpr[fpr <= target + 1e-12].max())


def _thin(fpr: np.ndarray, tpr: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` vertices, evenly spread over log FPR, each the highest TPR at its FPR."""
    if fpr.size <= limit:
        return fpr, tpr
    floor = 0.5 * float(fpr[fpr > 0].min())
    key = np.log10(np.maximum(fpr, floor))
    levels = np.linspace(key[0], key[-1], limit - 1)
    keep = np.unique(np.concatenate([[0], np.searchsorted(key, levels, side="right") - 1]))
    return fpr[keep], tpr[keep]


def roc(member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray) -> MiaResult:
    """Summarise an attack whose higher scores mean "member".

    AUC is the Mann-Whitney statistic (ties count one half, so scores that carry no
    information give exactly 0.5). TPR at a given FPR is the standard one: the largest TPR
    over thresholds whose FPR is at most the target. With ``n`` non-members the smallest
    FPR above zero is ``1/n``, so with fewer than 100 non-members ``tpr_at_1pct_fpr``, and
    with fewer than 1000 ``tpr_at_0_1pct_fpr``, is the TPR at zero false positives: the
    share of members the attack names before it names any non-member.

    Parameters
    ----------
    member_scores, nonmember_scores
        One finite score per text known to be in (respectively out of) the training data.
    """
    members = _scores(member_scores, "member")
    nonmembers = _scores(nonmember_scores, "non-member")
    fpr, tpr = roc_curve(members, nonmembers)
    plot_fpr, plot_tpr = _thin(fpr, tpr, ROC_POINTS)
    return MiaResult(
        auc=auc_mann_whitney(members, nonmembers),
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.01),
        tpr_at_0_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.001),
        members=int(members.size),
        nonmembers=int(nonmembers.size),
        fpr=[float(v) for v in plot_fpr],
        tpr=[float(v) for v in plot_tpr],
    )


def loss_ratio_scores(target: Scored, reference: Scored) -> np.ndarray:
    """Reference-calibrated loss attack: per-token log-likelihood under the target minus the reference.

    A text the adapter was trained on gains likelihood over the model the adapter was
    trained from; a text that is merely easy is likely under both. This is the comparison
    with a reference model of Carlini et al. 2021 ("Extracting Training Data from Large
    Language Models", who compare GPT-2's perplexity with a smaller model's; here the
    reference is the base model itself and the score the log of the perplexity ratio) and
    the likelihood-ratio attack of Mireshghallah et al. 2022 ("Quantifying Privacy Risks
    of Masked Language Models Using Membership Inference Attacks"): LiRA's offline idea
    (Carlini et al. 2022) with one reference model and no variance estimate. It needs no
    training: ``reference`` is the same texts scored with the adapters off
    (``reply_logprobs(..., active=())``).

    Per-token means (``Scored.mean``), not sums, so that a long reply does not outscore a
    short one only by having more tokens to gain on.

    Parameters
    ----------
    target, reference
        The same texts, in the same order, scored under the attacked adapter and under the
        reference model.
    """
    if target.tokens.shape != reference.tokens.shape or not np.array_equal(target.tokens, reference.tokens):
        raise ValueError("target and reference must score the same texts (their token counts differ)")
    return target.mean - reference.mean


def _log_mean_exp(values: np.ndarray) -> np.ndarray:
    """log(mean(exp(values))) over axis 0, without overflow or underflow."""
    top = values.max(axis=0)
    return top + np.log(np.exp(values - top).mean(axis=0))


def _log_marginal(reference: np.ndarray, offline_a: float) -> np.ndarray:
    """log Pr(.) from reference log-likelihoods: their mean in probability space, offline-corrected."""
    log_mean = _log_mean_exp(reference)
    if offline_a == 1.0:
        return log_mean
    return np.logaddexp(math.log((1 + offline_a) / 2) + log_mean, math.log((1 - offline_a) / 2))


def rmia_scores(
    target_x: np.ndarray,
    reference_x: np.ndarray,
    target_z: np.ndarray,
    reference_z: np.ndarray,
    gamma: float = 1.0,
    offline_a: float = 1.0,
) -> np.ndarray:
    """RMIA (Zarifzadeh, Liu, Shokri, ICML 2024, "Low-Cost High-Power Membership Inference Attacks").

    For each audited text ``x``, the share of population texts ``z`` that ``x`` dominates:

        score(x) = Pr_z[ LR(x, z) >= gamma ],   LR(x, z) = [p(x|θ) / p(x)] / [p(z|θ) / p(z)]

    where ``θ`` is the attacked adapter and ``p(.)`` the marginal over reference models,
    the mean of their probabilities (computed here as a log-mean-exp). Comparing with
    population texts rather than a fixed threshold calibrates for how likely texts like
    ``x`` are in general, under models that never trained on ``x``.

    With OUT-only references (none trained on ``x``, as ``train_reference_adapters``
    gives), the paper's offline mode approximates the missing IN models linearly,
    ``p(x)_IN ≈ a p(x)_OUT + (1 - a)``, so that ``p(x) = ((1 + a) p(x)_OUT + (1 - a)) / 2``,
    and applies the same map to ``p(z)``. ``offline_a = 1`` leaves the mean as it is
    (online references, or no correction); the authors pick ``a`` by attacking one
    reference model with the others (their code's default is 0.3).

    Likelihoods are per-token means (``Scored.mean``; ``reference_logprobs`` returns
    them), so ``p(.)`` is a reply's geometric-mean token probability, in (0, 1] like the
    class probability the paper's formulas were made for. Summed log-likelihoods would
    make a reply's probability astronomically small: the offline term ``(1 - a) / 2``
    would swamp it, and long replies would dominate the ratio.

    Parameters
    ----------
    target_x : (n,)
        Log-likelihood of each audited text under the attacked adapter.
    reference_x : (k, n)
        The same under each of ``k`` reference models.
    target_z : (m,)
        Log-likelihood of each population text (from the same distribution, trained on by
        none of the models) under the attacked adapter.
    reference_z : (k, m)
        The same under each reference model.
    gamma
        How much likelier, relative to the references, ``x`` must be than ``z``.
    offline_a
        The offline approximation's ``a`` in (0, 1]; 1 means no approximation.
    """
    target_x, target_z = np.asarray(target_x, np.float64), np.asarray(target_z, np.float64)
    reference_x, reference_z = np.asarray(reference_x, np.float64), np.asarray(reference_z, np.float64)
    k = reference_x.shape[0] if reference_x.ndim == 2 else -1
    for name, reference, target in (("reference_x", reference_x, target_x), ("reference_z", reference_z, target_z)):
        if target.ndim != 1 or reference.shape != (k, target.size):
            raise ValueError(f"{name} must have shape (k, {target.size}) with the same k, not {reference.shape}")
    if target_z.size == 0 or reference_x.shape[0] == 0:
        raise ValueError("RMIA needs population texts and at least one reference model")
    if not 0 < offline_a <= 1:
        raise ValueError(f"offline_a must be in (0, 1], not {offline_a}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, not {gamma}")
    ratio_x = target_x - _log_marginal(reference_x, offline_a)
    ratio_z = np.sort(target_z - _log_marginal(reference_z, offline_a))
    dominated = np.searchsorted(ratio_z, ratio_x - math.log(gamma), side="right")
    return dominated / ratio_z.size


def train_reference_adapters(
    base: "BaseModel",
    peft: "PeftModel",
    adapter: str,
    datasets: Sequence[Sequence["PreferencePair"]],
    config: "TrainConfig",
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """Train one reference adapter per dataset, the way the attacked adapter was trained.

    Each starts from ``adapter``'s weights as they are at the call (pass a fresh adapter:
    B zero, A from the shared init seed, as fedpal starts every adapter), is trained by
    ``LocalTrainer`` with ``config`` and seed ``seed + i``, and is returned as arrays.
    ``adapter`` holds its starting weights again afterwards. These are the shadow models
    of LiRA (Carlini et al. 2022) and the reference models of RMIA.
    """
    from fedpal.client.trainer import LocalTrainer
    from fedpal.common.adapters import adapter_to_arrays, arrays_to_adapter

    start = adapter_to_arrays(peft, adapter, "AB")
    trained = []
    try:
        for i, pairs in enumerate(datasets):
            arrays_to_adapter(peft, adapter, start, "AB")
            LocalTrainer(base, peft, replace(config, seed=seed + i)).train(adapter, list(pairs), progress=False)
            trained.append(adapter_to_arrays(peft, adapter, "AB"))
    finally:
        arrays_to_adapter(peft, adapter, start, "AB")
    return trained


def reference_logprobs(
    peft: "PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    adapter: str,
    adapters_arrays: Sequence[dict[str, np.ndarray]],
    texts: Sequence[tuple[str, str]],
) -> np.ndarray:
    """Per-token mean log-likelihood of each ``(prompt, reply)`` under each reference adapter: shape (k, n).

    Each set of arrays is loaded into ``adapter`` in turn and scored with only that adapter
    on; ``adapter`` holds its own weights again afterwards.
    """
    from fedpal.common.adapters import adapter_to_arrays, arrays_to_adapter

    own = adapter_to_arrays(peft, adapter, "AB")
    rows = []
    try:
        for arrays in adapters_arrays:
            arrays_to_adapter(peft, adapter, arrays, "AB")
            rows.append(reply_logprobs(peft, tokenizer, texts, active=[adapter]).mean)
    finally:
        arrays_to_adapter(peft, adapter, own, "AB")
    return np.stack(rows) if rows else np.zeros((0, len(texts)))
