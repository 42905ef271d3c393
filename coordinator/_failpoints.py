"""Named failpoints, so a crash test reads like the protocol.

Enabled only through the environment: ``ACCORD_FAILPOINTS="after_decision_fsync=crash"``
(comma-separated ``name=action`` pairs). Actions:

- ``crash``: SIGKILL this process on the spot (no cleanup, no flush: as a real crash);
- ``error``: raise :class:`FailpointError` (the caller decides what an error means
  there, e.g. a failed ``fdatasync``);
- ``sleep:MS``: pause the calling task for MS milliseconds;
- ``crash-after:N``: pass N times, then crash.

With the variable unset every check is one dict lookup that finds nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping

ENV_VAR = "ACCORD_FAILPOINTS"


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is ``error``."""


class Failpoints:
    """A set of armed failpoints; inject one per process (``Failpoints.from_env()``)."""

    def __init__(self, spec: Mapping[str, str] | None = None) -> None:
        self._spec: dict[str, str] = dict(spec or {})
        self._hits: dict[str, int] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Failpoints:
        raw = (environ if environ is not None else os.environ).get(ENV_VAR, "")
        return cls(parse(raw))

    @property
    def armed(self) -> bool:
        return bool(self._spec)

    def check(self, name: str) -> None:
        """Synchronous failpoint: ``crash`` and ``error`` only (``sleep`` is ignored)."""
        action = self._spec.get(name)
        if action is not None:
            self._fire(name, action)

    async def acheck(self, name: str) -> None:
        """Failpoint in async code: supports ``sleep:MS`` as well."""
        action = self._spec.get(name)
        if action is None:
            return
        if action.startswith("sleep:"):
            await asyncio.sleep(int(action.split(":", 1)[1]) / 1000)
            return
        self._fire(name, action)

    def _fire(self, name: str, action: str) -> None:
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
    spec: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, action = item.partition("=")
        if not sep or not name or not action:
            raise ValueError(f"{ENV_VAR}: expected name=action, got {item!r}")
        if action not in ("crash", "error") and not action.startswith(("sleep:", "crash-after:")):
            raise ValueError(f"{ENV_VAR}: unknown action {action!r} for {name}")
        spec[name.strip()] = action.strip()
    return spec
