"""Serving a participant: the gRPC server (Participant service, health checking,
reflection, and any extra services such as an admin API on the same port), the store
and the in-doubt resolver, started and stopped together. Signals are handled in one
place, :func:`serve`: SIGTERM/SIGINT stop a participant in any state, including while it
waits for its database or for etcd at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

import accord.v1 as pb
from accord.common.grpc_safe import add_health, add_reflection, add_servicer
from accord.common.runner import stop_on_signals
from accord.common.telemetry import Telemetry
from accord.common.transport import (
    CallerAllowList,
    TlsFileError,
    TransportSettings,
    bind,
    make_server,
)
from accord.participants._app import Participant, ParticipantApp
from accord.participants._backend import (
    Backend,
    BackendStartError,
    SqliteBackend,
    open_backend,
)
from accord.participants._resolver import InDoubtResolver
from accord.participants._service import ParticipantService
from accord.participants._servicer import DEFAULT_STREAM_MAX_INFLIGHT, ParticipantServicer
from accord.participants._store import Store
from accord.participants._telemetry import ParticipantTelemetry
from accord.registry import (
    DEFAULT_TTL_S,
    Etcd,
    Registration,
    dialable,
    find_coordinators,
    service_key,
    service_value,
)
from accord.registry._etcd import DEFAULT_ETCD_WAIT_S

log = logging.getLogger("accord.participant")

#: Adds an extra servicer to the server (e.g. an admin API) and returns its full service
#: name (for health checking and reflection).
ServiceInstaller = Callable[[aio.Server, ParticipantService], str]

PARTICIPANT_SERVICE_NAME: str = pb.participant_pb2.DESCRIPTOR.services_by_name[
    "Participant"
].full_name


@dataclass(frozen=True, kw_only=True)
class Announce:
    """Register the participant in etcd while it serves (DESIGN.md key layout:
    ``/accord/v1/services/<service>/<instance_id>``, leased)."""

    etcd: str
    #: Defaults to ``<service>-<host>-<port>``.
    instance_id: str = ""
    ttl_s: int = DEFAULT_TTL_S
    #: The address others should dial; defaults to the bound address.
    advertise: str = ""
    #: How long to wait at start-up for etcd's first answer before giving up.
    etcd_wait_s: float = DEFAULT_ETCD_WAIT_S


class ParticipantServer:
    """``async with ParticipantServer(app, db=path) as srv: ... srv.port``.

    ``db`` is a SQLite path, or a ``postgresql://`` URL (PostgreSQL: handlers are ``async
    def``, on a psycopg connection; ``lock_timeout_s`` bounds each transaction's lock
    waits, ``pool_size`` is the connection pool's size), or a :class:`Backend`; when it
    is not given, the :class:`ParticipantApp`'s own ``db``.

    Stopping is graceful (in-flight calls get ``grace_s`` seconds) and safe to call twice.
    """

    def __init__(
        self,
        logic: Participant | ParticipantApp,
        *,
        db: Path | str | Backend | None = None,
        listen: str = "127.0.0.1:0",
        in_doubt_after_s: float = 10.0,
        resolver_interval_s: float | None = None,
        grace_s: float = 5.0,
        max_batch: int = 256,
        lock_timeout_s: float | None = None,
        pool_size: int | None = None,
        stream_max_inflight: int = DEFAULT_STREAM_MAX_INFLIGHT,
        transport: TransportSettings | None = None,
        services: Sequence[ServiceInstaller] = (),
        server_options: Sequence[tuple[str, Any]] = (),
        announce: Announce | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.listen = listen
        self.announce = announce
        self._etcd: Etcd | None = None
        self.registration: Registration | None = None
        self.grace_s = grace_s
        pg_options = {
            k: v
            for k, v in (("lock_timeout_s", lock_timeout_s), ("pool_size", pool_size))
            if v is not None
        }
        if db is None:
            db = logic.db if isinstance(logic, ParticipantApp) else None
        if db is None:
            raise ValueError(
                f"participant {logic.service!r}: no database (give db= to the server or the app)"
            )
        self.backend = open_backend(db, max_batch=max_batch, **pg_options)
        self.service = ParticipantService(logic, self.backend)
        self.resolver = InDoubtResolver(
            self.service,
            after_s=in_doubt_after_s,
            interval_s=resolver_interval_s,
            transport=transport,
        )
        self.telemetry = ParticipantTelemetry(
            telemetry, service=self.service.service, prepared=self.backend.prepared_gauge
        )
        self._servicer = ParticipantServicer(
            self.service, self.telemetry, stream_max_inflight=stream_max_inflight
        )
        self._transport = transport
        self._installers = tuple(services)
        self._server_options = tuple(server_options)
        self._server: aio.Server | None = None
        #: With an allow-list of coordinators (TLS settings): what refuses the others.
        self.allow_list: CallerAllowList | None = None
        self._health: Any = None
        self._port = 0
        self._state = "new"

    @property
    def store(self) -> Store:
        """The SQLite store (SQLite participants only)."""
        return self.service.store

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("participant server is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as bound (the real port when listening on port 0)."""
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"participant server already {self._state}")
        self._state = "starting"
        try:
            await self.service.open()
        except BaseException as e:
            self._state = "stopped"
            with contextlib.suppress(Exception):
                await self.service.close()  # whatever the open started (threads, a pool)
            if isinstance(e, OSError | sqlite3.DatabaseError):
                # A path that cannot be a database (a directory, a file that is not
                # SQLite, a parent that is a file): one line saying which; the details
                # at debug level.
                log.debug("event=db_open_failed", exc_info=True)
                reason = _reason(e)
                raise BackendStartError(f"database {self.backend.location}: {reason}") from None
            raise
        try:
            settings = self._transport or TransportSettings.from_env()
            interceptors = []
            if settings.allow_coordinators:
                if not settings.mutual:
                    raise TlsFileError(
                        "--allow-coordinator needs mutual TLS (--tls-cert, --tls-key and "
                        "--tls-ca): coordinators are identified by their certificates"
                    )
                # Branch calls only from the coordinators named; the admin API, health
                # and reflection are not branch calls.
                self.allow_list = CallerAllowList(
                    settings.allow_coordinators, [PARTICIPANT_SERVICE_NAME], role="coordinator"
                )
                interceptors.append(self.allow_list)
            server, settings = make_server(
                settings, options=self._server_options, interceptors=interceptors
            )
            # Requests that do not decode: INVALID_ARGUMENT, one log line per 10 s at
            # most (extra services installed below do the same: add_servicer).
            add_servicer(pb.add_ParticipantServicer_to_server, self._servicer, server, logger=log)
            names = [PARTICIPANT_SERVICE_NAME]
            names += [install(server, self.service) for install in self._installers]
            self._health = add_health(server)
            add_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
            self._port = bind(server, self.listen, settings)
            await server.start()
            self._server = server
            for name in ["", *names]:
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.service.close()
            self._state = "stopped"
            raise
        self.resolver.start()
        self._state = "serving"
        if self.announce is not None:
            try:
                await self._register(self.announce)
            except BaseException:
                await self.stop(0)
                raise
        log.info(
            "event=serving service=%s address=%s db=%s in_doubt_after_s=%s",
            self.service.service,
            self.address,
            self.backend.location,
            self.resolver.after_s,
        )

    async def _register(self, announce: Announce) -> None:
        name = self.service.service
        address = dialable(announce.advertise or self.address)
        instance = announce.instance_id or f"{name}-{address.replace(':', '-')}"
        self._etcd = Etcd(announce.etcd)
        await self._etcd.wait_reachable(announce.etcd_wait_s)
        self.registration = Registration(
            self._etcd,
            service_key(name, instance),
            service_value(address, self.service.participant.operations),
            ttl_s=announce.ttl_s,
        )
        await self.registration.start()
        etcd = self._etcd

        async def find_owner(shard: str) -> str | None:
            owners = [c for c in await find_coordinators(etcd.url) if c.shard == shard]
            return max(owners, key=lambda c: c.epoch).address if owners else None

        self.resolver.find_owner = find_owner

    async def _deregister(self) -> None:
        # First, so the coordinators stop choosing this instance before it stops serving.
        if self.registration is not None:
            await self.registration.close()
            self.registration = None
        if self._etcd is not None:
            await self._etcd.close()
            self._etcd = None

    async def stop(self, grace_s: float | None = None) -> None:
        if self._state in ("stopping", "stopped", "new"):
            self._state = "stopped" if self._state == "new" else self._state
            return
        self._state = "stopping"
        grace = self.grace_s if grace_s is None else grace_s
        try:
            await self._deregister()
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            await self.resolver.close()
            # Streams stop reading and end once their calls in flight are answered, so
            # the server does not wait out the grace period for a coordinator's stream.
            self._servicer.shutdown()
            if self._server is not None:
                await self._server.stop(grace)
        finally:
            # In-flight calls are answered (or cancelled) by now; queued writes finish.
            await self.service.close()
            self.telemetry.close()
            self._state = "stopped"
            if isinstance(self.backend, SqliteBackend):
                stats = self.backend.store.stats
                log.info(
                    "event=stopped service=%s writes=%d commits=%d max_batch=%d",
                    self.service.service,
                    stats.jobs,
                    stats.commits,
                    stats.max_batch,
                )
            else:
                log.info("event=stopped service=%s", self.service.service)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> ParticipantServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(
    logic: Participant | ParticipantApp,
    *,
    db: Path | str | Backend | None = None,
    listen: str = "127.0.0.1:0",
    in_doubt_after_s: float = 10.0,
    resolver_interval_s: float | None = None,
    grace_s: float = 5.0,
    lock_timeout_s: float | None = None,
    transport: TransportSettings | None = None,
    services: Sequence[ServiceInstaller] = (),
    ready: Callable[[ParticipantServer], None] | None = None,
    announce: Announce | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully; a signal during start-up
    (opening the database, waiting for etcd) stops it as promptly, and it returns
    normally. ``ready`` is called once the server accepts calls (e.g. to print the
    bound address)."""
    async with (
        stop_on_signals(),
        ParticipantServer(
            logic,
            db=db,
            listen=listen,
            in_doubt_after_s=in_doubt_after_s,
            resolver_interval_s=resolver_interval_s,
            grace_s=grace_s,
            lock_timeout_s=lock_timeout_s,
            transport=transport,
            services=services,
            announce=announce,
            telemetry=telemetry,
        ) as server,
    ):
        if ready is not None:
            ready(server)
        await asyncio.Event().wait()  # until a signal cancels this task


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)
