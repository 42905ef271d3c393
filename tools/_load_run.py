"""``accord load``: the whole run, in this process or in worker processes
(``python -m accord.tools._load_worker``) started together, whose results are merged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from accord.tools._load import LoadError, LoadSettings, ProgressFn, connect, cpu_s, run_worker
from accord.tools._load_report import Report, build_report


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process
    stderr_tail: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str = ""
    readers: list[asyncio.Task[None]] = field(default_factory=list)


async def _read_lines(stream: asyncio.StreamReader, handle: Callable[[bytes], None]) -> None:
    while line := await stream.readline():
        handle(line)


async def run_processes(
    s: LoadSettings,
    *,
    on_progress: ProgressFn | None = None,
    stop: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """Runs ``s.processes`` worker processes, starting them together; their results."""
    stop = stop or asyncio.Event()
    children: list[_Child] = []
    ready = [asyncio.Event() for _ in range(s.processes)]
    readers: list[asyncio.Task[None]] = []
    try:
        for i in range(s.processes):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "accord.tools._load_worker",
                json.dumps(s.to_dict()),
                str(i),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=64 * 1024 * 1024,
                env={**os.environ, "ACCORD_TOKEN": s.token} if s.token else None,
                # Out of the terminal's process group: Ctrl-C reaches the parent only,
                # which forwards a "stop" and still collects every worker's result.
                start_new_session=True,
            )
            child = _Child(i, proc)
            children.append(child)

            def on_line(line: bytes, child: _Child = child) -> None:
                try:
                    msg = json.loads(line)
                except ValueError:
                    child.stderr_tail = [*child.stderr_tail[-19:], line.decode(errors="replace")]
                    return
                kind = msg.get("type")
                if kind == "ready":
                    ready[child.index].set()
                elif kind == "progress" and on_progress is not None:
                    on_progress(msg["snapshot"])
                elif kind == "result":
                    child.result = msg["result"]
                elif kind == "error":
                    child.error = str(msg["message"])
                    ready[child.index].set()

            def on_err(line: bytes, child: _Child = child) -> None:
                text = line.decode(errors="replace").rstrip()
                child.stderr_tail = [*child.stderr_tail[-19:], text]

            assert proc.stdout is not None and proc.stderr is not None
            child.readers = [
                asyncio.create_task(_read_lines(proc.stdout, on_line)),
                asyncio.create_task(_read_lines(proc.stderr, on_err)),
            ]
            readers.extend(child.readers)

        async def became_ready(c: _Child) -> None:
            done = asyncio.create_task(c.proc.wait())
            flag = asyncio.create_task(ready[c.index].wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait(
                [done, flag, stopped], timeout=60, return_when=asyncio.FIRST_COMPLETED
            )
            for t in (done, flag, stopped):
                t.cancel()
            if stop.is_set():
                raise LoadError("interrupted before the start")
            if c.proc.returncode is not None:  # it died: let its last words arrive
                await asyncio.wait(c.readers, timeout=2)
            if not ready[c.index].is_set() or c.error:
                why = c.error or ("; ".join(c.stderr_tail[-3:]) or "did not start within 60 s")
                raise LoadError(f"worker process {c.index}: {why}")

        await asyncio.gather(*(became_ready(c) for c in children))
        start_wall = time.time() + 0.05
        for c in children:
            assert c.proc.stdin is not None
            c.proc.stdin.write(f"go {start_wall!r}\n".encode())
            await c.proc.stdin.drain()

        async def forward_stop() -> None:
            await stop.wait()
            for c in children:
                if c.proc.stdin is not None and c.proc.returncode is None:
                    with contextlib.suppress(OSError, RuntimeError):
                        c.proc.stdin.write(b"stop\n")

        stopper = asyncio.create_task(forward_stop())
        try:
            await asyncio.gather(*(c.proc.wait() for c in children))
            await asyncio.gather(*readers)
        finally:
            stopper.cancel()
        for c in children:
            if c.result is None:
                why = c.error or "; ".join(c.stderr_tail[-3:]) or f"exit {c.proc.returncode}"
                raise LoadError(f"worker process {c.index} failed: {why}")
        return [c.result for c in children if c.result is not None]
    finally:
        for c in children:
            if c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                await c.proc.wait()
        for r in readers:
            r.cancel()


async def run_load(
    s: LoadSettings,
    *,
    on_progress: ProgressFn | None = None,
    stop: asyncio.Event | None = None,
) -> Report:
    """The whole run: in this process (``processes == 1``) or in worker processes."""
    s.validate()
    stop = stop or asyncio.Event()
    started = time.time()
    if s.processes == 1:
        client = await connect(s)
        async with client:
            result = await run_worker(s, 0, client, on_progress=on_progress, stop=stop)
        report = build_report(s, [result], started_unix=started)
    else:
        cpu0, t0 = cpu_s(), time.perf_counter()
        results = await run_processes(s, on_progress=on_progress, stop=stop)
        parent = (cpu_s() - cpu0, time.perf_counter() - t0)
        report = build_report(s, results, started_unix=started, parent_cpu=parent)
    report.data["interrupted"] = stop.is_set()
    if stop.is_set():
        report.data["warnings"].append("stopped early (interrupted): the figures cover less")
    return report
