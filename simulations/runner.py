"""The main job: a federated personalization experiment with simulated users, as one ``flwr run``.

One run, start to finish:

1. here, before Flower starts: the base model is exported once to ONNX Runtime GenAI,
   and candidate replies to the training prompts are generated through it in several
   styles (shared by all users; cached in ``candidates.json``);
2. the experiment app (``fedpal.simulations.experiment``) runs as one ``flwr run`` on a
   local simulation SuperLink (Flower's Simulation Engine on Ray; ``ray_address`` joins a
   Ray cluster instead). Each simulated user lives on its own virtual SuperNode: it joins
   with an encrypted memory holding its stated preference, labels new prompts' candidates
   between rounds, trains as a deployed client in each round (privacy protection as
   configured), trains a local-only personal adapter beside it (no federation, same
   steps, the baseline), and replies to held-out prompts through the ONNX runtime;
3. the ServerApp scores the replies with each user's exact utility: base,
   retrieval-only, local-only, shared-only and fedpal (shared + personal + retrieval),
   plus the cross-user matrix and learning curves, into ``results.json``;
4. here again: ``report.md`` and the plots.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedpal.client.memory import PASSPHRASE_ENV
from fedpal.common.errors import FedpalError
from fedpal.simulations.config import SimulationConfig
from fedpal.simulations.engine import ProgressLog, check_ray_address, flwr_run, write_app
from fedpal.simulations.experiment.node import simulation_export, simulation_passphrase
from fedpal.simulations.experiment.server_app import CANDIDATES_FILE, PROGRESS_FILE
from fedpal.simulations.prompts import sample_prompts
from fedpal.simulations.styles import STYLES_BY_NAME, candidate_generation_prompts, synthetic_reply

APP_COMPONENTS = {
    "serverapp": "fedpal.simulations.experiment.server_app:app",
    "clientapp": "fedpal.simulations.experiment.client_app:app",
}

Progress = Callable[[str, int], Callable[[], None]]


def _no_progress(description: str, total: int) -> Callable[[], None]:
    return lambda: None


def prepare_candidates(config: SimulationConfig, out: Path, progress: Progress = _no_progress) -> dict[str, list[str]]:
    """Candidate replies per training prompt, one per style (cached in ``candidates.json``): from
    the base model through the ONNX export (``candidate_source = model``) or from templates."""
    from fedpal.client.generator import DecodeOptions, PersonalizedGenerator

    export = simulation_export(config)  # made here, once: the nodes find it in the cache instead of racing to build it
    train_prompts = sample_prompts("train", config.train_prompts, config.seed)
    cache = out / CANDIDATES_FILE
    key = {
        "source": config.candidate_source,
        "model": config.model,
        "precision": config.precision,
        "styles": list(config.styles),
        "tokens": config.candidate_tokens,
        "prompts": train_prompts,
        "seed": config.seed,
    }
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["candidates"]
    styles = [STYLES_BY_NAME[name] for name in config.styles]
    options = DecodeOptions(max_new_tokens=config.candidate_tokens)
    generator = PersonalizedGenerator(export) if config.candidate_source == "model" else None
    result: dict[str, list[str]] = {}
    source = "base model, ONNX" if generator is not None else "templates"
    advance = progress(f"candidate replies ({source})", len(train_prompts) * len(styles))
    for number, prompt in enumerate(train_prompts):
        if generator is None:
            rng = np.random.default_rng([config.seed, number])
            result[prompt] = [synthetic_reply(prompt, style, rng) for style in styles]
            for _ in styles:
                advance()
            continue
        result[prompt] = []
        for request in candidate_generation_prompts(prompt, styles):
            result[prompt].append(generator.generate(request, options=options).text)
            advance()
    cache.write_text(json.dumps({"key": key, "candidates": result}))
    return result


def run_experiment(
    config: SimulationConfig,
    out: Path | str,
    progress: Progress | None = None,
    *,
    verbose: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Prepare the candidates, run the experiment app as one ``flwr run``; returns ``results.json``'s dictionary."""
    config.check()
    if ray_address:
        check_ray_address(ray_address)
    started = time.perf_counter()
    progress = progress or _no_progress
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ[PASSPHRASE_ENV] = simulation_passphrase(config)
    prepare_candidates(config, out, progress)
    for stale in (out / PROGRESS_FILE, out / "results.json", out / "replies.json"):
        stale.unlink(missing_ok=True)
    app = write_app(out / "app", "fedpal-simulate", APP_COMPONENTS, config.run_config(out))
    phases = ProgressLog(out / PROGRESS_FILE)
    flwr_run(
        app, config.federation_config(), out, lambda: phases.follow(progress), verbose=verbose, ray_address=ray_address
    )
    path = out / "results.json"
    if not path.is_file():
        raise FedpalError(f"the experiment ended without results ({path} missing); see {out / 'flwr-run.log'}")
    results = json.loads(path.read_text())
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    return results


def simulate(
    config: SimulationConfig,
    out: Path | str,
    progress: Progress | None = None,
    *,
    verbose: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run the experiment, write ``results.json``, ``report.md`` and the plots into ``out``."""
    from fedpal.simulations.report import write_report

    out = Path(out)
    results = run_experiment(config, out, progress, verbose=verbose, ray_address=ray_address)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return results
