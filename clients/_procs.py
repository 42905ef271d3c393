"""Starting and stopping Accord processes (coordinator, participants) on this machine:
used by the demo, the tests, the benchmarks and the chaos harness. Every process prints
``listening on HOST:PORT`` once it serves; we wait for that line, and stop processes by
PID (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path


class ProcessFailed(RuntimeError):
    pass


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.log_path = log_path
        self.address = ""
        self.proc: subprocess.Popen[str] | None = None
        self._tail: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @classmethod
    def accord(cls, name: str, args: Sequence[str], **kw: object) -> ManagedProcess:
        """An ``accord`` subcommand run with this interpreter."""
        return cls(name, [sys.executable, "-m", "clients.cli", *args], **kw)  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> ManagedProcess:
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._listening.clear()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(1)
                raise ProcessFailed(
                    f"{self.name} exited with {self.proc.returncode} before serving:\n"
                    + self.output()
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ProcessFailed(
                    f"{self.name} did not serve within {timeout_s}s:\n" + self.output()
                )
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        log = self.log_path.open("a") if self.log_path else None
        try:
            for line in proc.stdout:
                self._tail.append(line)
                if log:
                    log.write(line)
                    log.flush()
                if not self._listening.is_set() and line.startswith("listening on "):
                    self.address = line.split("listening on ", 1)[1].strip()
                    self._listening.set()
        finally:
            if log:
                log.close()

    def output(self) -> str:
        return "".join(self._tail)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after grace_s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(2)
        return self.proc.returncode


def stop_all(procs: Sequence[ManagedProcess]) -> None:
    for p in procs:
        try:
            p.stop()
        except Exception:  # teardown must go on
            p.kill()
