"""``fedpal export``, ``fedpal generate`` and ``fedpal chat``: personalized replies on this machine.

``export`` builds the ONNX base model once (cached) and records in the client's home which
export it uses; ``generate`` and ``chat`` then load that export and the user's adapters.
Every option, the home, the export and the memory's passphrase are checked before the
model is loaded, so a mistake costs a second, not a model load.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from fedpal.client.cli_common import PASSPHRASE_FILE, choices, home_option, plain, read_passphrase
from fedpal.client.generator import DEFAULT_MODE, MODES
from fedpal.client.onnx_export import DEFAULT_MAX_RANK, DEFAULT_PRECISION, PRECISIONS, PROVIDERS
from fedpal.common.errors import FedpalError
from fedpal.common.generation import PLACEMENTS

if TYPE_CHECKING:
    from fedpal.client.generator import DecodeOptions, PersonalizedGenerator, Reply
    from fedpal.client.home import ClientHome
    from fedpal.client.onnx_export import ExportInfo

Mode = choices("Mode", tuple(MODES))
Placement = choices("Placement", PLACEMENTS)
Precision = choices("Precision", PRECISIONS)
Provider = choices("Provider", PROVIDERS)

HOME = home_option("The client's home folder (adapters, memory, runtime files).")
MODEL = typer.Option(
    None, "--model", help="'default', 'tiny', a local folder or a hub id (default: the home's export)."
)
PRECISION = typer.Option(None, "--precision", help=f"Default: the home's export, else {DEFAULT_PRECISION}.")
PASSPHRASE = typer.Option(
    None,
    "--passphrase",
    envvar="FEDPAL_PASSPHRASE",
    show_envvar=True,
    help="Memory passphrase (for --retrieval, rerank and ratings); --passphrase-file keeps it off the command line.",
)
MODE_HELP = (
    "base, merge (shared + personal in one adapter), fusion (per-token mix) or rerank "
    "(drafts scored by a reward learned from your pairs; slower: one generation per draft)."
)
W_SHARED = typer.Option(
    None, "--w-shared", help="Weight of the shared adapter (merge, fusion, rerank); default 1 if trained, else 0."
)
W_PERSONAL = typer.Option(
    None, "--w-personal", help="Weight of the personal adapter (merge, fusion, rerank); default 1 if trained, else 0."
)
W_BASE = typer.Option(0.0, "--w-base", help="Weight of the base model's log-probabilities (fusion only).")
RETRIEVAL = typer.Option(
    False, "--retrieval", help="Add the user's most relevant stated preferences (see --retrieval-in)."
)
RETRIEVAL_IN = typer.Option(
    "prompt", "--retrieval-in", help="Where retrieved preferences go: after the request or in the system message."
)
MAX_NEW = typer.Option(
    128, "--max-new-tokens", min=1, help="Stop after this many new tokens (or at the model's context)."
)
SAMPLE = typer.Option(False, "--sample", help="Sample instead of greedy decoding.")
TEMPERATURE = typer.Option(0.8, "--temperature", help="Sampling temperature, > 0 (with --sample).")
TOP_P = typer.Option(0.95, "--top-p", help="Nucleus sampling mass, in (0, 1] (with --sample).")
SEED = typer.Option(None, "--seed", min=0, max=2**31 - 1, help="Sampling seed: same seed, same reply.")


def export(
    home: str = HOME,
    model: Annotated[str, typer.Option("--model", help="'default', 'tiny', a local folder or a hub id.")] = "default",
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="int8 (keeps trained styles), int4 (fastest; rounding blurs styles) or fp32; LoRA stays float.",
        ),
    ] = DEFAULT_PRECISION,
    max_rank: Annotated[
        int, typer.Option("--max-rank", min=1, help="Largest adapter rank (merges add ranks) the export accepts.")
    ] = DEFAULT_MAX_RANK,
    provider: Annotated[
        Provider,
        typer.Option("--provider", help="Execution provider; cuda needs an NVIDIA GPU and onnxruntime-genai-cuda."),
    ] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a matching export is cached.")] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help='Print {"key", "path", "model", "precision", "provider", "max_rank", "lora_inputs", "home"}.'
        ),
    ] = False,
) -> None:
    """Export the base model to ONNX Runtime once, with LoRA weights as run-time inputs (cached).

    The new export is loaded once before the home records it: a home keeps answering with
    its previous export unless the new one works on this machine.
    """
    from fedpal.client.home import ClientHome
    from fedpal.client.onnx_export import check_loads, check_provider, export_model

    precision, provider = plain(precision), plain(provider)
    client = ClientHome.existing(home).writable()
    check_provider(provider)
    with _status(f"exporting model '{model}' to ONNX ({precision}, {provider}); a first export takes a while"):
        info = check_loads(export_model(model, precision, client.adapter_targets(), max_rank, provider, force=force))
    client.record_export(model, precision, max_rank, provider, info.key)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "key": info.key,
                    "path": str(info.path),
                    "model": model,
                    "precision": info.precision,
                    "provider": info.execution_provider,
                    "max_rank": info.max_rank,
                    "lora_inputs": len(info.lora_inputs),
                    "home": str(client.root),
                }
            )
        )
    else:
        typer.echo(
            f"export {info.key} ({info.precision}, {len(info.lora_inputs)} LoRA inputs, max rank {info.max_rank}) "
            f"at {info.path}"
        )


@contextmanager
def _status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow runs, in a terminal only (logs and pipes stay clean)."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def generate(
    home: str = HOME,
    prompt: str = typer.Option(..., "--prompt", help="What the user asks."),
    model: str = MODEL,
    precision: Precision = PRECISION,
    mode: Mode = typer.Option(DEFAULT_MODE, "--mode", help=MODE_HELP),
    retrieval: bool = RETRIEVAL,
    retrieval_in: Placement = RETRIEVAL_IN,
    max_new_tokens: int = MAX_NEW,
    w_shared: float = W_SHARED,
    w_personal: float = W_PERSONAL,
    w_base: float = W_BASE,
    sample: bool = SAMPLE,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    passphrase: str = PASSPHRASE,
    passphrase_file: str = PASSPHRASE_FILE,
    as_json: bool = typer.Option(
        False, "--json", help='Print one JSON line {"text", "tokens", "seconds", "mode", "adapters"}.'
    ),
) -> None:
    """Reply to one prompt as this user would want, streaming the tokens (or one JSON line)."""
    from fedpal.client.home import ClientHome

    mode, retrieval_in = plain(mode), plain(retrieval_in)
    options = _options(max_new_tokens, sample, temperature, top_p, seed)
    if not prompt.strip():
        raise FedpalError("the prompt is empty")
    client = ClientHome.existing(home)
    weights = _weights(client, mode, w_shared, w_personal, w_base)
    info = _find_export(client, model, plain(precision), max_new_tokens)
    passphrase = _memory_passphrase(client, retrieval or mode == "rerank", retrieval, passphrase, passphrase_file)
    generator = _generator(info)
    on_token = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    reply = generator.generate_for(
        client,
        prompt,
        mode=mode,
        w_shared=weights["shared"],
        w_personal=weights["personal"],
        w_base=w_base,
        retrieval=retrieval,
        retrieval_in=retrieval_in,
        passphrase=passphrase,
        options=options,
        on_token=on_token,
    )
    answered = _answered(reply, weights, w_base)
    _warn_if_cut(reply, info, max_new_tokens)
    if as_json:
        typer.echo(json.dumps({**json.loads(reply.to_json()), "adapters": answered}))
    else:
        typer.echo("")
        used = ", ".join(f"{name} {weight:g}" for name, weight in answered.items()) or "none"
        typer.echo(f"[{reply.mode}: {reply.tokens} tokens in {reply.seconds:.2f} s; adapters: {used}]", err=True)


def chat(
    home: str = HOME,
    model: str = MODEL,
    precision: Precision = PRECISION,
    mode: Mode = typer.Option(DEFAULT_MODE, "--mode", help=MODE_HELP),
    retrieval: bool = RETRIEVAL,
    retrieval_in: Placement = RETRIEVAL_IN,
    max_new_tokens: int = MAX_NEW,
    passphrase: str = PASSPHRASE,
    passphrase_file: str = PASSPHRASE_FILE,
) -> None:
    """Chat as this user; rate a reply (/rate 1-5) or pick the better of two (/pick) to teach the adapters.

    Ratings and picks go into the user's encrypted memory; `fedpal train` learns from them.
    After /pick, answer 1 or 2 (anything else skips the pick and is read as usual). The exit
    status is 2 if a rating or pick could not be saved.
    """
    from fedpal.client.home import ClientHome

    mode, retrieval_in = plain(mode), plain(retrieval_in)
    _options(max_new_tokens, False, 1.0, 1.0, None)
    client = ClientHome.existing(home)
    info = _find_export(client, model, plain(precision), max_new_tokens)
    passphrase = read_passphrase(passphrase, passphrase_file, ask=False, stdin_free=False)
    if retrieval or mode == "rerank":
        passphrase = _memory_passphrase(client, True, retrieval, passphrase, None, stdin_free=False)
    generator = _generator(info)
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
    if session.unsaved:
        raise FedpalError(f"{session.unsaved} rating(s) or pick(s) were not saved in the memory (see the errors above)")


class _ChatSession:
    """The state of one interactive chat: the last exchange, which ratings and picks refer to."""

    def __init__(
        self,
        generator: "PersonalizedGenerator",
        client: "ClientHome",
        mode: str,
        retrieval: bool,
        max_new_tokens: int,
        passphrase: str | None,
        retrieval_in: str = "prompt",
    ) -> None:
        self.generator, self.client, self.mode, self.retrieval = generator, client, mode, retrieval
        self.retrieval_in = retrieval_in
        self.max_new_tokens, self.passphrase = max_new_tokens, passphrase
        self.last: tuple[str, str] | None = None
        self.pending: tuple[str, str, str] | None = None
        """After /pick: (prompt, reply 1, reply 2) until the next line says 1 or 2."""
        self.unsaved = 0

    def handle(self, line: str) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            if line in ("1", "2"):
                self.choose(pending, line)
                return
            typer.echo("pick skipped")
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
            self.client,
            prompt,
            mode=self.mode,
            retrieval=self.retrieval,
            retrieval_in=self.retrieval_in,
            passphrase=self.passphrase,
            options=options,
            on_token=on_token,
        ).text

    def rate(self, argument: str) -> None:
        if self.last is None:
            raise FedpalError("nothing to rate yet: ask something first")
        if argument not in {"1", "2", "3", "4", "5"}:
            raise FedpalError(f"a rating is a whole number from 1 to 5, not '{argument}'")
        self._save(lambda memory: memory.add_rating(self.last[0], self.last[1], int(argument)))
        typer.echo(f"rated {argument}/5, saved in your memory")

    def pick(self) -> None:
        if self.last is None:
            raise FedpalError("nothing to compare yet: ask something first")
        prompt, first = self.last
        options = _options(self.max_new_tokens, True, 0.9, 0.95, random.randrange(2**31))
        second = self.reply(prompt, options)
        if second == first:
            raise FedpalError("the second reply came out the same as the first; nothing to compare")
        typer.echo(f"[1] {first}\n[2] {second}\nwhich is better? type 1 or 2 (anything else skips)")
        self.pending = (prompt, first, second)

    def choose(self, pending: tuple[str, str, str], choice: str) -> None:
        prompt, first, second = pending
        chosen, rejected = (first, second) if choice == "1" else (second, first)
        self._save(lambda memory: memory.add_pair(prompt, chosen, rejected))
        self.last = (prompt, chosen)
        typer.echo("preference saved in your memory")

    def switch(self, mode: str) -> None:
        if mode not in MODES:
            raise FedpalError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
        self.mode = mode
        typer.echo(f"mode: {mode}")

    def _save(self, write) -> None:
        """Write feedback to the memory; a failure is counted, so the chat cannot end as if all was saved."""
        from fedpal.client.memory import PreferenceMemory

        try:
            source = PreferenceMemory.key_source(self.client.root)
            if self.passphrase is None and source != "keyring":
                self.passphrase = read_passphrase(None, None, ask=True, confirm=source is None)
            with PreferenceMemory.open(self.client.root, passphrase=self.passphrase) as memory:
                write(memory)
            if source is None:
                typer.echo(
                    f"note: created a new memory in {self.client.root} (encrypted; key protected by your passphrase)",
                    err=True,
                )
        except FedpalError:
            self.unsaved += 1
            raise


def _options(max_new_tokens: int, sample: bool, temperature: float, top_p: float, seed: int | None) -> "DecodeOptions":
    from fedpal.client.generator import DecodeOptions

    if not (math.isfinite(temperature) and math.isfinite(top_p)):
        raise FedpalError("--temperature and --top-p must be finite numbers")
    options = DecodeOptions(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p, seed=seed
    )
    options.check()
    return options


def _find_export(client: "ClientHome", model: str | None, precision: str | None, max_new_tokens: int) -> "ExportInfo":
    """The export this home answers with (its record, or the one ``--model``/``--precision`` name), checked
    against this machine and ``--max-new-tokens`` from its manifest alone: no model is loaded yet."""
    from fedpal.client.generator import home_export

    info = home_export(client, model, precision)
    if max_new_tokens >= info.context_length:
        raise FedpalError(
            f"--max-new-tokens {max_new_tokens} does not fit the model's context of "
            f"{info.context_length} tokens (prompt included)"
        )
    return info


def _generator(info: "ExportInfo") -> "PersonalizedGenerator":
    from fedpal.client.generator import PersonalizedGenerator

    return PersonalizedGenerator(info)


def _weights(
    client: "ClientHome", mode: str, w_shared: float | None, w_personal: float | None, w_base: float
) -> dict[str, float]:
    """The adapter weights to answer with: a trained adapter weighs 1 unless told otherwise, a missing one 0.

    A weight given for an adapter the home does not have is refused (merge would silently
    answer without it, fusion would fail after loading the model).
    """
    from fedpal.common.adapters import CONFIG_FILE

    weights = {}
    for name, given in (("shared", w_shared), ("personal", w_personal)):
        if given is not None and not math.isfinite(given):
            raise FedpalError(f"--w-{name} must be a finite number, not {given}")
        trained = (client.adapter_dir(name) / CONFIG_FILE).is_file()
        if given and not trained and mode != "base":
            raise FedpalError(
                f"--w-{name} {given:g} asks for the {name} adapter, but {client.root} has none; "
                f"train it (fedpal train --home {client.root} --adapter {name}) or leave --w-{name} out"
            )
        weights[name] = (1.0 if trained else 0.0) if given is None else float(given)
    if not math.isfinite(w_base):
        raise FedpalError(f"--w-base must be a finite number, not {w_base}")
    if w_base and mode != "fusion":
        raise FedpalError("--w-base only applies to --mode fusion")
    if mode == "fusion" and not (w_base or any(weights.values())):
        raise FedpalError(f"fusion needs a trained adapter with a non-zero weight or --w-base; {client.root} has none")
    return weights


def _answered(reply: "Reply", weights: dict[str, float], w_base: float) -> dict[str, float]:
    """The adapters (and their weights) that produced ``reply``; empty when the base model alone answered."""
    used = {name: weight for name, weight in weights.items() if weight}
    if reply.mode.startswith("fusion"):
        return {"base": w_base, **used} if w_base else used
    if reply.mode.startswith("merge") or (reply.mode.startswith("rerank") and reply.draft == "adapter"):
        return used
    return {}


def _memory_passphrase(
    client: "ClientHome",
    needed: bool,
    retrieval: bool,
    passphrase: str | None,
    passphrase_file: str | None,
    stdin_free: bool = True,
) -> str | None:
    """The passphrase, checked against the memory before any model loads (a wrong one fails in 0.1 s)."""
    from fedpal.client.memory import PreferenceMemory

    passphrase = read_passphrase(passphrase, passphrase_file, ask=False, stdin_free=stdin_free)
    if not needed:
        return passphrase
    source = PreferenceMemory.key_source(client.root)
    if source is None:
        if retrieval:
            typer.echo(f"warning: {client.root} has no memory yet, so --retrieval adds nothing", err=True)
        return passphrase
    if source == "passphrase" and passphrase is None:
        passphrase = read_passphrase(None, None, ask=True)
    with PreferenceMemory.open(client.root, passphrase=passphrase):
        pass
    return passphrase


def _warn_if_cut(reply: "Reply", info: "ExportInfo", max_new_tokens: int) -> None:
    if reply.tokens < max_new_tokens and reply.prompt_tokens + reply.tokens >= info.context_length:
        typer.echo(
            f"warning: the reply stopped at the model's context of {info.context_length} tokens "
            f"({reply.prompt_tokens} of them the prompt), before --max-new-tokens {max_new_tokens}",
            err=True,
        )
