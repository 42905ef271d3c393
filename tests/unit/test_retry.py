"""The one backoff schedule (common/retry.py), as each of its users sets it up."""

from __future__ import annotations

import asyncio

import pytest

from accord.common.retry import Backoff, pause
from accord.coordinator import RetryPolicy


def test_the_coordinators_default_is_equal_jitter_doubling_from_20_ms_to_2_s() -> None:
    policy = RetryPolicy()
    for attempt in range(1, 12):
        cap = min(2.0, 0.02 * 2.0 ** (attempt - 1))
        for rand in (0.0, 0.37, 0.999):
            assert policy.delay(attempt, rand) == cap * (0.5 + rand / 2)


def test_without_jitter_the_delay_doubles_up_to_its_cap() -> None:
    resolver = Backoff(initial_s=0.25, max_s=30.0, multiplier=2.0, jitter=0.0)
    assert [resolver.delay(n) for n in range(1, 10)] == [0.25, 0.5, 1, 2, 4, 8, 16, 30, 30]


async def test_pause_ends_early_when_stopped() -> None:
    stop = asyncio.Event()
    assert await pause(0.001) is False
    assert await pause(0.001, stop) is False
    asyncio.get_running_loop().call_later(0.01, stop.set)
    assert await asyncio.wait_for(pause(30, stop), 2) is True
    assert await pause(30, stop) is True  # already set: no wait at all


@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_jitter_keeps_the_delay_within_its_share_of_the_cap(jitter: float) -> None:
    b = Backoff(initial_s=1.0, max_s=1.0, jitter=jitter)
    assert b.delay(1, 0.0) == pytest.approx(1.0 - jitter)
    assert b.delay(1, 0.999) <= 1.0
