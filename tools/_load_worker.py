"""One worker process of ``accord load --processes P``:
``python -m accord.tools._load_worker SETTINGS_JSON INDEX``.

It talks to its parent in JSON lines: on stdout ``{"type": "ready"}`` once its client is
connected, ``{"type": "progress", ...}`` twice a second, then ``{"type": "result", ...}``
(or ``{"type": "error", "message": ...}``); on stdin it reads ``go <unix time>`` (start
then) and later maybe ``stop`` (finish early). Ctrl-C is the parent's to handle: it
forwards a ``stop``; end of stdin (the parent died) stops the worker too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from typing import Any

from accord.common import runner
from accord.common.exits import ExitCode
from accord.tools._load import LoadError, LoadSettings, connect, run_worker


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _main(settings: LoadSettings, index: int) -> int:
    loop = asyncio.get_running_loop()
    go: asyncio.Future[float] = loop.create_future()
    stop = asyncio.Event()

    def on_go(start: float) -> None:
        if not go.done():
            go.set_result(start)

    def on_stop() -> None:
        stop.set()
        if not go.done():
            go.cancel()

    def read_stdin() -> None:
        # A thread: a blocking read of a pipe, however the event loop is implemented.
        for line in sys.stdin:
            word, _, arg = line.strip().partition(" ")
            if word == "go":
                loop.call_soon_threadsafe(on_go, float(arg))
            elif word == "stop":
                break
        loop.call_soon_threadsafe(on_stop)

    try:
        client = await connect(settings)
    except LoadError as e:
        _emit({"type": "error", "message": str(e)})
        return ExitCode.FAILURE
    async with client:
        threading.Thread(target=read_stdin, name="load-stdin", daemon=True).start()
        _emit({"type": "ready"})
        try:
            start_wall = await go
        except asyncio.CancelledError:
            _emit({"type": "error", "message": "stopped before the start"})
            return ExitCode.FAILURE
        result = await run_worker(
            settings,
            index,
            client,
            start_wall=start_wall,
            on_progress=lambda snap: _emit({"type": "progress", "snapshot": snap}),
            stop=stop,
        )
    _emit({"type": "result", "result": result})
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = LoadSettings.from_dict(
        {**json.loads(args[0]), "token": os.environ.get("ACCORD_TOKEN", "")}
    )
    return runner.run(_main(settings, int(args[1])))


if __name__ == "__main__":
    sys.exit(main())
