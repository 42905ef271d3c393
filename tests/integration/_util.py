from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def assert_eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool],
    *,
    timeout_s: float = 20.0,
    what: str = "",
) -> T:
    """Polls probe until check(result) holds; fails with the last result otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {what}; last value: {value!r}")
        await asyncio.sleep(0.05)
