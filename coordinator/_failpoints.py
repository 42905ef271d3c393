"""Named failpoints, so a crash test reads like the protocol.

Enabled only through the environment: ``ACCORD_FAILPOINTS="after_decision_fsync=crash"``
(comma-separated ``name=action`` pairs); the names are :class:`Failpoint`'s, and an
unknown one is an error at start-up (a misspelt failpoint would otherwise never fire).
Actions:

- ``crash``: SIGKILL this process on the spot (no cleanup, no flush: as a real crash);
- ``error``: raise :class:`FailpointError` (the caller decides what an error means
  there, e.g. a failed ``fdatasync``);
- ``sleep:MS``: pause the calling task for MS milliseconds;
- ``crash-after:N``: pass N times, then crash.

With the variable unset a check costs one truth test.
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
from collections.abc import Mapping

ENV_VAR = "ACCORD_FAILPOINTS"


class Failpoint(enum.StrEnum):
    """Every failpoint there is, named after the protocol step it sits at."""

    # 2PC (coordinator/_twopc.py)
    BEFORE_PREPARE = "before_prepare"
    AFTER_PREPARE_VOTES = "after_prepare_votes"
    BEFORE_DECISION = "before_decision"
    AFTER_DECISION_FSYNC = "after_decision_fsync"
    BEFORE_COMMIT_SEND = "before_commit_send"
    MID_COMMIT = "mid_commit"
    BEFORE_END_RECORD = "before_end_record"
    # Sagas (coordinator/_saga.py)
    BEFORE_STEP_SEND = "before_step_send"
    AFTER_STEP_RESULT = "after_step_result"
    MID_COMPENSATION = "mid_compensation"
    # The WAL (coordinator/wal/_segment.py)
    WAL_BEFORE_WRITE = "wal_before_write"
    WAL_FSYNC = "wal_fsync"

    __hash__ = str.__hash__


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is ``error``."""


class Failpoints:
    """A set of armed failpoints; inject one per process (``Failpoints.from_env()``)."""

    def __init__(self, spec: Mapping[str, str] | None = None) -> None:
        """``spec``: failpoint name -> action; ValueError for an unknown name or action."""
        self._spec: dict[Failpoint, str] = {
            _failpoint(name): _action(name, action) for name, action in (spec or {}).items()
        }
        self._hits: dict[Failpoint, int] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Failpoints:
        raw = (environ if environ is not None else os.environ).get(ENV_VAR, "")
        return cls(parse(raw))

    @property
    def armed(self) -> bool:
        return bool(self._spec)

    def check(self, name: Failpoint) -> None:
        """Synchronous failpoint: ``crash`` and ``error`` only (``sleep`` is ignored)."""
        if not self._spec:
            return
        action = self._spec.get(name)
        if action is not None:
            self._fire(name, action)

    async def acheck(self, name: Failpoint) -> None:
        """Failpoint in async code: supports ``sleep:MS`` as well."""
        if not self._spec:
            return
        action = self._spec.get(name)
        if action is None:
            return
        if action.startswith("sleep:"):
            await asyncio.sleep(int(action.split(":", 1)[1]) / 1000)
            return
        self._fire(name, action)

    def _fire(self, name: Failpoint, action: str) -> None:
        if action.startswith("crash-after:"):
            hits = self._hits.get(name, 0)
            self._hits[name] = hits + 1
            if hits < int(action.split(":", 1)[1]):
                return
            action = "crash"
        if action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "error":
            raise FailpointError(f"failpoint {name}: injected error")


def parse(raw: str) -> dict[str, str]:
    """``name=action,...`` -> {name: action}; ValueError names what is wrong."""
    spec: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, action = item.partition("=")
        if not sep or not name or not action:
            raise ValueError(f"{ENV_VAR}: expected name=action, got {item!r}")
        name = _failpoint(name.strip())
        spec[name] = _action(name, action.strip())
    return spec


def _failpoint(name: str) -> Failpoint:
    try:
        return Failpoint(name)
    except ValueError:
        known = ", ".join(f.value for f in Failpoint)
        raise ValueError(f"{ENV_VAR}: unknown failpoint {name!r} (known: {known})") from None


def _action(name: str, action: str) -> str:
    if action in ("crash", "error"):
        return action
    for prefix in ("sleep:", "crash-after:"):
        if action.startswith(prefix):
            if not action[len(prefix) :].isdigit():
                raise ValueError(f"{ENV_VAR}: {action!r} for {name} needs a whole number")
            return action
    raise ValueError(f"{ENV_VAR}: unknown action {action!r} for {name}")
