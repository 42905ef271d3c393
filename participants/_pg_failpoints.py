"""Named failpoints of the PostgreSQL backend, for the crash tests only (the
coordinator's are :mod:`accord.coordinator._failpoints`).

Enabled through the environment:
``ACCORD_PARTICIPANT_FAILPOINTS="after_pg_prepare=crash"`` (comma-separated
``name=action``); the only action is ``crash``: SIGKILL this process on the spot. The
names are :class:`PgFailpoint`'s; an unknown name or action is an error when the backend
starts (a misspelt failpoint would never fire). Unset, a check costs one truth test.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Mapping

ENV_VAR = "ACCORD_PARTICIPANT_FAILPOINTS"


class PgFailpoint(enum.StrEnum):
    #: Prepare, right after ``PREPARE TRANSACTION`` returned (the branch is durable in
    #: PostgreSQL), before the yes vote is answered.
    AFTER_PG_PREPARE = "after_pg_prepare"
    #: Commit, before ``COMMIT PREPARED`` is sent.
    BEFORE_COMMIT_PREPARED = "before_commit_prepared"
    #: Commit, right after ``COMMIT PREPARED`` returned, before the outcome is recorded
    #: and answered.
    AFTER_COMMIT_PREPARED = "after_commit_prepared"

    __hash__ = str.__hash__


class PgFailpoints:
    """The armed failpoints of one backend (``PgFailpoints.from_env()`` at its start)."""

    def __init__(self, armed: frozenset[PgFailpoint] = frozenset()) -> None:
        self.armed = armed

    @classmethod
    def parse(cls, raw: str) -> PgFailpoints:
        """``name=crash,...``; ValueError naming what is wrong."""
        armed: set[PgFailpoint] = set()
        for item in raw.split(","):
            name, _, action = (part.strip() for part in item.partition("="))
            if not name:
                continue
            try:
                point = PgFailpoint(name)
            except ValueError:
                known = ", ".join(p.value for p in PgFailpoint)
                raise ValueError(
                    f"{ENV_VAR}: unknown failpoint {name!r} (known: {known})"
                ) from None
            if action != "crash":
                raise ValueError(f"{ENV_VAR}: {name}: the only action is crash, got {action!r}")
            armed.add(point)
        return cls(frozenset(armed))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PgFailpoints:
        return cls.parse((os.environ if environ is None else environ).get(ENV_VAR, ""))

    def check(self, point: PgFailpoint) -> None:
        """SIGKILLs this process if ``point`` is armed."""
        if self.armed and point in self.armed:
            os.kill(os.getpid(), signal.SIGKILL)
