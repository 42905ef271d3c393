"""The one backoff schedule, and the one way to wait between two attempts.

Every retry in Accord backs off the same way: the coordinator's 2PC branch calls and
saga steps (one retry loop, the engine's ``Engine.call``), and a participant's in-doubt
resolver asking a coordinator for an outcome (one attempt per pass, scheduled from
here). Attempt ``n`` (1-based) waits ``min(max_s, initial_s * multiplier**(n-1))``,
of which the fraction ``jitter`` is random: ``cap * (1 - jitter + jitter * rand)`` with
``rand`` in [0, 1). The random number is the caller's (injected), so a test with a fixed
``rand`` sees fixed delays.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = ["Backoff", "pause"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Backoff:
    """Exponential backoff; ``jitter`` 0.5 is "equal jitter" (half fixed, half random),
    0 is no jitter at all."""

    initial_s: float = 0.02
    max_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int, rand: float = 0.0) -> float:
        """Delay before retry number ``attempt`` (1-based); ``rand`` in [0, 1)."""
        cap = min(self.max_s, self.initial_s * self.multiplier ** (attempt - 1))
        if not self.jitter:
            return cap
        return cap * (1.0 - self.jitter + self.jitter * rand)


async def pause(delay_s: float, stop: asyncio.Event | None = None) -> bool:
    """Waits ``delay_s`` between two attempts; returns True when ``stop`` was set
    first (the caller gives up), False when the time is up (the caller tries again)."""
    if stop is None:
        await asyncio.sleep(delay_s)
        return False
    if stop.is_set():
        return True
    try:
        async with asyncio.timeout(delay_s):
            await stop.wait()
    except TimeoutError:
        return False
    return True
