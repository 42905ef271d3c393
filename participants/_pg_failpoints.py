"""Named failpoints of the PostgreSQL backend, for the crash tests only (the
coordinator's are :mod:`accord.coordinator._failpoints`).

Enabled through the environment:
``ACCORD_PARTICIPANT_FAILPOINTS="after_pg_prepare=crash"`` (comma-separated
``name=action``); the only action is ``crash``: SIGKILL this process on the spot. An
unknown name or action is an error at start (a misspelt failpoint would never fire);
unset, a check costs one truth test.

- ``after_pg_prepare``: Prepare, right after ``PREPARE TRANSACTION`` returned (the branch
  is durable in PostgreSQL), before the yes vote is answered;
- ``before_commit_prepared``: Commit, before ``COMMIT PREPARED`` is sent;
- ``after_commit_prepared``: Commit, right after ``COMMIT PREPARED`` returned, before
  the outcome is recorded and answered.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

ENV_VAR = "ACCORD_PARTICIPANT_FAILPOINTS"
AFTER_PG_PREPARE = "after_pg_prepare"
BEFORE_COMMIT_PREPARED = "before_commit_prepared"
AFTER_COMMIT_PREPARED = "after_commit_prepared"
NAMES = (AFTER_PG_PREPARE, BEFORE_COMMIT_PREPARED, AFTER_COMMIT_PREPARED)


def parse(raw: str) -> frozenset[str]:
    """``name=crash,...`` -> the armed names; ValueError names what is wrong."""
    armed: set[str] = set()
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, action = item.partition("=")
        if name.strip() not in NAMES:
            raise ValueError(f"{ENV_VAR}: unknown failpoint {name!r} (known: {', '.join(NAMES)})")
        if action.strip() != "crash":
            raise ValueError(f"{ENV_VAR}: {name}: the only action is crash, got {action!r}")
        armed.add(name.strip())
    return frozenset(armed)


_armed: frozenset[str] | None = None


def arm(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Reads the environment once (at the backend's start, so a bad value stops it)."""
    global _armed
    _armed = parse((os.environ if environ is None else environ).get(ENV_VAR, ""))
    return _armed


def check(name: str) -> None:
    """SIGKILLs this process if ``name`` is armed."""
    armed = _armed if _armed is not None else arm()
    if armed and name in armed:
        os.kill(os.getpid(), signal.SIGKILL)
