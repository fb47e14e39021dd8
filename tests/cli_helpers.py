"""Running ``fedpal`` as a user does, for the CLI contract tests: a real subprocess with a clean environment."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

PASSPHRASE = "cli contract passphrase"
_OWN_VARS = ("FEDPAL_PASSPHRASE", "FEDPAL_PASSPHRASE_FILE", "FEDPAL_USER_HOME")


def fedpal(
    *args: str,
    passphrase: str | None = PASSPHRASE,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """``fedpal ARGS`` in a fresh process: no terminal on stdin, wide output (rich does not wrap help)."""
    environment = {k: v for k, v in os.environ.items() if k not in _OWN_VARS}
    environment["COLUMNS"] = "250"
    if passphrase is not None:
        environment["FEDPAL_PASSPHRASE"] = passphrase
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fedpal.common.cli", *args],
        env=environment,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert the contract for a mistake a user can fix: exit 2, one ``error:`` line on stderr, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def no_traceback(result: subprocess.CompletedProcess) -> None:
    """Whatever the input: success, or the contract's one ``error:`` line (after any warnings and notes)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode in (0, 2), (result.returncode, result.stderr[-3000:])
    if result.returncode == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
        assert all(line.startswith(("error: ", "warning: ", "note: ")) for line in lines), result.stderr[-3000:]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    return result


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a digest of its bytes (SQLite's shared-memory index, rewritten
    by any reader, and an empty write-ahead log are left out: they hold no data)."""
    if not folder.exists():
        return {}
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir() or path.name.endswith("-shm") or (path.name.endswith("-wal") and path.stat().st_size == 0):
            continue
        state[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state
