"""``fedpal privacy audit``: what a fedpal federation leaks, measured by attacking it.

One audit runs real fedpal federations (:mod:`.federation`) with each protection setting
and attacks what each one releases or sends:

- **membership inference** on the global shared adapter (members: every user's stored
  replies) and on each user's personal adapter (members: that user's), with the loss
  ratio against the model without the attacked adapter and with RMIA over shadow
  reference adapters (:mod:`.mia`);
- **canary exposure** of secrets planted in user 0's memory (:mod:`.canaries`);
- **update inversion** by the server, on what it received from user 0 in round 1 (its
  own update, or the secure aggregate under SecAgg+) (:mod:`.inversion`);
- **an audited epsilon** from the canary clients of the same run (:mod:`.audit`), beside
  the accountant's;
- **budget vs utility**: DP runs at several noise multipliers, scored by how well the
  adapters rank each user's held-out pairs;
- **leaks**: every message a node sent and every file of the homes, searched for memory
  plaintext (:mod:`.leaks`).

The attacker's reference models are shadow adapters trained by fedpal's own trainer on
texts of users outside the federation, so the calibrated attack knows the data
distribution but none of the members.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpal.common.adapters import PERSONAL, SHARED
from fedpal.common.types import PreferencePair
from fedpal.simulations.privacy.config import AuditConfig
from fedpal.simulations.privacy.federation import FederatedRun, RunPlan, passphrase, run_federation
from fedpal.simulations.privacy.population import AuditPopulation, audit_population

Progress = Callable[[str, int], Callable[[], None]]
REFUSAL = "I would rather not say."
"""The rejected reply of a planted secret's pair: the user "prefers" the reply with the secret."""


def _no_progress(description: str, total: int) -> Callable[[], None]:
    return lambda: None


@dataclass(frozen=True)
class Texts:
    """Everything scored, as ``(prompt, reply)``: members then non-members, and the population ``z``."""

    members: list[tuple[str, str]]
    nonmembers: list[tuple[str, str]]
    owner: np.ndarray
    """User index of each member+nonmember text."""
    population: list[tuple[str, str]]
    heldout_pairs: list[PreferencePair]
    heldout_owner: np.ndarray

    @property
    def audited(self) -> list[tuple[str, str]]:
        return self.members + self.nonmembers

    @property
    def is_member(self) -> np.ndarray:
        return np.array([True] * len(self.members) + [False] * len(self.nonmembers))


class PrivacyAudit:
    """The state of one audit in ``out``; :meth:`run` does everything and returns results."""

    def __init__(self, config: AuditConfig, out: Path, progress: Progress | None = None) -> None:
        from fedpal.simulations.privacy.canaries import make_canaries

        config.check()
        self.config = config
        self.out = Path(out)
        self.progress = progress or _no_progress
        self.population: AuditPopulation = audit_population(config)
        secrets = make_canaries(2 * config.secrets, config.seed)
        self.planted, self.unplanted = secrets[: config.secrets], secrets[config.secrets :]
        self.planted_pairs = [PreferencePair(c.prompt, c.reply, REFUSAL) for c in self.planted] * config.secret_repeats
        self.texts = self._texts()
        self.parts = "B" if config.ffa_lora else "AB"

    def _texts(self) -> Texts:
        users = self.population.users
        members = [(p.prompt, p.chosen) for user in users for p in user.members]
        nonmembers = [(p.prompt, p.chosen) for user in users for p in user.nonmembers]
        owner = np.array(
            [i for i, user in enumerate(users) for _ in user.members]
            + [i for i, user in enumerate(users) for _ in user.nonmembers]
        )
        heldout = [p for user in users for p in user.nonmembers]
        heldout_owner = np.array([i for i, user in enumerate(users) for _ in user.nonmembers])
        z = len(self.population.shadow) // 4
        population = [(p.prompt, p.chosen) for p in self.population.shadow[len(self.population.shadow) - z :]]
        return Texts(members, nonmembers, owner, population, heldout, heldout_owner)

    # -- the run -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._load_model()
        self._train_references()
        c = self.config
        plans = [RunPlan.protection(name, c) for name in c.protections]
        sweep = [RunPlan.sweep_point(None)] + [
            RunPlan.sweep_point(z) for z in c.sweep if not ("dp" in c.protections and z == c.noise_multiplier)
        ]
        settings, utility_runs = {}, []
        with passphrase(c.seed):
            for plan in plans:
                settings[plan.name] = self.attack(self.federate(plan), full=True)
            for plan in sweep:
                utility_runs.append(
                    {"noise_multiplier": plan.noise_multiplier, **self.attack(self.federate(plan), full=False)}
                )
        if "dp" in settings:
            # the DP run's canaries add sqrt(joined) clipped random directions to noise of norm z C sqrt(d): its
            # utility stands for a canary-free run at the same noise
            utility_runs.append({"noise_multiplier": c.noise_multiplier, **settings["dp"]})
        utility_runs.sort(key=lambda row: row["noise_multiplier"])
        return self.results(settings, utility_runs, time.perf_counter() - started)

    def _load_model(self) -> None:
        from fedpal.common.adapters import AdapterConfig, adapter_to_arrays, attach_adapters
        from fedpal.common.models import load_base_model
        from fedpal.common.settings import FederationSettings
        from fedpal.simulations.privacy.federation import overrides

        settings = FederationSettings.from_run_config(
            overrides(self.config, RunPlan("probe", False, False, 0.0, False), self.out, self.config.users)
        )
        self.base = load_base_model(self.config.model, device="cpu")
        self.peft = attach_adapters(self.base.model, AdapterConfig.from_settings(settings))
        self.initial = adapter_to_arrays(self.peft, SHARED, self.parts, dtype=np.float32)
        self.fresh_personal = adapter_to_arrays(self.peft, PERSONAL, "AB")
        self.base_audited = self.score(self.texts.audited, ())
        self.base_heldout = self._pair_scores(())

    def _train_references(self) -> None:
        """Shadow adapters on random halves of the shadow users' texts (the population ``z`` held aside)."""
        from fedpal.client.trainer import TrainConfig
        from fedpal.common.adapters import arrays_to_adapter
        from fedpal.simulations.privacy.mia import train_reference_adapters

        c = self.config
        shadow = list(self.population.shadow[: len(self.population.shadow) - len(self.texts.population)])
        rng = np.random.default_rng([c.seed, 13])
        halves = [
            [shadow[i] for i in sorted(rng.choice(len(shadow), len(shadow) // 2, replace=False))]
            for _ in range(c.reference_adapters)
        ]
        train = TrainConfig(
            objective=c.objective,
            learning_rate=c.learning_rate,
            beta=c.dpo_beta,
            batch_size=c.batch_size,
            max_length=c.max_length,
            steps=c.rounds * c.local_steps,
            checkpoint_every=0,
        )
        advance = self.progress("reference adapters (shadow users)", 1)
        arrays_to_adapter(self.peft, PERSONAL, self.fresh_personal, "AB")
        self.references = train_reference_adapters(self.base, self.peft, PERSONAL, halves, train, c.seed)
        advance()
        self.reference_audited, self.reference_population = self._reference_scores(())

    def score(self, texts: Sequence[tuple[str, str]], active: Sequence[str]) -> Any:
        """Reply log-likelihoods of ``texts`` under the base model with ``active`` adapters."""
        from fedpal.simulations.privacy.likelihood import reply_logprobs

        return reply_logprobs(self.peft, self.base.tokenizer, texts, active=active, max_length=self.config.max_length)

    def _reference_scores(self, under: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-token log-likelihoods of the audited and population texts under each reference
        adapter (in the personal slot) on top of the ``under`` adapters."""
        from fedpal.common.adapters import arrays_to_adapter

        audited, population = [], []
        for arrays in self.references:
            arrays_to_adapter(self.peft, PERSONAL, arrays, "AB")
            audited.append(self.score(self.texts.audited, [*under, PERSONAL]).mean)
            population.append(self.score(self.texts.population, [*under, PERSONAL]).mean)
        return np.stack(audited), np.stack(population)

    def _pair_scores(self, active: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        pairs = self.texts.heldout_pairs
        return (
            self.score([(p.prompt, p.chosen) for p in pairs], active).logprob,
            self.score([(p.prompt, p.rejected) for p in pairs], active).logprob,
        )

    def federate(self, plan: RunPlan) -> FederatedRun:
        advance = self.progress(f"federation: {plan.name} ({self.config.rounds} rounds, Flower simulation)", 1)
        run = run_federation(
            self.config, plan, self.population, self.out / "runs" / plan.folder_name, self.initial, self.planted_pairs
        )
        advance()
        return run

    # -- the attacks -------------------------------------------------------------------

    def attack(self, run: FederatedRun, full: bool) -> dict[str, Any]:
        """Every attack on one run (``full``), or the utility and the global adapter's MIA only."""
        from fedpal.common.adapters import arrays_to_adapter

        steps = 5 if full else 1
        advance = self.progress(f"attacks: {run.plan.name}", steps)
        arrays_to_adapter(self.peft, SHARED, run.final, self.parts)
        result: dict[str, Any] = {"epsilon": run.epsilon}
        global_scores = self.score(self.texts.audited, [SHARED])
        population_scores = self.score(self.texts.population, [SHARED])
        result["mia_global"] = self._mia(
            global_scores, self.base_audited, population_scores, self.reference_audited, self.reference_population
        )
        result["utility"] = self._utility(run)
        advance()
        if not full:
            return result
        result["mia_personal"] = self._personal_mia(run, global_scores)
        advance()
        result["exposure"] = self._exposure(run)
        advance()
        result["inversion"] = self._inversion(run)
        advance()
        result["audit"] = self._audit(run)
        result["leaks"] = self._leaks(run)
        advance()
        return result

    def _mia(
        self, target: Any, reference: Any, target_z: Any, reference_x: np.ndarray, reference_z: np.ndarray
    ) -> dict[str, Any]:
        """Loss ratio (against ``reference``: the model without the attacked adapter) and RMIA
        (against the reference adapters), members against non-members."""
        from fedpal.simulations.privacy.mia import loss_ratio_scores, rmia_scores, roc

        members = self.texts.is_member
        loss = loss_ratio_scores(target, reference)
        rmia = rmia_scores(target.mean, reference_x, target_z.mean, reference_z, offline_a=RMIA_OFFLINE_A)
        return {
            name: roc(scores[members], scores[~members]).to_dict()
            for name, scores in (("loss_ratio", loss), ("rmia", rmia))
        }

    def _personal_mia(self, run: FederatedRun, global_scores: Any) -> dict[str, Any]:
        """Each user's personal adapter attacked on that user's texts; scores pooled over users.

        The loss ratio's reference is the model without the attacked adapter (base + the
        global shared adapter); RMIA's references are the shadow adapters in the personal
        slot on top of the same global adapter.
        """
        from fedpal.simulations.privacy.mia import loss_ratio_scores, rmia_scores, roc

        ref_x, ref_z = self._reference_scores([SHARED])
        members, loss, rmia, owners = self.texts.is_member, [], [], []
        for user in range(self.config.users):
            self._load_personal(run, user)
            mine = np.flatnonzero(self.texts.owner == user)
            texts = [self.texts.audited[i] for i in mine]
            target = self.score(texts, [SHARED, PERSONAL])
            target_z = self.score(self.texts.population, [SHARED, PERSONAL])
            loss.append(loss_ratio_scores(target, _subset(global_scores, mine)))
            rmia.append(rmia_scores(target.mean, ref_x[:, mine], target_z.mean, ref_z, offline_a=RMIA_OFFLINE_A))
            owners.append(mine)
        order = np.concatenate(owners)
        is_member = members[order]
        return {
            name: roc(np.concatenate(scores)[is_member], np.concatenate(scores)[~is_member]).to_dict()
            for name, scores in (("loss_ratio", loss), ("rmia", rmia))
        }

    def _load_personal(self, run: FederatedRun, user: int) -> None:
        from fedpal.client.home import ClientHome
        from fedpal.common.adapters import arrays_to_adapter, load_adapter

        folder = ClientHome.at(run.homes[user]).adapter_dir(PERSONAL)
        if (folder / "adapter_config.json").is_file():
            load_adapter(self.peft, PERSONAL, folder)
        else:
            arrays_to_adapter(self.peft, PERSONAL, self.fresh_personal, "AB")

    def _exposure(self, run: FederatedRun) -> dict[str, Any]:
        """Planted secrets on the global adapter and on user 0's own adapters; never-planted ones as the control."""
        from fedpal.simulations.privacy.canaries import exposure

        c = self.config
        self._load_personal(run, 0)

        def bits(canaries: Sequence[Any], active: Sequence[str]) -> list[dict[str, Any]]:
            return [
                exposure(
                    self.peft, self.base.tokenizer, canary, active, candidates=c.exposure_candidates, seed=c.seed + k
                ).to_dict()
                for k, canary in enumerate(canaries)
            ]

        return {
            "global": bits(self.planted, [SHARED]),
            "personal": bits(self.planted, [SHARED, PERSONAL]),
            "control_global": bits(self.unplanted, [SHARED]),
            "secret_repeats": c.secret_repeats,
            "candidates": c.exposure_candidates,
        }

    def _inversion(self, run: FederatedRun) -> dict[str, Any]:
        """The server inverts what it received from user 0's node in round 1 (the aggregate under SecAgg+)."""
        from fedpal.simulations.privacy.inversion import invert_update, score_inversion

        node = next(node for node, partition in run.partitions.items() if partition == 0)
        received = run.observed[1][node]
        after = dict(zip(self.initial, received))
        inversion = invert_update(
            self.peft,
            self.base.tokenizer,
            SHARED,
            self.initial,
            after,
            self.parts,
            list(self.population.probes),
            top_k=self.config.inversion_tokens,
        )
        trained = [p.chosen for p in self.population.users[0].members] + [c.reply for c in self.planted]
        score = score_inversion(inversion, trained, self.base.tokenizer).to_dict()
        score["attacked"] = "the secure aggregate of round 1" if run.plan.secagg else "user 0's update of round 1"
        score["recovered_text"] = inversion.text
        return score

    def _audit(self, run: FederatedRun) -> dict[str, Any]:
        from fedpal.simulations.privacy.audit import audit, canary_scores
        from fedpal.simulations.privacy.federation import canary_direction

        shapes = {name: tuple(array.shape) for name, array in self.initial.items()}
        directions = [canary_direction(shapes, k, self.config.seed) for k in range(self.config.canary_clients)]
        scores = canary_scores(run.initial, run.final, directions)
        result = audit(scores, run.included, self.config.delta, self.config.confidence).to_dict()
        result["scores_in"] = scores[run.included].tolist()
        result["scores_out"] = scores[~run.included].tolist()
        return result

    def _utility(self, run: FederatedRun) -> dict[str, float]:
        """Held-out preference accuracy: the share of each user's never-stored pairs whose chosen
        reply the adapters raise above the rejected one, relative to the base model."""
        base_c, base_r = self.base_heldout
        shared_c, shared_r = self._pair_scores([SHARED])
        fedpal = []
        for user in range(self.config.users):
            self._load_personal(run, user)
            mine = np.flatnonzero(self.texts.heldout_owner == user)
            pairs = [self.texts.heldout_pairs[i] for i in mine]
            chosen = self.score([(p.prompt, p.chosen) for p in pairs], [SHARED, PERSONAL]).logprob
            rejected = self.score([(p.prompt, p.rejected) for p in pairs], [SHARED, PERSONAL]).logprob
            fedpal.append((chosen - base_c[mine]) - (rejected - base_r[mine]) > 0)
        shared = (shared_c - base_c) - (shared_r - base_r) > 0
        return {
            "shared_accuracy": float(np.mean(shared)),
            "fedpal_accuracy": float(np.mean(np.concatenate(fedpal))),
            "pairs": int(len(shared)),
        }

    def _leaks(self, run: FederatedRun) -> dict[str, Any]:
        from fedpal.simulations.privacy.leaks import scan_with_control

        needles = [
            text
            for pair in [*self.population.members(), *self.planted_pairs]
            for text in (pair.prompt, pair.chosen, pair.rejected)
        ]
        needles += [user.stated for user in self.population.users if user.stated]
        needles += [canary.secret for canary in self.planted if len(canary.secret) >= 12]
        messages = scan_with_control([run.captures], needles)
        homes = scan_with_control(list(run.homes), needles)
        if messages.files == 0:
            raise RuntimeError(
                f"no client message was captured in the '{run.plan.name}' run: the scan would prove nothing"
            )
        return {
            "messages": messages.to_dict(),
            "homes": homes.to_dict(),
            "found": len(messages.leaks) + len(homes.leaks),
        }

    # -- results -----------------------------------------------------------------------

    def results(
        self, settings: dict[str, dict[str, Any]], utility_runs: list[dict[str, Any]], seconds: float
    ) -> dict[str, Any]:
        c = self.config
        return {
            "preset": c.preset,
            "model": c.model,
            "seed": c.seed,
            "settings": list(settings),
            "mia": {name: _headline(r["mia_global"]) for name, r in settings.items()},
            "mia_personal": {name: _headline(r["mia_personal"]) for name, r in settings.items()},
            "canary_exposure": {
                name: float(np.mean([e["bits"] for e in r["exposure"]["global"]])) for name, r in settings.items()
            },
            "inversion": {name: r["inversion"] for name, r in settings.items()},
            "epsilon": {name: r["epsilon"] for name, r in settings.items()},
            "audited_epsilon": {name: r["audit"]["epsilon"] for name, r in settings.items()},
            "plaintext_leaks": int(sum(r["leaks"]["found"] for r in settings.values())),
            "budget_vs_utility": [
                {
                    "noise_multiplier": r["noise_multiplier"],
                    "epsilon": r["epsilon"],
                    **r["utility"],
                    "mia_auc": _headline(r["mia_global"])["auc"],
                    "mia_tpr_at_1pct_fpr": _headline(r["mia_global"])["tpr_at_1pct_fpr"],
                }
                for r in utility_runs
            ],
            "details": settings,
            "delta": c.delta,
            "config": c.to_dict(),
            "members": len(self.texts.members),
            "nonmembers": len(self.texts.nonmembers),
            "wall_time_s": round(seconds, 1),
        }


RMIA_OFFLINE_A = 0.3
"""RMIA's offline approximation parameter with OUT-only references (the authors' code default)."""


def _headline(attacks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The strongest attack by AUC, named: what a results table shows for one adapter."""
    name, best = max(attacks.items(), key=lambda item: item[1]["auc"])
    return {
        "attack": name,
        **{k: best[k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "members", "nonmembers")},
    }


def _subset(scored: Any, index: np.ndarray) -> Any:
    from fedpal.simulations.privacy.likelihood import Scored

    return Scored(scored.logprob[index], scored.tokens[index])


def privacy_audit(config: AuditConfig, out: Path | str, progress: Progress | None = None) -> dict[str, Any]:
    """Run the audit, write ``results.json``, ``report.md`` and the plots into ``out``."""
    from fedpal.simulations.privacy.report import write_report

    out = Path(out)
    results = PrivacyAudit(config, out, progress).run()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return results
