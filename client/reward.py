"""A user's reward model, learned on their device from their own preference pairs.

Reward-guided decoding (``fedpal generate --mode rerank``) drafts a few replies and
answers with the one this reward scores highest. The reward is Bradley–Terry over frozen
features of a reply: ``r(x, y) = w . phi(x, y)`` with ``P(y1 > y2) = sigmoid(r1 - r2)``,
where ``phi`` is the base model's own last hidden state averaged over the reply's tokens,
plus the reply's log length, read from the ONNX session that generates (so nothing but
the exported base model is needed). ``w`` is an L2-regularised logistic regression on
the feature differences of the user's pairs, no intercept (a pair's order is arbitrary).

Why this and not the personal adapter's implicit DPO reward: with a user's 50-200 noisy
pairs, the linear head on frozen features ranked unseen pairs better (measured in the
README), fits in milliseconds, and cannot make generation worse: it only chooses among
replies the model wrote anyway. The regularisation strength is picked by
cross-validation over the user's prompts (all pairs of a prompt in one fold), and that
held-out accuracy is reported with the model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpal.common.errors import FedpalError

L2_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
"""Regularisation strengths tried by cross-validation (per standardised feature)."""
FOLDS = 4
MIN_PAIRS = 4
REWARD_FILE = "reward.npz"


@dataclass(frozen=True)
class RewardModel:
    """``score(phi) = weights . (phi - mean) / scale``; fitted on ``pairs`` pairs of ``prompts`` prompts."""

    weights: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    l2: float
    pairs: int
    prompts: int
    cv_accuracy: float | None
    """Share of pairs on held-out prompts ranked right during cross-validation (None: too few prompts)."""
    fingerprint: str
    """Of the pairs it was fitted on, so a changed memory is noticed."""

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Rewards of feature rows (n, d)."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if features.shape[1] != self.weights.shape[0]:
            raise FedpalError(f"reward model expects {self.weights.shape[0]} features, got {features.shape[1]}")
        return ((features - self.mean) / self.scale) @ self.weights

    def save(self, path: Path | str) -> Path:
        from fedpal.common.files import atomic_path

        path = Path(path)
        meta = {
            "l2": self.l2,
            "pairs": self.pairs,
            "prompts": self.prompts,
            "cv_accuracy": self.cv_accuracy,
            "fingerprint": self.fingerprint,
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, weights=self.weights, mean=self.mean, scale=self.scale, meta=json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: Path | str) -> "RewardModel":
        try:
            with np.load(path) as data:
                meta = json.loads(str(data["meta"]))
                return cls(
                    data["weights"],
                    data["mean"],
                    data["scale"],
                    float(meta["l2"]),
                    int(meta["pairs"]),
                    int(meta["prompts"]),
                    meta["cv_accuracy"],
                    str(meta["fingerprint"]),
                )
        except (OSError, ValueError, KeyError) as err:
            raise FedpalError(f"unreadable reward model {path}: {err}") from None


def pairs_fingerprint(pairs: Sequence[tuple[str, str, str]]) -> str:
    """A digest of (prompt, chosen, rejected) triples in order."""
    digest = hashlib.sha256()
    for triple in pairs:
        digest.update(json.dumps(list(triple)).encode())
    return digest.hexdigest()[:24]


def fit_reward(
    chosen: np.ndarray,
    rejected: np.ndarray,
    groups: Sequence[str],
    fingerprint: str = "",
    l2_grid: Sequence[float] = L2_GRID,
    folds: int = FOLDS,
) -> RewardModel:
    """Fit the Bradley–Terry head on features of chosen and rejected replies (rows pair up).

    ``groups`` names each pair's prompt: cross-validation keeps a prompt's pairs together,
    so the accuracy it reports is on prompts the head never saw.
    """
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 2 or len(groups) != len(chosen):
        raise ValueError("chosen and rejected need one feature row per pair, and groups one name per pair")
    if len(chosen) < MIN_PAIRS:
        raise FedpalError(f"a reward model needs at least {MIN_PAIRS} preference pairs; the memory has {len(chosen)}")
    both = np.concatenate([chosen, rejected])
    mean, scale = both.mean(axis=0), both.std(axis=0) + 1e-6
    diffs = (chosen - rejected) / scale
    names = sorted(set(groups))
    fold_of = {name: i % folds for i, name in enumerate(sorted(names, key=_hash))}
    fold = np.array([fold_of[g] for g in groups])
    best_l2, best_acc = l2_grid[len(l2_grid) // 2], None
    if len(names) >= folds:
        for l2 in l2_grid:
            right = 0.0
            for k in range(folds):
                train, test = fold != k, fold == k
                if not train.any() or not test.any():
                    continue
                margins = diffs[test] @ _logistic(diffs[train], l2)
                right += float((margins > 0).sum() + 0.5 * (margins == 0).sum())
            accuracy = right / len(diffs)
            if best_acc is None or accuracy > best_acc + 1e-9:
                best_l2, best_acc = l2, accuracy
    weights = _logistic(diffs, best_l2)
    return RewardModel(weights, mean, scale, float(best_l2), len(diffs), len(names), best_acc, fingerprint)


def _logistic(diffs: np.ndarray, l2: float, iterations: int = 50) -> np.ndarray:
    """argmin_w mean(softplus(-diffs @ w)) + l2/2 |w|^2 by Newton's method (convex, d of a few hundred)."""
    n, d = diffs.shape
    w = np.zeros(d)
    for _ in range(iterations):
        margins = diffs @ w
        p = 1.0 / (1.0 + np.exp(-margins))
        grad = -diffs.T @ (1.0 - p) / n + l2 * w
        hessian = (diffs * (p * (1.0 - p))[:, None]).T @ diffs / n + l2 * np.eye(d)
        step = np.linalg.solve(hessian, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def accuracy(model: RewardModel, chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Share of pairs the model ranks chosen above rejected (ties count one half)."""
    margins = model.scores(chosen) - model.scores(rejected)
    return float(((margins > 0) + 0.5 * (margins == 0)).mean()) if len(margins) else math.nan
