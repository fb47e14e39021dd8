"""The command line keeps its promise (issue #12): every mistake a user can fix is one ``error:``
line on stderr, exit status 2, and a home left exactly as it was; and the fixed behaviours hold.

Everything runs the real ``fedpal`` in subprocesses on the tiny model. One home is built
once per module through the CLI itself (import, train, export) and reused; checks that
need no model come first in each test, so most calls fail within a second.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from cli_helpers import PASSPHRASE, fedpal, ok, snapshot, user_error

PAIRS = [
    {
        "kind": "pair",
        "prompt": f"How should I answer question {i}?",
        "chosen": f"Briefly: point {i}.",
        "rejected": f"Well, there are many long considerations about question {i} to go through first.",
    }
    for i in range(6)
]
STATED = {"kind": "stated", "text": "I like short answers with one example."}
LONG_STATED = {"kind": "stated", "text": "I want replies that mention hiking " + "very " * 19_000 + "often."}


def write_jsonl(path: Path, records: list[dict], bom: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A home made only through the CLI: memory imported, personal adapter trained with retrieval, fp32 export."""
    root = tmp_path_factory.mktemp("contract")
    home = root / "home"
    imported = json.loads(
        ok(
            fedpal(
                "memory",
                "import",
                str(write_jsonl(root / "prefs.jsonl", [STATED, LONG_STATED, *PAIRS])),
                "--home",
                str(home),
                "--json",
            )
        ).stdout
    )
    trained = ok(
        fedpal(
            "train",
            "--home",
            str(home),
            "--model",
            "tiny",
            "--steps",
            "1",
            "--holdout",
            "0",
            "--no-guard",
            "--batch-size",
            "2",
            "--max-length",
            "32",
            "--retrieval",
            "--json",
        )
    )
    exported = ok(fedpal("export", "--home", str(home), "--model", "tiny", "--precision", "fp32", "--json"))
    return {"root": root, "home": home, "imported": imported, "trained": trained, "export": json.loads(exported.stdout)}


# ------------------------------------------------------------------ 1. export provider


def test_1_a_provider_the_machine_lacks_is_refused_and_the_working_export_stays(built):
    import onnxruntime_genai as og

    if og.is_cuda_available():
        pytest.skip("this machine has CUDA: the refusal cannot be seen here")
    home = built["home"]
    before = snapshot(home)
    user_error(
        fedpal("export", "--home", str(home), "--model", "tiny", "--provider", "cuda"), "no CUDA", "--provider cpu"
    )
    assert snapshot(home) == before
    reply = json.loads(
        ok(fedpal("generate", "--home", str(home), "--prompt", "hi", "--max-new-tokens", "3", "--json")).stdout
    )
    assert reply["tokens"] <= 3 and reply["adapters"] == {"personal": 1.0}  # no shared adapter was trained
    assert built["export"]["provider"] == "cpu" and built["export"]["home"] == str(home)


# ------------------------------------------------------------------ 2. size limit and retrieval budget


def test_2_records_have_a_size_limit_and_retrieval_fits_the_context(built):
    home, root = built["home"], built["root"]
    before = snapshot(home)
    huge = write_jsonl(root / "huge.jsonl", [{"kind": "stated", "text": "x" * 1_000_000}])
    user_error(fedpal("memory", "import", str(huge), "--home", str(home)), "huge.jsonl:1", "limit is 100,000")
    assert snapshot(home) == before
    # The imported 100 kB stated preference is within the limit; retrieval adds at most 1000 bytes of preferences.
    reply = ok(
        fedpal("generate", "--home", str(home), "--prompt", "hi", "--retrieval", "--max-new-tokens", "4", "--json")
    )
    assert json.loads(reply.stdout)["mode"] == "merge+retrieval"
    # train --retrieval says how many sequences its length limit cut, instead of cutting silently.
    trained = built["trained"]
    assert json.loads(trained.stdout.splitlines()[-1])["cut_sequences"] > 0
    assert "were longer than the 32-token limit" in trained.stderr


# ------------------------------------------------------------------ 3. no tracebacks


def test_3_a_file_or_unwritable_place_as_home_is_one_line(built, tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("hello")
    prefs = write_jsonl(tmp_path / "p.jsonl", [STATED])
    for args in (
        ["memory", "import", str(prefs)],
        ["memory", "add", "stated", "x"],
        ["train", "--model", "tiny"],
        ["export", "--model", "tiny"],
    ):
        user_error(fedpal(*args, "--home", str(a_file)), "is a file")
    assert a_file.read_text() == "hello"

    if os.geteuid() == 0:  # root ignores permission bits: use a place no one can create files in
        locked = Path("/proc/fedpal-home-that-cannot-be")
    else:
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o500)
        locked = parent / "home"
    user_error(fedpal("memory", "add", "stated", "x", "--home", str(locked)))
    user_error(fedpal("memory", "import", str(prefs), "--home", str(locked)))
    assert not locked.exists()


def test_3_server_status_on_a_bad_or_partial_metrics_file(tmp_path):
    good = {
        "round": 1,
        "aggregated": True,
        "clients_summed": 3,
        "epsilon": 1.25,
        "seconds": 2.0,
        "bytes_up_per_client": 1000.0,
        "bytes_down_per_client": 2000.0,
    }
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(good) + '\n{"round": 2, "aggreg')  # the server died mid-line
    partial = ok(fedpal("server", "status", str(tmp_path)))
    assert partial.stdout.startswith("round 1: ok; 3 clients, epsilon 1.250") and "incomplete" in partial.stderr
    status = json.loads(ok(fedpal("server", "status", str(tmp_path), "--json")).stdout)
    assert status["rounds"] == [good] and status["partial_last_line"] is True
    for text, needle in (
        ("garbage\n" + json.dumps(good) + "\n", "metrics.jsonl:1: not a JSON line"),
        ('{"round": 1}\n', "missing 'epsilon'"),
        ("7\n", "expected a JSON object"),
        (json.dumps({**good, "seconds": "fast"}) + "\n", "'seconds' has the wrong type"),
    ):
        metrics.write_text(text)
        user_error(fedpal("server", "status", str(tmp_path)), needle)
    user_error(fedpal("server", "status", str(metrics)), "is a file")


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"styles": "plain"}', "must be a list of names"),
        ('{"styles": 3}', "must be a list of names"),
        ('{"styles": ["plain", "shouting"]}', "unknown style 'shouting'"),
        ("42", "must hold an object of settings"),
        ('{"strategy": "fedmagic"}', "strategy must be one of"),
    ],
)
def test_3_and_7_simulate_config_errors_come_before_anything_is_written(tmp_path, content, needle):
    config = tmp_path / "config.json"
    config.write_text(content)
    out = tmp_path / "out"
    user_error(fedpal("simulate", "--out", str(out), "--config", str(config)), needle)
    assert not out.exists()


# ------------------------------------------------------------------ 4. homes are created only on purpose


def test_4_a_mistyped_home_creates_nothing(built, tmp_path):
    typo = tmp_path / "fedpal-mee"
    bad = write_jsonl(tmp_path / "bad.jsonl", [STATED, {"kind": "pair", "prompt": "p"}])
    user_error(fedpal("train", "--home", str(typo), "--model", "tiny"), "no fedpal home", "memory add")
    user_error(fedpal("memory", "import", str(bad), "--home", str(typo)), "bad.jsonl:2")
    user_error(fedpal("generate", "--home", str(typo), "--prompt", "hi"), "no fedpal home")
    user_error(fedpal("memory", "add", "pair", "p", "only chosen", "--home", str(typo)), "PROMPT CHOSEN REJECTED")
    user_error(fedpal("memory", "add", "stated", "x", "--home", str(typo), passphrase=None), "needs a passphrase")
    user_error(fedpal("memory", "list", "--home", str(typo)), "no fedpal home")
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(fedpal("export", "--home", str(empty), "--model", "tiny"), "is not a fedpal home")
    assert list(empty.iterdir()) == []
    for command in (["memory", "list"], ["generate", "--prompt", "hi"], ["train"], ["memory", "add", "stated", "x"]):
        user_error(fedpal(*command, "--home", ""), "--home is empty")
    assert not (Path.cwd() / "memory.sqlite").exists()
    made = fedpal("memory", "add", "stated", "a new home on purpose", "--home", str(typo))
    assert ok(made).stderr.startswith("note: created a new fedpal home at") and (typo / "memory.sqlite").is_file()


# ------------------------------------------------------------------ 6. hints that work


def test_6_hints_name_the_home_and_no_python_api(built, tmp_path):
    home = built["home"]
    before = snapshot(home)
    # A model folder named by path, with an empty export cache: its export surely does not exist yet.
    tiny = json.loads(ok(fedpal("model", "prepare", "--model", "tiny", "--json")).stdout)["path"]
    cache = {"FEDPAL_HOME": str(tmp_path / "cache")}
    asked = ["generate", "--home", str(home), "--prompt", "hi", "--model", tiny, "--max-new-tokens", "2"]
    hint = user_error(fedpal(*asked, env=cache), "run: fedpal export")
    command = re.search(r"run: fedpal (export .*)$", hint)[1].split()
    assert command[:3] == ["export", "--home", str(home)]
    assert snapshot(home) == before
    ok(fedpal(*command, env=cache))  # the hint runs as printed
    ok(fedpal(*asked, env=cache))
    ok(fedpal("export", "--home", str(home), "--model", "tiny", "--precision", "fp32"))  # back to the fixture's export
    nopass = user_error(fedpal("memory", "list", "--home", str(home), passphrase=None), "--passphrase-file")
    assert "use_keyring" not in nopass
    empty = built["root"] / "stated-only"
    ok(fedpal("memory", "add", "stated", "short please", "--home", str(empty)))
    nopairs = user_error(fedpal("train", "--home", str(empty), "--model", "tiny"), "fedpal memory add pair")
    assert "PreferenceMemory" not in nopairs and "add_pair" not in nopairs


# ------------------------------------------------------------------ 7. choices checked before any work


def test_7_options_and_passphrase_are_checked_before_the_model_loads(built):
    home = built["home"]
    before = snapshot(home)
    prompt = ["generate", "--home", str(home), "--prompt", "hi"]
    user_error(fedpal(*prompt, "--mode", "blend"), "'blend' is not one of", "fedpal generate --help")
    user_error(fedpal(*prompt, "--retrieval-in", "footer"), "'footer' is not one of")
    user_error(fedpal(*prompt, "--sample", "--temperature", "0"), "temperature must be positive")
    user_error(fedpal(*prompt, "--sample", "--top-p", "1.5"), "top-p must be in (0, 1]")
    user_error(fedpal(*prompt, "--max-new-tokens", "600"), "does not fit the model's context of 512")
    user_error(fedpal(*prompt, "--retrieval", passphrase="not the passphrase"), "wrong passphrase")
    user_error(fedpal(*prompt, "--w-base", "0.5"), "--w-base only applies to --mode fusion")
    user_error(fedpal("chat", "--home", str(home), "--mode", "blend"), "'blend' is not one of")
    user_error(fedpal("train", "--home", str(home), "--model", "tiny", "--objective", "ppo"), "'ppo' is not one of")
    assert snapshot(home) == before


# ------------------------------------------------------------------ 8. no silent overwrite, no silent adapter


def test_8_memory_export_never_overwrites_or_writes_a_folder_by_accident(built, tmp_path):
    home = built["home"]
    existing = tmp_path / "backup.jsonl"
    existing.write_text("keep me\n")
    user_error(fedpal("memory", "export", str(existing), "--home", str(home)), "exists; add --force")
    assert existing.read_text() == "keep me\n"
    folder = tmp_path / "dir"
    folder.mkdir()
    user_error(fedpal("memory", "export", f"{folder}/", "--home", str(home)), "is a folder")
    user_error(fedpal("memory", "export", str(tmp_path / "new-dir") + "/", "--home", str(home)), "is a folder")
    assert list(folder.iterdir()) == [] and not (tmp_path / "new-dir").exists()
    done = json.loads(ok(fedpal("memory", "export", str(existing), "--home", str(home), "--force", "--json")).stdout)
    assert done["exported"] == 8 and len(existing.read_text().splitlines()) == 8


def test_8_a_weight_for_a_missing_adapter_is_refused_and_json_names_the_adapters(built):
    home = built["home"]
    for mode in ("merge", "fusion"):
        user_error(
            fedpal("generate", "--home", str(home), "--prompt", "hi", "--mode", mode, "--w-shared", "0.5"),
            "has none",
            "--adapter shared",
        )
    fused = json.loads(
        ok(
            fedpal(
                "generate",
                "--home",
                str(home),
                "--prompt",
                "hi",
                "--mode",
                "fusion",
                "--w-base",
                "0.5",
                "--max-new-tokens",
                "3",
                "--json",
            )
        ).stdout
    )
    assert fused["mode"] == "fusion" and fused["adapters"] == {"base": 0.5, "personal": 1.0}
    base = json.loads(
        ok(
            fedpal(
                "generate", "--home", str(home), "--prompt", "hi", "--mode", "base", "--max-new-tokens", "3", "--json"
            )
        ).stdout
    )
    assert base["adapters"] == {}


# ------------------------------------------------------------------ 9. smaller ones


def test_9_memory_edge_cases(built, tmp_path):
    home = tmp_path / "nine"
    added = json.loads(ok(fedpal("memory", "add", "stated", "keep it short", "--home", str(home), "--json")).stdout)
    assert added["created_home"] and added["created_memory"] and added["kind"] == "stated"
    before = snapshot(home)
    user_error(
        fedpal("memory", "forget", "no-such-id", added["id"], "--home", str(home)), "no record with id no-such-id"
    )
    user_error(fedpal("memory", "add", "stated", "   ", "--home", str(home)), "stated preference is empty")
    user_error(fedpal("memory", "add", "pair", "p", "same", "same", "--home", str(home)), "two different")
    user_error(fedpal("memory", "add", "edit", "p", "same", "same", "--home", str(home)), "nothing was corrected")
    same = write_jsonl(
        tmp_path / "same.jsonl", [STATED, {"kind": "pair", "prompt": "p", "chosen": "a", "rejected": "a"}]
    )
    user_error(fedpal("memory", "import", str(same), "--home", str(home)), "same.jsonl:2")
    assert snapshot(home) == before

    bom = write_jsonl(tmp_path / "bom.jsonl", [STATED, *PAIRS[:2]], bom=True)
    first = json.loads(ok(fedpal("memory", "import", str(bom), "--home", str(home), "--json")).stdout)
    assert first["added"] == 3 and first["skipped_duplicates"] == 0 and not first["created_memory"]
    backup = tmp_path / "backup.jsonl"
    ok(fedpal("memory", "export", str(backup), "--home", str(home)))
    again = ok(fedpal("memory", "import", str(backup), "--home", str(home)))
    assert "imported 0 record(s)" in again.stdout and "4 already there (same id) were skipped" in again.stdout
    forgotten = json.loads(ok(fedpal("memory", "forget", added["id"], "--home", str(home), "--json")).stdout)
    assert forgotten == {"forgotten": 1, "key_destroyed": False}
    restored = ok(fedpal("memory", "import", str(backup), "--home", str(home)))
    assert "imported 1 record(s)" in restored.stdout and "any you had forgotten here are back" in restored.stdout
    assert json.loads(ok(fedpal("memory", "verify", "--home", str(home), "--json")).stdout) == {
        "records": 4,
        "corrupt": [],
    }


def test_9_train_rank_and_quiet_json(built):
    home = built["home"]
    before = snapshot(home)
    user_error(
        fedpal("train", "--home", str(home), "--model", "tiny", "--rank", "4"), "--rank 4 cannot apply", "rank 8"
    )
    assert snapshot(home) == before
    trained = built["trained"]
    assert "FutureWarning" not in trained.stderr and "Traceback" not in trained.stderr
    assert json.loads(trained.stdout.splitlines()[-1])["activated"]


def test_9_max_new_tokens_is_not_capped_silently(built):
    result = ok(fedpal("generate", "--home", str(built["home"]), "--prompt", "hi", "--max-new-tokens", "505", "--json"))
    reply = json.loads(result.stdout)
    if reply["tokens"] < 505:  # the random tiny model ran into its 512-token context: it must say so
        assert "stopped at the model's context of 512 tokens" in result.stderr


def test_9_chat_pick_and_lost_ratings(built):
    home = built["home"]
    chat = ["chat", "--home", str(home), "--max-new-tokens", "4"]
    picked = ok(fedpal(*chat, input="hello there\n/pick\nsecond question\n/quit\n"))
    assert "pick skipped" in picked.stdout and picked.stdout.count("bot> ") == 2  # the next line was not swallowed
    before = snapshot(home)
    lost = fedpal(*chat, passphrase=None, input="hello there\n/rate 5\n/quit\n")
    assert lost.returncode == 2 and "Traceback" not in lost.stderr
    assert lost.stderr.strip().splitlines()[-1].startswith("error: 1 rating(s) or pick(s) were not saved")
    assert snapshot(home) == before


# ------------------------------------------------------------------ comforts


def test_comforts_home_from_the_environment_passphrase_from_a_file_counts(built, tmp_path):
    home = built["home"]
    secret = tmp_path / "secret"
    secret.write_text(PASSPHRASE + "\n")
    env = {"FEDPAL_USER_HOME": str(home)}
    listed = ok(fedpal("memory", "list", "--passphrase-file", str(secret), passphrase=None, env=env))
    assert listed.stdout.splitlines()[-1] == "8 record(s)"
    piped = ok(
        fedpal(
            "memory",
            "list",
            "--kind",
            "stated",
            "--passphrase-file",
            "-",
            passphrase=None,
            env=env,
            input=PASSPHRASE + "\n",
        )
    )
    assert piped.stdout.splitlines()[-1] == "2 stated record(s)"
    user_error(
        fedpal("memory", "list", "--passphrase-file", str(tmp_path / "missing"), passphrase=None, env=env),
        "cannot read the passphrase file",
    )
    empty = tmp_path / "empty-memory"
    only = ok(fedpal("memory", "add", "stated", "one", "--home", str(empty))).stdout.strip()
    ok(fedpal("memory", "forget", only, "--home", str(empty)))
    assert ok(fedpal("memory", "list", "--home", str(empty))).stdout.strip() == "the memory is empty"
    prepared = json.loads(ok(fedpal("model", "prepare", "--model", "tiny", "--json")).stdout)
    assert prepared["model"] == "tiny" and Path(prepared["path"], "config.json").is_file()


def test_comforts_encrypted_backup_and_restore_of_a_home(built, tmp_path):
    home = built["home"]
    backup = tmp_path / "me.backup"
    made = json.loads(ok(fedpal("backup", str(backup), "--home", str(home), "--json")).stdout)
    assert made["memory"] and made["files"] >= 4 and backup.stat().st_mode & 0o777 == 0o600
    sealed = backup.read_bytes()
    assert b"adapter_config" not in sealed and b"I like short answers" not in sealed  # nothing readable inside
    user_error(fedpal("backup", str(backup), "--home", str(home)), "exists; add --force")
    assert backup.read_bytes() == sealed

    wrong = tmp_path / "wrong"
    user_error(fedpal("restore", str(backup), "--home", str(wrong), passphrase="not it"), "wrong passphrase")
    user_error(fedpal("restore", str(backup), "--home", str(home)), "never over one")
    damaged = tmp_path / "damaged.backup"
    damaged.write_bytes(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    user_error(fedpal("restore", str(damaged), "--home", str(wrong)), "damaged")
    assert not wrong.exists() and not [p for p in tmp_path.iterdir() if "restore" in p.name]

    copy = tmp_path / "restored"
    ok(fedpal("restore", str(backup), "--home", str(copy)))
    listed = [ok(fedpal("memory", "list", "--home", str(h), "--json")).stdout for h in (home, copy)]
    assert listed[0] == listed[1]
    for name in ("adapters/personal/adapter_model.safetensors", "runtime/export.json"):
        assert (copy / name).read_bytes() == (home / name).read_bytes()
    assert json.loads(
        ok(fedpal("generate", "--home", str(copy), "--prompt", "hi", "--max-new-tokens", "2", "--json")).stdout
    )["adapters"] == {"personal": 1.0}
