"""A real PostgreSQL server for tests, the demo, chaos runs and benchmark rows: Debian's
``postgresql`` package (``initdb`` into a fresh data directory, the ``postgres`` server on
a reserved loopback port), stopped by PID.

- PostgreSQL refuses to run as root: when we are root, ``initdb`` and the server run as
  the ``postgres`` OS user, and the data directory is a new temporary directory owned by
  that user (the caller's directory, e.g. pytest's ``tmp_path``, is usually not
  traversable by another user). It is removed by :meth:`PostgresServer.remove` or at
  interpreter exit; the server's log goes to ``ROOT/NAME.log`` as for every process.
- Authentication is ``trust`` (loopback only): the URL is
  ``postgresql://postgres@127.0.0.1:PORT/DBNAME``.
- ``max_prepared_transactions`` is set (100 by default; 0 gives PostgreSQL's own default,
  for the start-up error tests), so participants can ``PREPARE TRANSACTION``.
- :meth:`stop` is ``pg_ctl stop -m fast`` (SIGINT to the postmaster), :meth:`kill` is
  ``pg_ctl stop -m immediate`` (SIGQUIT: no checkpoint, crash recovery on the next
  start; prepared transactions survive it). A SIGKILL of the postmaster alone would leave
  its backends holding the shared memory and the next start would fail, so "crash" here
  means immediate shutdown. :meth:`start` again restarts on the same port and data."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from accord.tools.topology._process import ManagedProcess, ProcessFailed, _as_user, free_port

_READY_LINE = "database system is ready to accept connections"


def postgres_bindir() -> Path:
    """``$ACCORD_PG_BINDIR``, else the newest ``/usr/lib/postgresql/*/bin`` (Debian's
    ``postgresql`` package), else the directory of ``initdb`` on the PATH."""
    explicit = os.environ.get("ACCORD_PG_BINDIR")
    if explicit:
        return Path(explicit)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise ProcessFailed(
        "no PostgreSQL server binaries: install Debian's postgresql package "
        "(make postgresql) or set ACCORD_PG_BINDIR"
    )


#: File names of the TLS certificate, key and CA in the data directory.
_TLS_FILES = ("accord-server.crt", "accord-server.key", "accord-ca.crt")
_TLS_SETTINGS = {
    "ssl": "on",
    "ssl_cert_file": _TLS_FILES[0],
    "ssl_key_file": _TLS_FILES[1],
    "ssl_ca_file": _TLS_FILES[2],
}


class PostgresServer(ManagedProcess):
    """One PostgreSQL server on 127.0.0.1:``port`` (reserved when 0, kept across
    restarts), superuser ``postgres``, trust authentication. ``settings`` are more
    ``-c name=value`` server settings."""

    def __init__(
        self,
        root_dir: Path,
        *,
        name: str = "postgres",
        port: int = 0,
        max_prepared_transactions: int = 100,
        settings: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key, CA): the server accepts TLS connections with that
        certificate (copied into its data directory, owned by its user, at start);
        clients choose TLS in their URL (``?sslmode=verify-full&sslrootcert=CA``)."""
        self.root_dir = Path(root_dir)
        self.tls = tls
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.bindir = postgres_bindir()
        user = "postgres" if os.geteuid() == 0 else None
        if user is None:
            self.base_dir = self.root_dir / name
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._owned_tmp = False
        else:
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"accord-{name}-"))
            ids = _as_user(user)
            os.chown(self.base_dir, ids["user"], ids["group"])
            self._owned_tmp = True
            atexit.register(self.remove)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir
        all_settings = {
            "listen_addresses": "127.0.0.1",
            "max_prepared_transactions": str(max_prepared_transactions),
            "max_connections": "300",
            "unix_socket_permissions": "0777",
            **(_TLS_SETTINGS if tls else {}),
            **(settings or {}),
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        argv += ["-k", str(self.socket_dir)]
        for key, value in all_settings.items():
            argv += ["-c", f"{key}={value}"]
        super().__init__(
            name,
            argv,
            log_path=log_path or self.root_dir / f"{name}.log",
            ready_prefix=_READY_LINE,
            cwd=self.base_dir,
            user=user,
        )
        self.address = f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------ URLs, databases

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    # ------------------------------------------------------------ life cycle

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self.tls is not None:
            self._install_tls(self.tls)
        super().start(timeout_s)
        return self

    def _install_tls(self, tls: tuple[Path, Path, Path]) -> None:
        """The certificate, key and CA into the data directory, owned by the server's
        user, the key readable by it only (PostgreSQL refuses it otherwise)."""
        for src, dst in zip(tls, _TLS_FILES, strict=True):
            target = self.data_dir / dst
            shutil.copyfile(src, target)
            os.chmod(target, 0o600)
            if self.user is not None:
                ids = _as_user(self.user)
                os.chown(target, ids["user"], ids["group"])

    def _initdb(self) -> None:
        argv = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres"]
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            check=False,
            **_as_user(self.user),
        )
        if done.returncode != 0:
            raise ProcessFailed(f"{self.name}: initdb failed:\n{done.stdout}{done.stderr}")

    def _ready(self) -> bool:
        time.sleep(0.05)
        return any(_READY_LINE in line for line in list(self._tail))

    def _signal_and_wait(self, sig: signal.Signals, wait_s: float) -> bool:
        assert self.proc is not None
        if self.paused:
            self.resume()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self, grace_s: float = 30.0) -> int | None:
        """``pg_ctl stop -m fast`` (SIGINT: clients disconnected, a checkpoint, exit),
        immediate shutdown if it has not exited after grace_s. Safe to call again."""
        if self.proc is None:
            return None
        if not self._signal_and_wait(signal.SIGINT, grace_s):
            self.kill()
        if self._reader is not None:
            self._reader.join(2)
        return self.proc.returncode

    def kill(self) -> None:
        """``pg_ctl stop -m immediate`` (SIGQUIT): a crash as far as the data is
        concerned; the next start runs crash recovery."""
        if self.proc is None:
            return
        if not self._signal_and_wait(signal.SIGQUIT, 30.0):
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.paused = False

    def remove(self) -> None:
        """Stops the server and deletes its data directory (when it made one)."""
        try:
            self.stop()
        finally:
            if self._owned_tmp:
                shutil.rmtree(self.base_dir, ignore_errors=True)
