"""``fedpal memory`` as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

FEDPAL = shutil.which("fedpal")
pytestmark = pytest.mark.skipif(FEDPAL is None, reason="the fedpal command is not installed")


def fedpal(*args: str, passphrase: str | None = "cli passphrase") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEDPAL_PASSPHRASE"}
    if passphrase is not None:
        env["FEDPAL_PASSPHRASE"] = passphrase
    return subprocess.run(
        [FEDPAL, "memory", *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def home(tmp_path: Path) -> str:
    return str(tmp_path / "home")


def test_add_list_search_export_import(home: str, tmp_path: Path):
    added = fedpal("add", "stated", "Keep answers short", "--tag", "style", "--home", home)
    assert added.returncode == 0, added.stderr
    stated_id = added.stdout.strip()
    assert fedpal("add", "pair", "What is BM25?", "A ranking function.", "A vitamin.", "--home", home).returncode == 0
    assert fedpal("add", "rating", "Joke?", "A pun", "5", "--home", home).returncode == 0

    listed = json.loads(fedpal("list", "--home", home, "--json").stdout)
    assert [r["kind"] for r in listed] == ["stated", "pair", "rating"]
    assert listed[0] == {
        "kind": "stated",
        "text": "Keep answers short",
        "tags": ["style"],
        "id": stated_id,
        "created": listed[0]["created"],
    }
    found = json.loads(fedpal("search", "explain bm25 ranking", "--home", home, "--json").stdout)
    assert [r["kind"] for r in found] == ["stated", "pair"]
    text = fedpal("list", "--home", home, "--kind", "pair")
    assert text.returncode == 0 and "What is BM25? => A ranking function." in text.stdout

    out = tmp_path / "backup.jsonl"
    assert fedpal("export", str(out), "--home", home).stdout.startswith("exported 3 record(s)")
    other = str(tmp_path / "other")
    imported = fedpal("import", str(out), "--home", other, passphrase="another one")
    assert imported.returncode == 0 and "imported 3 record(s)" in imported.stdout
    assert json.loads(fedpal("list", "--home", other, "--json", passphrase="another one").stdout) == listed


def test_bad_input_is_one_line_and_exit_2(home: str, tmp_path: Path):
    one_line_error(fedpal("list", "--home", home), "no fedpal home")
    assert not Path(home, "memory.sqlite").exists()
    one_line_error(fedpal("add", "rating", "p", "r", "9", "--home", home), "1 to 5")
    one_line_error(fedpal("add", "pair", "p", "c", "--home", home), "PROMPT CHOSEN REJECTED")
    one_line_error(fedpal("add", "opinion", "x", "--home", home), "'opinion' is not one of")
    assert fedpal("add", "stated", "first", "--home", home).returncode == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind":"stated","text":"ok"}\n{"kind":"pair","prompt":"p"}\n', encoding="utf-8")
    one_line_error(fedpal("import", str(bad), "--home", home), "bad.jsonl:2:", "needs 'chosen'")
    one_line_error(fedpal("import", str(tmp_path / "missing.jsonl"), "--home", home), "no such file")
    one_line_error(fedpal("forget", "--home", home, "--since", "last tuesday"), "--since")
    one_line_error(fedpal("forget", "--home", home), "say what to forget")
    one_line_error(fedpal("forget", "--home", home, "--all"), "--yes")
    assert [r["text"] for r in json.loads(fedpal("list", "--home", home, "--json").stdout)] == ["first"]


def test_passphrase_errors_leave_the_file_alone(home: str):
    assert fedpal("add", "stated", "private", "--home", home).returncode == 0
    db = Path(home, "memory.sqlite")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    one_line_error(fedpal("list", "--home", home, passphrase="wrong"), "wrong passphrase")
    one_line_error(fedpal("add", "stated", "more", "--home", home, passphrase="wrong"), "wrong passphrase")
    one_line_error(fedpal("list", "--home", home, passphrase=None), "FEDPAL_PASSPHRASE")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_forget_and_tampering_from_the_shell(home: str):
    ids = [
        fedpal("add", "stated", f"pref {i}", "--tag", "even" if i % 2 == 0 else "odd", "--home", home).stdout.strip()
        for i in range(4)
    ]
    with sqlite3.connect(Path(home, "memory.sqlite")) as conn:
        conn.execute("UPDATE records SET sealed = substr(sealed, 1, 20) WHERE id = ?", (ids[3],))
    listed = fedpal("list", "--home", home, "--json")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 3
    assert listed.stderr.startswith("warning: ") and ids[3] in listed.stderr
    one_line_error(fedpal("verify", "--home", home), ids[3])
    one_line_error(fedpal("export", "-", "--home", home), ids[3])
    assert len(fedpal("export", "-", "--home", home, "--skip-corrupt").stdout.splitlines()) == 3

    assert fedpal("forget", ids[3], "--home", home).stdout.strip() == "forgot 1 record(s)"
    assert fedpal("forget", "--tag", "even", "--home", home).stdout.strip() == "forgot 2 record(s)"
    assert fedpal("verify", "--home", home).stdout.strip() == "all 1 record(s) verified"
    assert fedpal("forget", "--all", "--yes", "--home", home).returncode == 0
    assert json.loads(fedpal("list", "--home", home, "--json").stdout) == []
