"""A topology: the processes of one demo, chaos run, benchmark row or test, all under one
directory (``ROOT/NAME.log`` for each process, ``ROOT/NAME.db`` for a participant,
``ROOT/wal...`` for a coordinator, ``ROOT/etcd`` for etcd), stopped together.

Every process is registered before it starts, so :meth:`Topology.stop` (or leaving the
``with``/``async with`` block) stops it by PID in reverse order of registration even when
starting it failed: coordinators before the participants they call, etcd last (the
participants deregister before it goes)."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypedDict, TypeVar, Unpack

from accord.common.transport import TransportSettings
from accord.tools.topology._postgres import PostgresServer
from accord.tools.topology._process import (
    EtcdServer,
    ManagedProcess,
    accord_argv,
    free_port,
    stop_all,
)

if TYPE_CHECKING:
    from accord.tools._certs import CertDir
    from accord.tools.topology._netns import NetHost

P = TypeVar("P", bound=ManagedProcess)

#: What a coordinator says once it is ready: an owner serves, a standby waits for its
#: shard, and ``any`` takes either (a coordinator that may find its shard owned).
Role = Literal["owner", "standby", "any"]
_READY: dict[Role, str | tuple[str, ...]] = {
    "owner": "listening on ",
    "standby": "standby for shard",
    "any": ("listening on ", "standby for shard"),
}


class ParticipantOptions(TypedDict, total=False):
    """How a participant is started; a flag not given is left out of its command line,
    so the participant's own default applies."""

    #: 0 (the default): it picks a port and reports it.
    port: int
    #: Default: ``ROOT/NAME.db``; a ``postgresql://`` URL for a PostgreSQL participant.
    db: Path | str | None
    service: str
    #: An etcd URL: it registers there (as ``instance_id``, with a lease of ``ttl_s``).
    etcd: str
    instance_id: str
    ttl_s: float | None
    in_doubt_after_s: float | None
    #: Default ``warning``; None leaves the flag out.
    log_level: str | None
    env: Mapping[str, str] | None
    #: More arguments, last on the command line.
    extra: Sequence[str]
    #: Default True: start it now and wait until it serves (False: only register it).
    start: bool
    #: Run on this host (its own network namespace), listening on its address.
    host: NetHost | None


@contextmanager
def workdir(path: Path | None, *, prefix: str, keep: bool = False) -> Iterator[Path]:
    """``path`` (created if missing, always kept), or else a new temporary directory,
    removed on the way out unless ``keep``."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _listen(port: int, host: NetHost | None = None) -> str:
    return host.addr(port) if host is not None else f"127.0.0.1:{port}"


def _opt(flag: str, value: object | None) -> list[str]:
    """``[flag, value]``, or nothing when the value is not given."""
    return [] if value is None or value == "" else [flag, str(value)]


class Topology:
    """Starts etcd, coordinators and participants as processes on 127.0.0.1 and stops
    every one of them. A process on port 0 picks its port and reports it (its
    ``address``); give a port (:func:`free_port`) only where one must be known in advance
    or kept across restarts.

    Every method that builds a process takes ``host``: a :class:`NetHost` of a
    :class:`~accord.tools.topology.NetLab` to run it on (its own network namespace),
    listening and advertising on the host's address (port 0 still works there: the
    process reports its port).

    ``env`` goes to every process it builds but etcd (a process's own ``env`` is laid
    over it); ``start_timeout_s`` bounds each start.

    ``certs`` (a directory of ``accord certs``): every link over mutual TLS. Each process
    gets its own certificate (issued on first use, by the directory's CA): a participant
    its service's name, a coordinator ``coordinator``, etcd ``etcd``, anything else the
    name it is given (default ``client``); participants accept branch calls only from
    ``coordinator`` (``ACCORD_ALLOW_COORDINATORS``). :meth:`transport` gives this
    process's own settings (the ``client`` certificate)."""

    def __init__(
        self,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 30.0,
        certs: CertDir | None = None,
    ) -> None:
        self.root = Path(root)
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.certs = certs
        #: Every process registered, in order of registration.
        self.procs: list[ManagedProcess] = []

    # ------------------------------------------------------------ life cycle

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Topology:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On purpose in the loop's thread: teardown must finish even while the task
        # that leaves the block is being cancelled.
        self.stop()

    def stop(self) -> None:
        """Stops every process (SIGTERM, SIGKILL after a grace period; a paused one is
        resumed first), last registered first. Safe to call again."""
        stop_all(list(reversed(self.procs)))

    def add(self, proc: P) -> P:
        """Registers a process built elsewhere, so :meth:`stop` stops it."""
        if proc not in self.procs:
            self.procs.append(proc)
        return proc

    def start(self, proc: P) -> P:
        """Registers the process, starts it and waits until it is ready."""
        self.add(proc).start(self.start_timeout_s)
        return proc

    async def start_together(self, *procs: ManagedProcess) -> None:
        """Registers the processes, starts them in parallel and waits until each is
        ready."""
        for p in procs:
            self.add(p)
        await asyncio.gather(*(p.start_async(self.start_timeout_s) for p in procs))

    # ------------------------------------------------------------ TLS

    def cert(self, name: str) -> tuple[Path, Path, Path]:
        """(certificate, key, CA) of ``name``, issued now if missing (with ``certs``)."""
        assert self.certs is not None, "a topology without certs"
        if not self.certs.cert(name).exists():
            from accord.tools._certs import issue

            issue(self.certs, name)
        return self.certs.cert(name), self.certs.key(name), self.certs.ca

    def tls_env(self, name: str) -> dict[str, str]:
        """``ACCORD_TLS_*`` of a process holding ``name``'s certificate ({} without TLS)."""
        if self.certs is None:
            return {}
        self.cert(name)
        return self.certs.env(name)

    def transport(self, name: str = "client") -> TransportSettings:
        """This process's settings towards the topology (plain text without certs)."""
        if self.certs is None:
            return TransportSettings()
        cert, key, ca = self.cert(name)
        return TransportSettings(cert=cert, key=key, ca=ca)

    # ------------------------------------------------------------ building blocks

    def process(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready: str | tuple[str, ...] = "listening on ",
        cwd: Path | None = None,
        cert: str = "client",
        host: NetHost | None = None,
    ) -> ManagedProcess:
        """Any process, logging to ``ROOT/NAME.log``; registered, not started. With
        ``certs``, it holds ``cert``'s certificate; with ``host``, it runs there."""
        # A lab's hosts are not loopback, and Accord serves plain text off loopback only
        # when told: the lab's subnet is reachable from this machine only.
        insecure = {"ACCORD_INSECURE": "1"} if host is not None and self.certs is None else {}
        return self.add(
            ManagedProcess(
                name,
                argv,
                env={**insecure, **self.tls_env(cert), **self.env, **(env or {})},
                log_path=self.root / f"{name}.log",
                ready_prefix=ready,
                cwd=cwd,
                host=host,
            )
        )

    def _started(self, proc: P, start: bool) -> P:
        return self.start(proc) if start else proc

    # ------------------------------------------------------------ etcd

    def etcd(
        self, name: str = "etcd", *, start: bool = True, host: NetHost | None = None
    ) -> EtcdServer:
        """A single-member etcd on reserved loopback ports (kept across its restarts),
        or on ``host``'s address (ports 2379/2380); data in ``ROOT/NAME``."""
        server = EtcdServer(
            self.root / name,
            log_path=self.root / f"{name}.log",
            name=name,
            tls=self.cert("etcd") if self.certs is not None else None,
            host=host,
        )
        return self._started(self.add(server), start)

    def etcd_cluster(
        self,
        names: Sequence[str] = ("etcd-1", "etcd-2", "etcd-3"),
        *,
        hosts: Sequence[NetHost] | None = None,
        start: bool = True,
    ) -> list[EtcdServer]:
        """An etcd cluster, one member per name (data in ``ROOT/NAME``): on 127.0.0.1
        with reserved ports each, or each on its host of ``hosts``. Members are started
        together (each waits for a quorum before it serves); :func:`etcd_url` gives
        the clients' URL (every member)."""
        if hosts is not None and len(hosts) != len(names):
            raise ValueError("one host per etcd member")
        placed = list(hosts) if hosts is not None else [None] * len(names)
        peers = [2380 if h is not None else free_port() for h in placed]
        cluster = {
            n: EtcdServer.peer_url_of(h, p) for n, h, p in zip(names, placed, peers, strict=True)
        }
        token = f"accord-{self.root.name}"
        members = [
            self.add(
                EtcdServer(
                    self.root / name,
                    log_path=self.root / f"{name}.log",
                    name=name,
                    tls=self.cert("etcd") if self.certs is not None else None,
                    host=h,
                    peer_port=port,
                    member=name,
                    cluster=cluster,
                    cluster_token=token,
                )
            )
            for name, h, port in zip(names, placed, peers, strict=True)
        ]
        if start:
            self.start_parallel(*members)
        return members

    def start_parallel(self, *procs: ManagedProcess) -> None:
        """:meth:`start_together` without an event loop (a thread per process)."""
        with ThreadPoolExecutor(max(1, len(procs))) as pool:
            for future in [pool.submit(self.start, p) for p in procs]:
                future.result()

    # ------------------------------------------------------------ PostgreSQL

    def postgres(
        self,
        name: str = "postgres",
        *,
        max_prepared_transactions: int = 100,
        settings: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> PostgresServer:
        """A PostgreSQL server on a reserved loopback port (kept across its restarts),
        logging to ``ROOT/NAME.log``; :meth:`PostgresServer.create_database` gives a
        participant its database URL (for ``db=``)."""
        server = PostgresServer(
            self.root,
            name=name,
            max_prepared_transactions=max_prepared_transactions,
            settings=settings,
        )
        return self._started(self.add(server), start)

    # ------------------------------------------------------------ participants

    def participant(
        self, kind: str, name: str = "", **options: Unpack[ParticipantOptions]
    ) -> ManagedProcess:
        """``accord participant KIND`` (``bank``, ``flight``, ``hotel``, ``car`` ...) named
        ``name`` (default: the kind); see :class:`ParticipantOptions`."""
        name = name or kind
        args = ["participant", kind, *self._participant_flags(name, options)]
        proc = self.process(
            name,
            accord_argv(args),
            env=self._participant_env(options),
            cert=options.get("service") or kind,
            host=options.get("host"),
        )
        return self._started(proc, options.get("start", True))

    def bank(
        self,
        name: str,
        *,
        accounts: int | None = None,
        initial_balance: int | None = None,
        standalone: bool = False,
        cwd: Path | None = None,
        **options: Unpack[ParticipantOptions],
    ) -> ManagedProcess:
        """The bank participant as service ``options["service"]`` (default: ``name``),
        seeded with ``accounts`` accounts of ``initial_balance`` when given.
        ``standalone`` runs the bank's own entry point (``python -m
        accord.participants.bank``, in ``cwd``; it does not register in etcd) instead of
        ``accord participant bank``."""
        seed = [*_opt("--accounts", accounts), *_opt("--initial-balance", initial_balance)]
        options["service"] = options.get("service") or name
        options["extra"] = [*seed, *options.get("extra", ())]
        if not standalone:
            return self.participant("bank", name, **options)
        if options.get("etcd"):
            raise ValueError("the standalone bank does not register in etcd")
        argv = [sys.executable, "-m", "accord.participants.bank"]
        argv += self._participant_flags(name, options)
        proc = self.process(
            name,
            argv,
            env=self._participant_env(options),
            cwd=cwd,
            cert=options["service"],
            host=options.get("host"),
        )
        return self._started(proc, options.get("start", True))

    def _participant_env(self, o: ParticipantOptions) -> dict[str, str]:
        allow = {"ACCORD_ALLOW_COORDINATORS": "coordinator"} if self.certs is not None else {}
        return {**allow, **(o.get("env") or {})}

    def _participant_flags(self, name: str, o: ParticipantOptions) -> list[str]:
        return [
            *("--listen", _listen(o.get("port", 0), o.get("host"))),
            *("--db", str(o.get("db") or self.root / f"{name}.db")),
            *_opt("--service", o.get("service")),
            *_opt("--etcd", o.get("etcd")),
            *_opt("--instance-id", o.get("instance_id")),
            *_opt("--ttl", o.get("ttl_s")),
            *_opt("--in-doubt-after-s", o.get("in_doubt_after_s")),
            *_opt("--log-level", o.get("log_level", "warning")),
            *o.get("extra", ()),
        ]

    # ------------------------------------------------------------ coordinators

    def coordinator(
        self,
        name: str = "coordinator",
        *,
        services: Mapping[str, str] | None = None,
        etcd: str = "",
        wal: str | Path = "wal",
        cid: str = "",
        shard: str = "",
        role: Role = "owner",
        port: int = 0,
        ttl_s: float | None = None,
        retry_max_s: float | None = None,
        default_timeout_ms: int | None = None,
        transport: str | None = None,
        log_level: str | None = "warning",
        env: Mapping[str, str] | None = None,
        extra: Sequence[str] = (),
        start: bool = True,
        host: NetHost | None = None,
    ) -> ManagedProcess:
        """``accord coordinator`` with its WAL in ``ROOT/WAL`` (a shard's owner and
        standbys share one directory: a shared volume's stand-in), resolving services
        from ``services`` (a static map) and/or etcd; with ``cid`` and ``shard`` it is
        coordinator ``cid`` of WAL shard ``shard``, ready as ``role`` says. Flags not
        given are left out, so the coordinator's defaults apply."""
        args = [
            "coordinator",
            *("--listen", _listen(port, host)),
            *("--wal-dir", str(self.root / wal)),
            *(f"--service={n}={a}" for n, a in (services or {}).items()),
            *_opt("--etcd", etcd),
            *_opt("--id", cid),
            *_opt("--shard", shard),
            *_opt("--ttl", ttl_s),
            *_opt("--retry-max-s", retry_max_s),
            *_opt("--default-timeout-ms", default_timeout_ms),
            *_opt("--participant-transport", transport),
            *_opt("--log-level", log_level),
            *extra,
        ]
        proc = self.process(
            name, accord_argv(args), env=env, ready=_READY[role], cert="coordinator", host=host
        )
        return self._started(proc, start)


def etcd_url(members: Sequence[EtcdServer]) -> str:
    """The clients' URL of an etcd cluster: every member's, comma-separated (what
    ``--etcd`` takes)."""
    return ",".join(m.url for m in members)
