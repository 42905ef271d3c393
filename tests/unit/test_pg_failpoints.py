"""The PostgreSQL backend's crash-test failpoints: names checked, crash the only action."""

from __future__ import annotations

import pytest

from accord.participants._pg_failpoints import PgFailpoint, PgFailpoints


def test_parse() -> None:
    assert PgFailpoints.parse("").armed == frozenset()
    assert PgFailpoints.parse(" after_pg_prepare=crash , after_commit_prepared=crash").armed == {
        PgFailpoint.AFTER_PG_PREPARE,
        PgFailpoint.AFTER_COMMIT_PREPARED,
    }
    with pytest.raises(ValueError, match="unknown failpoint"):
        PgFailpoints.parse("after_pg_prepar=crash")
    with pytest.raises(ValueError, match="only action is crash"):
        PgFailpoints.parse("after_pg_prepare=sleep:10")


def test_unarmed_check_does_nothing() -> None:
    points = PgFailpoints.from_env({})
    assert points.armed == frozenset()
    points.check(PgFailpoint.AFTER_PG_PREPARE)  # still alive
