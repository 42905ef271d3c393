"""The one event-loop runner of every Accord process: :func:`run` runs a coroutine on
uvloop where it is installed (faster gRPC I/O), else on asyncio's own loop.

uvloop is imported inside :func:`run`, not at module level: it belongs to the ``server``
extra, and the client SDK (which may import :mod:`accord.common`) must not need it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs ``coro`` to completion on a new event loop (uvloop's when available) and
    returns its result; the loop is closed afterwards."""
    try:
        import uvloop
    except ImportError:  # uvloop is in the server extra (and does not exist on Windows)
        return asyncio.run(coro)
    return uvloop.run(coro)
