"""``fedpal model``: prepare the base model cache and check that a model loads and talks."""

from __future__ import annotations

import json
import time

import typer

app = typer.Typer(help="Prepare and check base models.", no_args_is_help=True, suggest_commands=False)

MODEL_HELP = "'default' (SmolLM2-135M-Instruct, embedded), 'tiny' (random, for tests), a local folder or a hub id."


@app.command()
def prepare(
    model: str = typer.Option("default", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help='Print {"model", "path"}.'),
) -> None:
    """Convert or build the model into the cache (FEDPAL_HOME) and print its folder."""
    from fedpal.common.models import resolve_model_path

    path = resolve_model_path(model)
    typer.echo(json.dumps({"model": model, "path": str(path)}) if as_json else str(path))


@app.command()
def smoke(
    model: str = typer.Option("default", help=MODEL_HELP),
    prompt: str = typer.Option("Give me one tip for a productive morning.", help="The user message."),
    max_new_tokens: int = typer.Option(48, min=1, help="Tokens to generate."),
    device: str = typer.Option(None, help="torch device; default: cuda if available, else cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line instead of text."),
) -> None:
    """Load the model with PyTorch and generate one greedy reply (a quick health check)."""
    from fedpal.common.generation import generate_reply
    from fedpal.common.models import load_base_model

    start = time.perf_counter()
    base = load_base_model(model, device=device)
    loaded = time.perf_counter()
    text, tokens = generate_reply(base, prompt, max_new_tokens=max_new_tokens)
    done = time.perf_counter()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": str(base.path),
                    "text": text,
                    "tokens": tokens,
                    "load_seconds": round(loaded - start, 3),
                    "seconds": round(done - loaded, 3),
                }
            )
        )
    else:
        typer.echo(f"[{base.path.name} on {base.device}] {prompt}\n{text}")
