"""The PostgreSQL backend's crash-test failpoints: names checked, crash the only action."""

from __future__ import annotations

import pytest

from accord.participants import _pg_failpoints as failpoints


def test_parse() -> None:
    assert failpoints.parse("") == frozenset()
    assert failpoints.parse(" after_pg_prepare=crash , after_commit_prepared=crash") == {
        "after_pg_prepare",
        "after_commit_prepared",
    }
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.parse("after_pg_prepar=crash")
    with pytest.raises(ValueError, match="only action is crash"):
        failpoints.parse("after_pg_prepare=sleep:10")


def test_unarmed_check_does_nothing() -> None:
    assert failpoints.arm({}) == frozenset()
    failpoints.check(failpoints.AFTER_PG_PREPARE)  # still alive
