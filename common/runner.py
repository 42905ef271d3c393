"""The one event-loop runner of every Accord process: :func:`run` runs a coroutine on
uvloop where it is installed (faster gRPC I/O), else on asyncio's own loop; and
:func:`stop_on_signals`, the one place a long-running process handles SIGTERM/SIGINT.

uvloop is imported inside :func:`run`, not at module level: it belongs to the ``server``
extra, and the client SDK (which may import :mod:`accord.common`) must not need it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from accord.common.exits import ExitCode

T = TypeVar("T")

log = logging.getLogger("accord.process")

#: The signals that stop a server process gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs ``coro`` to completion on a new event loop (uvloop's when available) and
    returns its result; the loop is closed afterwards."""
    try:
        import uvloop
    except ImportError:  # uvloop is in the server extra (and does not exist on Windows)
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass
class Signalled:
    """What :func:`stop_on_signals` saw: the first stop signal's name ("" if none)."""

    signal: str = ""

    def __bool__(self) -> bool:
        return bool(self.signal)


@asynccontextmanager
async def stop_on_signals() -> AsyncIterator[Signalled]:
    """``async with stop_on_signals() as signalled:`` — SIGTERM or SIGINT cancels the task
    running the block, wherever it waits (a standby waiting for its shard, a wait for
    etcd, a database or a lock, a replay, serving), so the block's own clean-up runs
    (``async with``/``finally``: deregister, release, close) and nothing is acquired
    after the signal. The cancellation the signal caused ends at the block: it returns
    normally, and ``signalled`` says which signal it was.

    A second signal while the clean-up runs exits at once with
    :attr:`ExitCode.INTERRUPTED` (everything a process keeps is crash-safe)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signalled = Signalled()

    def on_signal(sig: signal.Signals) -> None:
        if signalled:
            log.warning("event=stop_forced signal=%s", sig.name)
            for h in logging.getLogger().handlers:
                h.flush()
            sys.stderr.flush()
            os._exit(ExitCode.INTERRUPTED)
        signalled.signal = sig.name
        log.info("event=stopping cause=signal signal=%s", sig.name)
        task.cancel(f"stopped by {sig.name}")

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield signalled
    except asyncio.CancelledError:
        if not signalled or task.uncancel() > 0:
            raise  # not (only) ours: someone else cancelled this task
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
