"""Random option values, paths and file contents fed to the main commands: whatever comes in,
no traceback reaches the user. Each example is a real ``fedpal`` process; its exit status is 0,
or 2 with exactly one ``error:`` line.

Inputs that would start real work are kept cheap on purpose: training and export only ever
get homes that are not homes (their options are parsed and checked before the home is), and
simulate's ``--out`` is always a file, so a valid random config is refused there rather than run.
Every process runs in a scratch folder, so a relative path it writes lands there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import fedpal, no_traceback, ok

EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
number = st.one_of(
    st.integers(-(10**9), 10**9).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1e309", "nan", "", "1_000", "0x10", "2.5"]),
)
value = st.one_of(text, number, st.sampled_from(["-", "--", "--help", "-h", "tiny", "default"]))


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Path]:
    """A scratch folder: a real home with a memory, a file, an empty folder, JSONL and config files."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "cwd").mkdir()
    (root / "a-file").write_text("not a home\n")
    (root / "empty-dir").mkdir()
    prefs = root / "prefs.jsonl"
    prefs.write_text(
        json.dumps({"kind": "stated", "text": "short answers"})
        + "\n"
        + json.dumps({"kind": "pair", "prompt": "q?", "chosen": "a", "rejected": "b"})
        + "\n"
    )
    ok(fedpal("memory", "import", str(prefs), "--home", str(root / "home")))
    return {
        "root": root,
        "cwd": root / "cwd",
        "home": root / "home",
        "file": root / "a-file",
        "dir": root / "empty-dir",
        "jsonl": prefs,
    }


def paths(place: dict[str, Path], real_home: bool) -> st.SearchStrategy[str]:
    fixed = [
        str(place["file"]),
        str(place["dir"]),
        str(place["file"] / "child"),
        str(place["root"] / "missing"),
        "",
        ".",
        "/proc/fedpal-nowhere",
        "-",
    ]
    if real_home:
        fixed.append(str(place["home"]))
    return st.one_of(st.sampled_from(fixed), text)


def run(place, args: list[str], stdin: str | None = None):
    result = fedpal(*args, cwd=place["cwd"], input=stdin, timeout=180)
    no_traceback(result)
    return result


@EXAMPLES
@given(data=st.data())
def test_memory_commands(place, data):
    home = data.draw(paths(place, real_home=True), "home")
    command = data.draw(
        st.sampled_from(
            [
                ["add", data.draw(st.sampled_from(["stated", "pair", "rating", "edit", "turn"]) | text)]
                + data.draw(st.lists(value, max_size=4)),
                ["list", "--kind", data.draw(st.sampled_from(["stated", "pair"]) | text)],
                ["search", data.draw(text), "-k", data.draw(number)],
                [
                    "forget",
                    *data.draw(st.lists(text, max_size=2)),
                    "--since",
                    data.draw(value),
                    "--tag",
                    data.draw(text),
                ],
                ["export", data.draw(paths(place, real_home=False)), "--force"],
                ["verify"],
                [
                    "import",
                    data.draw(st.sampled_from([str(place["jsonl"]), str(place["file"]), str(place["dir"])]) | text),
                ],
            ]
        ),
        "command",
    )
    passphrase_file = data.draw(
        st.sampled_from([[], ["--passphrase-file", str(place["file"])], ["--passphrase-file", "-"]]), "passphrase file"
    )
    run(place, ["memory", *command, "--home", home, *passphrase_file], stdin=data.draw(text))


@EXAMPLES
@given(data=st.data())
def test_generate_train_export_options(place, data):
    command = data.draw(st.sampled_from(["generate", "train", "export"]), "command")
    home = data.draw(paths(place, real_home=command == "generate"), "home")
    options = {
        "generate": [
            "--prompt",
            "--mode",
            "--retrieval-in",
            "--max-new-tokens",
            "--temperature",
            "--top-p",
            "--seed",
            "--w-shared",
            "--w-personal",
            "--w-base",
            "--precision",
            "--model",
            "--passphrase-file",
        ],
        "train": [
            "--model",
            "--adapter",
            "--steps",
            "--objective",
            "--learning-rate",
            "--beta",
            "--batch-size",
            "--max-length",
            "--rank",
            "--holdout",
            "--retrieval-in",
            "--time-budget",
            "--device",
        ],
        "export": ["--model", "--precision", "--max-rank", "--provider"],
    }[command]
    chosen = data.draw(st.lists(st.sampled_from(options), unique=True, max_size=4), "options")
    args = [command, "--home", home]
    for option in chosen:
        args += [option, data.draw(value, option)]
    if command == "generate" and "--prompt" not in chosen:
        args += ["--prompt", data.draw(text, "prompt")]
    if command == "generate" and data.draw(st.booleans(), "sample"):
        args.append("--sample")
    run(place, args)


@EXAMPLES
@given(data=st.data())
def test_server_status_and_simulate_files(place, data):
    content = data.draw(
        st.one_of(
            text,
            st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
            st.dictionaries(
                st.sampled_from(
                    [
                        "round",
                        "epsilon",
                        "aggregated",
                        "styles",
                        "strategy",
                        "users",
                        "seed",
                        "clients_summed",
                        "seconds",
                        "stopped",
                    ]
                )
                | text,
                st.one_of(
                    st.integers(-5, 5),
                    st.floats(allow_nan=False),
                    text,
                    st.booleans(),
                    st.none(),
                    st.lists(text, max_size=3),
                ),
            ).map(json.dumps),
        ),
        "content",
    )
    folder = place["root"] / "files"
    folder.mkdir(exist_ok=True)
    if data.draw(st.booleans(), "server"):
        (folder / "metrics.jsonl").write_text(content + data.draw(st.sampled_from(["", "\n"])), encoding="utf-8")
        run(
            place,
            [
                "server",
                "status",
                data.draw(
                    st.sampled_from([str(folder), str(folder / "metrics.jsonl")]) | paths(place, real_home=False)
                ),
                "--json",
            ],
        )
    else:
        config = folder / data.draw(st.sampled_from(["c.json", "c.toml"]))
        config.write_text(content, encoding="utf-8")
        run(place, ["simulate", "--out", str(place["file"]), "--config", str(config)])
