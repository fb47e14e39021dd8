"""``fedpal privacy audit --preset quick``, run once as a user runs it, backs these tests.

The quick preset runs three real federations (protection off, DP, DP + SecAgg+) with
canary clients and two budget-vs-utility runs on Flower's simulation engine with the
tiny model, and attacks each; a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpal.common.errors import FedpalError
from fedpal.simulations.privacy.config import PRESETS


@pytest.fixture(scope="module")
def audit(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("audit") / "quick"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpal.common.cli",
            "privacy",
            "audit",
            "--preset",
            "quick",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert json.loads(done.stdout) == results  # the progress bars went to stderr
    return results, out


def test_the_audit_writes_every_attack_for_every_setting(audit):
    results, out = audit
    settings = list(PRESETS["quick"].protections)
    assert results["settings"] == settings
    for key in ("mia", "mia_personal", "canary_exposure", "inversion", "epsilon", "audited_epsilon"):
        assert set(results[key]) == set(settings), key
    for name in settings:
        assert {"auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"} <= set(results["mia"][name])
        assert 0 <= results["mia"][name]["auc"] <= 1
        assert {"token_recall", "token_precision"} <= set(results["inversion"][name])
    assert [row["epsilon"] is None for row in results["budget_vs_utility"]] == [True, False]  # no DP; the dp run
    for name in ("report.md", "roc.png", "epsilon_vs_utility.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "audited epsilon" in report and "dp+secagg" in report


def test_the_audited_epsilon_stays_under_the_accountants_and_is_large_without_dp(audit):
    results, _ = audit
    for name in results["settings"]:
        audited, accountant = results["audited_epsilon"][name], results["epsilon"][name]
        if "dp" in name:
            assert accountant is not None and 0 <= audited <= accountant, (name, audited, accountant)
        else:
            assert accountant is None
            detail = results["details"][name]["audit"]
            # the canaries that joined stand out of an unprotected run, every one of them
            assert min(detail["scores_in"]) > max(detail["scores_out"]), detail
            assert audited >= 1.5, (name, audited)
    without = min(results["audited_epsilon"][n] for n in results["settings"] if "dp" not in n)
    assert all(results["audited_epsilon"][n] < without for n in results["settings"] if "dp" in n)


def test_no_memory_text_leaves_a_node_or_sits_in_plain_text_in_a_home(audit):
    results, _ = audit
    assert results["plaintext_leaks"] == 0
    for name in results["settings"]:
        leaks = results["details"][name]["leaks"]
        for where in ("messages", "homes"):
            assert leaks[where]["control_found"] and leaks[where]["files"] > 0 and leaks[where]["needles"] > 30
            assert leaks[where]["leaks"] == []


def test_dp_spends_what_the_accountant_says_and_secagg_changes_what_the_server_inverts(audit):
    results, _ = audit
    assert results["epsilon"]["dp"] == pytest.approx(results["epsilon"]["dp+secagg"])
    assert results["inversion"]["off"]["attacked"] == "user 0's update of round 1"
    assert results["inversion"]["dp+secagg"]["attacked"] == "the secure aggregate of round 1"
    sweep = {row["noise_multiplier"]: row["epsilon"] for row in results["budget_vs_utility"]}
    assert sweep == {0.0: None, PRESETS["quick"].noise_multiplier: results["epsilon"]["dp"]}


@pytest.mark.parametrize(
    "text, error",
    [
        ("canary_clients = -1\n", "canary_clients must not be negative, not -1"),
        ('sweep = "a"\n', "'sweep' must be a list of numbers, like [0.5, 2.0]"),
    ],
)
def test_a_bad_config_file_is_one_line_and_runs_nothing(tmp_path, text, error):
    config = tmp_path / "audit.toml"
    config.write_text(text)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "fedpal.common.cli", "privacy", "audit", "--config", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")
    assert done.stderr.strip().endswith(error)
    assert not out.exists()


def test_the_leak_scan_finds_memory_text_in_each_encoding_and_refuses_to_vouch_when_blind(tmp_path):
    from fedpal.simulations.privacy.leaks import ENCODINGS, scan, scan_with_control

    secret = "zebra-secret-chosen reply: short and friendly"
    for number, encoding in enumerate(ENCODINGS):
        (tmp_path / f"message-{number}.bin").write_bytes(b"\x08\x01" + secret.encode(encoding) + b"\x00\xff")
    (tmp_path / "clean.bin").write_bytes(b"\x00" * 4096)
    found = scan([tmp_path], [secret, "a text stored nowhere at all"])
    assert sorted(Path(leak.path).name for leak in found.leaks) == [f"message-{n}.bin" for n in range(len(ENCODINGS))]
    assert found.files == len(ENCODINGS) + 1

    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "adapter.bin").write_bytes(bytes(range(256)) * 64)
    result = scan_with_control([clean], [secret])
    assert result.control_found and result.leaks == () and result.files == 1
    assert sorted(path.name for path in clean.iterdir()) == ["adapter.bin"]  # the control is gone again
    with pytest.raises(FedpalError, match="needs texts to look for"):
        scan_with_control([clean], ["short"])  # too short to search for safely: nothing to vouch for
