"""``fedpal export``, ``fedpal generate`` and ``fedpal chat``: personalized replies on this machine.

``export`` builds the ONNX base model once (cached) and records in the client's home which
export it uses; ``generate`` and ``chat`` then load that export and the user's adapters.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedpal.client.generator import DEFAULT_MODE
from fedpal.common.errors import FedpalError

if TYPE_CHECKING:
    from fedpal.client.generator import DecodeOptions, PersonalizedGenerator
    from fedpal.client.home import ClientHome

HOME = typer.Option(..., "--home", help="The client's home folder (adapters, memory, runtime files).")
MODEL = typer.Option(None, "--model", help="'default', 'tiny', a local folder or a hub id (default: the home's export).")
PRECISION = typer.Option(None, "--precision", help="int4 or fp32 (default: the home's export, else int4).")
PASSPHRASE = typer.Option(None, "--passphrase", envvar="FEDPAL_PASSPHRASE", help="Memory passphrase (for --retrieval and ratings).")
MODE = typer.Option(
    DEFAULT_MODE, "--mode",
    help="base, merge (shared + personal in one adapter), fusion (per-token mix) or rerank "
         "(drafts scored by a reward learned from your pairs; slower: one generation per draft).",
)
W_SHARED = typer.Option(1.0, "--w-shared", help="Weight of the shared adapter (merge and fusion).")
W_PERSONAL = typer.Option(1.0, "--w-personal", help="Weight of the personal adapter (merge and fusion).")
W_BASE = typer.Option(0.0, "--w-base", help="Weight of the base model's log-probabilities (fusion only).")
RETRIEVAL = typer.Option(False, "--retrieval", help="Add the user's most relevant stated preferences (see --retrieval-in).")
RETRIEVAL_IN = typer.Option(
    "prompt", "--retrieval-in", help="Where retrieved preferences go: prompt (after the request) or system (the system message)."
)
MAX_NEW = typer.Option(128, "--max-new-tokens", min=1, help="Stop after this many new tokens.")
SAMPLE = typer.Option(False, "--sample", help="Sample instead of greedy decoding.")
TEMPERATURE = typer.Option(0.8, "--temperature", help="Sampling temperature (with --sample).")
TOP_P = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (with --sample).")
SEED = typer.Option(None, "--seed", help="Sampling seed: same seed, same reply.")


def export(
    home: Path = HOME,
    model: str = typer.Option("default", "--model", help="'default', 'tiny', a local folder or a hub id."),
    precision: str = typer.Option("int4", "--precision", help="int4 (fast, LoRA stays float) or fp32."),
    max_rank: int = typer.Option(64, "--max-rank", min=1, help="Largest adapter rank (merges add ranks) the export accepts."),
    provider: str = typer.Option("cpu", "--provider", help="Execution provider: cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a matching export is cached."),
) -> None:
    """Export the base model to ONNX Runtime once, with LoRA weights as run-time inputs (cached)."""
    from fedpal.client.home import ClientHome
    from fedpal.client.onnx_export import export_model

    client = ClientHome.at(home)
    info = export_model(model, precision, client.adapter_targets(), max_rank, provider, force=force)
    client.record_export(model, precision, max_rank, provider, info.key)
    typer.echo(f"export {info.key} ({info.precision}, {len(info.lora_inputs)} LoRA inputs, max rank {info.max_rank}) at {info.path}")


def generate(
    home: Path = HOME,
    prompt: str = typer.Option(..., "--prompt", help="What the user asks."),
    model: str = MODEL,
    precision: str = PRECISION,
    mode: str = MODE,
    retrieval: bool = RETRIEVAL,
    retrieval_in: str = RETRIEVAL_IN,
    max_new_tokens: int = MAX_NEW,
    w_shared: float = W_SHARED,
    w_personal: float = W_PERSONAL,
    w_base: float = W_BASE,
    sample: bool = SAMPLE,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    passphrase: str = PASSPHRASE,
    as_json: bool = typer.Option(False, "--json", help='Print one JSON line {"text", "tokens", "seconds", "mode"}.'),
) -> None:
    """Reply to one prompt as this user would want, streaming the tokens (or one JSON line)."""
    from fedpal.client.home import ClientHome

    client = ClientHome.at(home)
    generator = _open_generator(client, model, precision)
    options = _options(max_new_tokens, sample, temperature, top_p, seed)
    on_token = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    reply = generator.generate_for(
        client, prompt, mode=mode, w_shared=w_shared, w_personal=w_personal, w_base=w_base,
        retrieval=retrieval, retrieval_in=retrieval_in, passphrase=passphrase, options=options, on_token=on_token,
    )
    if as_json:
        typer.echo(reply.to_json())
    else:
        typer.echo("")
        typer.echo(f"[{reply.mode}: {reply.tokens} tokens in {reply.seconds:.2f} s]", err=True)


def chat(
    home: Path = HOME,
    model: str = MODEL,
    precision: str = PRECISION,
    mode: str = typer.Option(None, "--mode", help="base, merge, fusion or rerank (default: as for generate)."),
    retrieval: bool = RETRIEVAL,
    retrieval_in: str = RETRIEVAL_IN,
    max_new_tokens: int = MAX_NEW,
    passphrase: str = PASSPHRASE,
) -> None:
    """Chat as this user; rate a reply (/rate 1-5) or pick the better of two (/pick) to teach the adapters.

    Ratings and picks go into the user's encrypted memory; `fedpal train` learns from them.
    """
    from fedpal.client.generator import MODES
    from fedpal.client.home import ClientHome

    client = ClientHome.at(home)
    generator = _open_generator(client, model, precision)
    if mode is None:
        mode = DEFAULT_MODE
    if mode not in MODES:
        raise FedpalError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
    session = _ChatSession(generator, client, mode, retrieval, max_new_tokens, passphrase, retrieval_in)
    typer.echo(f"fedpal chat ({mode}{' + retrieval' if retrieval else ''}). /rate N (1-5), /pick, /mode M, /quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        try:
            session.handle(line)
        except FedpalError as err:
            typer.echo(f"error: {err}", err=True)


class _ChatSession:
    """The state of one interactive chat: the last exchange, which ratings and picks refer to."""

    def __init__(
        self, generator: "PersonalizedGenerator", client: "ClientHome", mode: str, retrieval: bool,
        max_new_tokens: int, passphrase: str | None, retrieval_in: str = "prompt",
    ) -> None:
        self.generator, self.client, self.mode, self.retrieval = generator, client, mode, retrieval
        self.retrieval_in = retrieval_in
        self.max_new_tokens, self.passphrase = max_new_tokens, passphrase
        self.last: tuple[str, str] | None = None

    def handle(self, line: str) -> None:
        command, _, argument = line.partition(" ")
        if command == "/rate":
            self.rate(argument.strip())
        elif command == "/pick":
            self.pick()
        elif command == "/mode":
            self.switch(argument.strip())
        elif command.startswith("/"):
            raise FedpalError(f"unknown command {command}; use /rate N, /pick, /mode M or /quit")
        else:
            typer.echo("bot> ", nl=False)
            reply = self.reply(line, _options(self.max_new_tokens, False, 1.0, 1.0, None), stream=True)
            typer.echo("")
            self.last = (line, reply)

    def reply(self, prompt: str, options: "DecodeOptions", stream: bool = False) -> str:
        on_token = (lambda piece: (sys.stdout.write(piece), sys.stdout.flush())) if stream else None
        return self.generator.generate_for(
            self.client, prompt, mode=self.mode, retrieval=self.retrieval, retrieval_in=self.retrieval_in,
            passphrase=self.passphrase, options=options, on_token=on_token,
        ).text

    def rate(self, argument: str) -> None:
        if self.last is None:
            raise FedpalError("nothing to rate yet: ask something first")
        if argument not in {"1", "2", "3", "4", "5"}:
            raise FedpalError(f"a rating is a whole number from 1 to 5, not '{argument}'")
        with self._memory() as memory:
            memory.add_rating(self.last[0], self.last[1], int(argument))
        typer.echo(f"rated {argument}/5, saved in your memory")

    def pick(self) -> None:
        if self.last is None:
            raise FedpalError("nothing to compare yet: ask something first")
        prompt, first = self.last
        options = _options(self.max_new_tokens, True, 0.9, 0.95, random.randrange(2**31))
        second = self.reply(prompt, options)
        typer.echo(f"[1] {first}\n[2] {second}")
        choice = input("which is better? 1/2 (enter to skip)> ").strip()
        if choice not in ("1", "2"):
            typer.echo("skipped")
            return
        chosen, rejected = (first, second) if choice == "1" else (second, first)
        if chosen == rejected:
            raise FedpalError("the two replies are identical; nothing to learn from this pick")
        with self._memory() as memory:
            memory.add_pair(prompt, chosen, rejected)
        self.last = (prompt, chosen)
        typer.echo("preference saved in your memory")

    def switch(self, mode: str) -> None:
        from fedpal.client.generator import MODES

        if mode not in MODES:
            raise FedpalError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
        self.mode = mode
        typer.echo(f"mode: {mode}")

    def _memory(self):
        from fedpal.client.memory import PreferenceMemory

        return PreferenceMemory.open(self.client.root, passphrase=self.passphrase)


def _options(max_new_tokens: int, sample: bool, temperature: float, top_p: float, seed: int | None) -> "DecodeOptions":
    from fedpal.client.generator import DecodeOptions

    options = DecodeOptions(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p, seed=seed)
    options.check()
    return options


def _open_generator(client: "ClientHome", model: str | None, precision: str | None) -> "PersonalizedGenerator":
    from fedpal.client.generator import PersonalizedGenerator

    return PersonalizedGenerator.for_home(client, model, precision)
