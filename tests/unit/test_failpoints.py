"""Failpoints: only known names, so a misspelt one fails at start-up instead of never
firing."""

from __future__ import annotations

import pytest

from accord.coordinator import CoordinatorServer, ServerSettings
from accord.coordinator._failpoints import Failpoint, FailpointError, Failpoints


def test_every_failpoint_name_parses() -> None:
    spec = ",".join(f"{f.value}=error" for f in Failpoint)
    fps = Failpoints.from_env({"ACCORD_FAILPOINTS": spec})
    assert fps.armed
    with pytest.raises(FailpointError, match="wal_fsync"):
        fps.check(Failpoint.WAL_FSYNC)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("after_decison_fsync=crash", "unknown failpoint 'after_decison_fsync'"),
        ("before_prepare=explode", "unknown action 'explode'"),
        ("before_prepare=sleep:soon", "whole number"),
        ("before_prepare", "expected name=action"),
    ],
)
def test_a_bad_failpoint_spec_is_an_error_at_start(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Failpoints.from_env({"ACCORD_FAILPOINTS": raw})


def test_a_failpoint_set_in_code_must_exist_too() -> None:
    with pytest.raises(ValueError, match="unknown failpoint 'wal_fsnyc'"):
        Failpoints({"wal_fsnyc": "error"})


def test_the_coordinator_refuses_to_start_with_an_unknown_failpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACCORD_FAILPOINTS", "mid_comit=crash")
    with pytest.raises(ValueError, match="unknown failpoint 'mid_comit'"):
        CoordinatorServer(ServerSettings())


async def test_unarmed_checks_do_nothing() -> None:
    fps = Failpoints()
    assert not fps.armed
    fps.check(Failpoint.WAL_FSYNC)
    await fps.acheck(Failpoint.BEFORE_PREPARE)
