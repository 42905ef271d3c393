"""The tools on PostgreSQL banks (issue 13): ``accord demo --postgres`` and ``accord chaos
--participant-db postgres``, each starting its own PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def accord(*args: str, timeout_s: float) -> dict[str, object]:
    """Runs ``accord ARGS --json`` in its own process group: if it does not finish in
    time, it and every process it started (PostgreSQL's included) are SIGKILLed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "accord.tools.cli", *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"not done in {timeout_s}s:\n{stdout[-3000:]}{stderr[-3000:]}"
        ) from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    out: dict[str, object] = json.loads(stdout)
    return out


def test_demo_on_postgres() -> None:
    s = accord("demo", "--postgres", "--transfers", "60", "--concurrency", "8", timeout_s=120)
    assert s["backend"] == "postgresql"
    assert all(str(url).startswith("postgresql://") for url in s["databases"].values())  # type: ignore[attr-defined]
    assert s["committed"] + s["aborted"] == 60  # type: ignore[operator]
    assert s["committed"] > 0 and s["aborted"] > 0  # type: ignore[operator]
    assert s["total_before"] == s["total_after"] > 0  # type: ignore[operator]
    assert s["errors"] == []
    assert all(b["prepared_branches"] == 0 for b in s["banks"].values())  # type: ignore[attr-defined]


@pytest.mark.timeout(300)
def test_chaos_on_postgres_finds_no_violation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = accord(
        "chaos",
        "--participant-db",
        "postgres",
        *("--duration", "10", "--seed", "3", "--fault-every", "3"),
        *("--coordinators", "1", "--participants", "3"),
        *("--faults", "kill-coordinator,kill-participant"),
        *("--out", str(out)),
        timeout_s=240,
    )
    assert r["violations"] == []
    assert r["settings"]["participant_db"] == "postgres"  # type: ignore[index]
    assert r["transactions"] > 100 and r["ok"] > 0  # type: ignore[operator]
    assert r["coordinator_kills"] + r["participant_kills"] >= 1  # type: ignore[operator]
    # The checker read what the PostgreSQL banks hold (saved as SQLite snapshots).
    check = json.loads((out / "check.json").read_text())
    assert check["stats"]["audit_rows"] > 0 and check["stats"]["ledger_entries"] > 0
    assert sorted(p.name for p in (out / "final").iterdir()) == [
        "bank-1.db",
        "bank-2.db",
        "bank-3.db",
    ]
