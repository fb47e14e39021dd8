"""The ``fedpal`` command as a user runs it: a real subprocess, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpal.common.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "model" in result.stdout


def test_packages_import():
    code = "import fedpal.server, fedpal.client, fedpal.common, fedpal.simulations"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_smoke_on_tiny_prints_json():
    result = run("model", "smoke", "--model", "tiny", "--max-new-tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 <= reply["tokens"] <= 5
    assert reply["model"].endswith("tiny-seed0")


def test_unknown_model_is_one_line_and_nonzero(tmp_path):
    result = run("model", "smoke", "--model", str(tmp_path / "missing-model"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model ") and "not found" in lines[0]
