"""The participant conformance kit (``accord conformance``) against real participants:
the SDK's bank on SQLite and on PostgreSQL pass it (twice in a row: each run uses its
own gids and keys), and a participant broken on purpose in each of several ways
(tests/integration/_broken_participant.py) fails on the rules that name its defect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from accord.tools.topology import ManagedProcess
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def conformance(address: str, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accord.tools.cli",
            "conformance",
            "--participant",
            address,
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def failed(report: dict[str, Any]) -> set[str]:
    return {r["name"] for r in report["rules"] if not r["passed"] and not r["skipped"]}


def assert_conforms(address: str, *, stream: bool) -> None:
    for _ in range(2):  # repeatable against the same participant
        code, report = conformance(address, "--service", "accord.v1.Participant")
        assert failed(report) == set(), json.dumps(report, indent=1)
        assert code == 0 and report["passed"]
        rules = {r["name"]: r for r in report["rules"]}
        assert rules["stream"]["required"] is False
        assert rules["stream"]["passed"] is stream and rules["stream"]["skipped"] is not stream
        assert all(r["evidence"] for name, r in rules.items() if name != "result-codes")


def test_the_sqlite_bank_conforms(cluster: Cluster) -> None:
    bank = cluster.bank("bank")
    assert_conforms(bank.address, stream=True)
    text = subprocess.run(
        [sys.executable, "-m", "accord.tools.cli", "conformance", "--participant", bank.address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert text.returncode == 0, text.stdout + text.stderr
    assert "CONFORMS" in text.stdout and "fencing" in text.stdout


def test_the_postgres_bank_conforms(cluster: Cluster, pg_url: str) -> None:
    bank = cluster.topology.bank("pgbank", db=pg_url, log_level="warning")
    assert_conforms(bank.address, stream=True)


def broken(*defects: str) -> ManagedProcess:
    argv = [sys.executable, "-m", "tests.integration._broken_participant"]
    for d in defects:
        argv += ["--defect", d]
    return ManagedProcess(f"broken-{'-'.join(defects) or 'none'}", argv, cwd=ROOT).start()


def test_a_correct_participant_without_stream_conforms() -> None:
    proc = broken()
    try:
        assert_conforms(proc.address, stream=False)
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("defect", "rules"),
    [
        (
            "no-barrier",
            {
                "duplicate.prepare-commit",
                "duplicate.execute-compensate",
                "abort-before-prepare",
                "compensate-before-execute",
            },
        ),
        ("ignores-epochs", {"fencing"}),
        (
            "wrong-codes",
            {
                "2pc.no-abort",
                "2pc.one-phase",
                "duplicate.prepare-commit",
                "duplicate.execute-compensate",
                "abort-before-prepare",
                "compensate-before-execute",
                "result-codes",
            },
        ),
        (
            "refusal-ok",
            {
                "2pc.no-abort",
                "2pc.one-phase",
                "duplicate.prepare-commit",
                "duplicate.execute-compensate",
                "abort-before-prepare",
                "compensate-before-execute",
            },
        ),
    ],
)
def test_a_broken_participant_fails_on_its_defect(defect: str, rules: set[str]) -> None:
    proc = broken(defect)
    try:
        code, report = conformance(proc.address)
    finally:
        proc.stop()
    assert code == 1 and not report["passed"]
    assert failed(report) == rules, json.dumps(report, indent=1)
    for r in report["rules"]:
        if r["name"] in rules:
            assert r["failures"] and r["evidence"], r


def test_an_unreachable_participant_is_exit_1_a_bad_address_exit_2() -> None:
    from accord.tools.topology import free_port

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accord.tools.cli",
            "conformance",
            "--participant",
            f"127.0.0.1:{free_port()}",
            "--connect-timeout-s",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "not reachable" in proc.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "accord.tools.cli", "conformance", "--participant", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert usage.returncode == 2, usage.stderr
