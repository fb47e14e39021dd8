"""Privacy attacks on a planted leak: they must find it, and find nothing where nothing was planted.

One tiny-model adapter is trained hard (SFT, lr 1e-2, 100 steps) on members with random-word
replies plus one canary repeated; four more are trained the same way on disjoint texts
from the same generator: three as RMIA's reference models, one as the control, an
adapter that saw none of the audited texts.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from fedpal.client.trainer import LocalTrainer, TrainConfig
from fedpal.common.adapters import PERSONAL, SHARED, AdapterConfig, adapter_to_arrays, attach_adapters
from fedpal.common.tiny_model import _WORDS
from fedpal.common.types import PreferencePair
from fedpal.simulations.privacy.canaries import Canary, exposure, make_canaries
from fedpal.simulations.privacy.likelihood import reply_logprobs
from fedpal.simulations.privacy.mia import (
    ROC_POINTS,
    loss_ratio_scores,
    reference_logprobs,
    rmia_scores,
    roc,
    train_reference_adapters,
)

MEMBERS, NONMEMBERS, POPULATION, PER_REFERENCE = 24, 48, 48, 24
REFERENCES = 3
CANDIDATES = 255
CONFIG = TrainConfig(objective="sft", learning_rate=1e-2, steps=100, batch_size=8, max_length=64, checkpoint_every=0)


def random_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Distinct prompts with replies of eight random words: nothing to learn but the text itself."""
    rng = random.Random(seed)
    pairs: dict[str, PreferencePair] = {}
    while len(pairs) < n:
        reply = " ".join(rng.choice(_WORDS) for _ in range(8))
        topic = " ".join(rng.choice(_WORDS) for _ in range(2))
        pairs[reply] = PreferencePair(f"Tell me about {topic}?", reply, "I would rather not say.")
    return list(pairs.values())


def texts(pairs: list[PreferencePair]) -> list[tuple[str, str]]:
    return [(p.prompt, p.chosen) for p in pairs]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from a second thread, which on a busy CPU spin-waits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def attacked(tiny_path):
    """The target adapter (SHARED) trained on members and a canary; PERSONAL left fresh; five
    reference-style adapters as arrays: three references and one outsider."""
    from fedpal.common.models import load_base_model

    base = load_base_model("tiny", device="cpu")
    peft = attach_adapters(base.model, AdapterConfig())
    pool = random_pairs(MEMBERS + NONMEMBERS + POPULATION + (REFERENCES + 1) * PER_REFERENCE, seed=0)
    members, rest = pool[:MEMBERS], pool[MEMBERS:]
    nonmembers, rest = rest[:NONMEMBERS], rest[NONMEMBERS:]
    population, rest = rest[:POPULATION], rest[POPULATION:]
    datasets = [rest[i * PER_REFERENCE : (i + 1) * PER_REFERENCE] for i in range(REFERENCES + 1)]

    fresh = adapter_to_arrays(peft, PERSONAL)
    trained = train_reference_adapters(base, peft, PERSONAL, datasets, CONFIG, seed=1)
    canaries = make_canaries(2, seed=0)
    planted = [PreferencePair(canaries[0].prompt, canaries[0].reply, "I would rather not say.")] * 4
    LocalTrainer(base, peft, CONFIG).train(SHARED, members + planted, progress=False)
    return SimpleNamespace(
        base=base,
        peft=peft,
        tokenizer=base.tokenizer,
        members=members,
        nonmembers=nonmembers,
        population=population,
        references=trained[:REFERENCES],
        outsider=trained[REFERENCES],
        fresh=fresh,
        canaries=canaries,
    )


def split(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return scores[:MEMBERS], scores[MEMBERS:]


# ------------------------------------------------------------------ roc


def test_roc_perfect_separation_gives_auc_and_tprs_of_one():
    result = roc([5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0])
    assert (result.auc, result.tpr_at_1pct_fpr, result.tpr_at_0_1pct_fpr) == (1.0, 1.0, 1.0)
    assert (result.members, result.nonmembers) == (3, 4)
    assert (result.fpr[0], result.tpr[0], result.fpr[-1], result.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_roc_identical_scores_are_chance():
    result = roc([0.3] * 10, [0.3] * 20)
    assert result.auc == 0.5
    assert result.tpr_at_1pct_fpr == 0.0  # the only threshold flags every non-member too
    assert result.fpr == [0.0, 1.0] and result.tpr == [0.0, 1.0]


def test_roc_counts_ties_half_and_reads_tpr_at_zero_false_positives_below_1_over_n():
    # pairs (member, non-member): 3>1, 3>2, 2>1, 2=2 (half), 0<1, 0<2 -> 3.5 of 6
    result = roc([3.0, 2.0, 0.0], [1.0, 2.0])
    assert result.auc == pytest.approx(3.5 / 6)
    assert result.tpr_at_1pct_fpr == pytest.approx(1 / 3)  # only "3" is named before any non-member
    assert result.to_dict().keys() == {
        "auc",
        "tpr_at_1pct_fpr",
        "tpr_at_0.1pct_fpr",
        "members",
        "nonmembers",
        "fpr",
        "tpr",
    }


def test_roc_matches_pairwise_counting_and_thins_its_curve_for_plots():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 50, 3000) + 3.0, rng.integers(0, 50, 2000).astype(float)
    result = roc(members, nonmembers)
    diff = members[:, None] - nonmembers[None, :]
    assert result.auc == pytest.approx(((diff > 0) + 0.5 * (diff == 0)).mean(), abs=1e-12)
    assert 2 < len(result.fpr) == len(result.tpr) <= ROC_POINTS
    assert np.all(np.diff(result.fpr) >= 0) and np.all(np.diff(result.tpr) >= 0)
    assert (result.fpr[0], result.tpr[0], result.fpr[-1], result.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="no member"):
        roc([], [1.0])


# ------------------------------------------------------------------ RMIA maths


def test_rmia_scores_follow_the_paper_on_a_hand_computed_case():
    # p(x|θ) = 0.8, references 0.2 and 0.6: p(x) = 0.4, ratio 2. Population: p(z|θ) = 0.5,
    # p(z) = 0.5, 0.2, 0.1: ratios 1, 2.5, 5.
    target_x, reference_x = np.log([0.8]), np.log([[0.2], [0.6]])
    target_z, reference_z = np.log([0.5, 0.5, 0.5]), np.log([[0.5, 0.2, 0.1]] * 2)
    assert rmia_scores(target_x, reference_x, target_z, reference_z).tolist() == pytest.approx([1 / 3])
    assert rmia_scores(target_x, reference_x, target_z, reference_z, gamma=0.5).tolist() == pytest.approx([2 / 3])
    # offline a = 0.5: p(.) = 0.75 p_out + 0.25, so x: 0.8/0.55; z: 0.5/0.625, 0.5/0.4, 0.5/0.325
    offline = rmia_scores(target_x, reference_x, target_z, reference_z, offline_a=0.5)
    assert offline.tolist() == pytest.approx([2 / 3])
    # whole-sequence scale log-likelihoods would underflow exp(); the log-space mean does not
    shifted = rmia_scores(target_x - 2000, reference_x - 2000, target_z - 2000, reference_z - 2000)
    assert shifted.tolist() == pytest.approx([1 / 3])


# ------------------------------------------------------------------ attacks on a planted leak


def test_loss_ratio_attack_finds_members_and_nothing_in_an_adapter_that_never_saw_them(attacked):
    a = attacked
    audited = texts(a.members) + texts(a.nonmembers)
    base = reply_logprobs(a.peft, a.tokenizer, audited, active=())
    target = reply_logprobs(a.peft, a.tokenizer, audited, active=[SHARED])
    leak = roc(*split(loss_ratio_scores(target, base)))
    assert leak.auc >= 0.8 and leak.tpr_at_1pct_fpr >= 0.2

    untouched = reply_logprobs(a.peft, a.tokenizer, audited, active=[PERSONAL])  # B = 0: the base model
    assert roc(*split(loss_ratio_scores(untouched, base))).auc == 0.5
    outsider = reference_logprobs(a.peft, a.tokenizer, PERSONAL, [a.outsider], audited)[0]
    control = roc(*split(outsider - base.mean))
    assert abs(control.auc - 0.5) <= 0.2
    assert leak.auc > control.auc + 0.3


def test_rmia_finds_members_and_nothing_in_an_adapter_that_never_saw_them(attacked):
    a = attacked
    audited, population = texts(a.members) + texts(a.nonmembers), texts(a.population)
    reference_x = reference_logprobs(a.peft, a.tokenizer, PERSONAL, a.references, audited)
    reference_z = reference_logprobs(a.peft, a.tokenizer, PERSONAL, a.references, population)
    assert reference_x.shape == (REFERENCES, MEMBERS + NONMEMBERS) and reference_z.shape == (REFERENCES, POPULATION)
    assert all(np.array_equal(v, a.fresh[k]) for k, v in adapter_to_arrays(a.peft, PERSONAL).items())

    target_x = reply_logprobs(a.peft, a.tokenizer, audited, active=[SHARED]).mean
    target_z = reply_logprobs(a.peft, a.tokenizer, population, active=[SHARED]).mean
    leak = roc(*split(rmia_scores(target_x, reference_x, target_z, reference_z, offline_a=0.3)))
    assert leak.auc >= 0.8

    outsider_x, outsider_z = (
        reference_logprobs(a.peft, a.tokenizer, PERSONAL, [a.outsider], t)[0] for t in (audited, population)
    )
    control = roc(*split(rmia_scores(outsider_x, reference_x, outsider_z, reference_z, offline_a=0.3)))
    assert abs(control.auc - 0.5) <= 0.2
    assert leak.auc > control.auc + 0.3


# ------------------------------------------------------------------ canaries


def test_canaries_have_distinct_formats_and_one_token_per_digit(tiny_path):
    from transformers import AutoTokenizer

    canaries = make_canaries(6, seed=3)
    assert len({c.prompt for c in canaries}) == 6 and len({c.reply.split(" is ")[0] for c in canaries}) == 6
    assert all(len(c.secret) == 6 and c.secret.isdigit() and f"is {' '.join(c.secret)}." in c.reply for c in canaries)
    assert make_canaries(6, seed=3) == canaries != make_canaries(6, seed=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    lengths = {len(tokenizer(canaries[0].reply_with(secret)).input_ids) for secret in ("000000", "123456", "999999")}
    assert len(lengths) == 1
    with pytest.raises(ValueError, match="exactly once"):
        Canary("What is my PIN?", "1234", "My PIN is 1234.")


def test_planted_canary_is_exposed_and_a_canary_never_planted_is_not(attacked):
    a = attacked
    planted, never_planted = a.canaries
    leak = exposure(a.peft, a.tokenizer, planted, active=[SHARED], candidates=CANDIDATES)
    assert leak.bits >= 6 and leak.bits <= math.log2(CANDIDATES + 1) + 1e-9
    assert (leak.candidates, leak.space) == (CANDIDATES, 10**6)
    assert leak.rank == pytest.approx(leak.space * 2**-leak.bits)

    control = exposure(a.peft, a.tokenizer, never_planted, active=[SHARED], candidates=CANDIDATES)
    before = exposure(a.peft, a.tokenizer, planted, active=(), candidates=CANDIDATES)
    assert control.bits <= 4 and before.bits <= 4
