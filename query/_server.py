"""The ``accord query`` process: the read model (:class:`QueryApp`), ``accord.v1.Query``
over gRPC with health checking and reflection, ``/healthz`` (and the console) over
HTTP, shards found through etcd or given as addresses, and the service's own leased
registration in etcd::

    /accord/v1/query/<instance-id>  ->  {"address": "HOST:PORT", "http": "HOST:PORT"}

``POST /rebuild`` on the HTTP side rebuilds the read model while it keeps serving
(:meth:`QueryApp.rebuild`); it answers the rebuild's JSON summary once swapped in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web
from grpc import aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

import accord.v1 as pb
from accord.common.auth import AuthSettings
from accord.common.grpc_safe import add_health, add_reflection, add_servicer
from accord.common.telemetry import Telemetry
from accord.common.transport import TransportSettings, bind, https_context, make_server
from accord.query._app import DEFAULT_MAX_LAG_EVENTS, QueryApp
from accord.query._http import ConsoleOptions, build_http_app
from accord.query._service import QueryServicer
from accord.query._store import open_store
from accord.registry import (
    COORDINATORS,
    SHARDS,
    Etcd,
    PrefixCache,
    Registration,
    dialable,
    parse_coordinators,
    shard_map,
)
from accord.registry._etcd import ROOT

log = logging.getLogger("accord.query")

QUERY = ROOT + "query/"


def query_key(instance_id: str) -> str:
    return f"{QUERY}{instance_id}"


def query_value(address: str, http: str) -> bytes:
    return json.dumps({"address": address, "http": http}, separators=(",", ":")).encode()


@dataclass(frozen=True, kw_only=True)
class QuerySettings:
    listen: str = "127.0.0.1:7300"
    db: str = "accord-query.db"
    #: ``ADDR`` or ``SHARD=ADDR`` each (instead of etcd).
    coordinators: tuple[str, ...] = ()
    etcd: str = ""
    #: ``HOST:PORT`` for /healthz and the console ("" = no HTTP server).
    http: str = ""
    instance_id: str = "query-1"
    advertise: str = ""
    ttl_s: int = 5
    max_lag_events: int = DEFAULT_MAX_LAG_EVENTS
    grace_s: float = 2.0
    resync_s: float = 2.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The console's ``--trace-url`` (``{trace_id}`` replaced; "" = no link) and
    #: ``--console-actions`` (retry/cancel a saga from the console).
    trace_url: str = ""
    console_actions: bool = False
    #: Callers' tokens (gRPC Query API and the console's /api/): off when neither file
    #: is given.
    auth: AuthSettings = field(default_factory=AuthSettings)

    def check(self) -> None:
        if bool(self.coordinators) == bool(self.etcd):
            raise ValueError("give --etcd URL or --coordinator ADDR (repeatable), not both")


class QueryServer:
    """``async with QueryServer(settings) as srv:`` serves on ``srv.port`` (gRPC) and
    ``srv.http_port``; leaving the block stops it. ``stop()`` is safe to call twice."""

    def __init__(
        self,
        settings: QuerySettings,
        *,
        transport: TransportSettings | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        settings.check()
        self.settings = settings
        self._transport = transport or TransportSettings.from_env()
        self.app = QueryApp(
            open_store(settings.db),
            coordinators=settings.coordinators,
            transport=self._transport,
            telemetry=telemetry,
            max_lag_events=settings.max_lag_events,
        )
        self.port = 0
        self.http_port = 0
        self.http_app: web.Application | None = None
        self._server: aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._etcd: Etcd | None = None
        self._caches: list[PrefixCache] = []
        self._registration: Registration | None = None
        self._coords: Mapping[str, bytes] = {}
        self._shards: Mapping[str, bytes] | None = None
        self._stopped = False

    async def start(self) -> None:
        s = self.settings
        auth = s.auth.build()  # a bad token file or key stops start-up (one line)
        await self.app.start()
        if s.etcd:
            await self._follow_etcd()
        server, _ = make_server(self._transport)
        self._server = server
        self.port = bind(server, s.listen, self._transport)
        # Requests that do not decode: INVALID_ARGUMENT, one log line per 10 s at most.
        add_servicer(
            pb.add_QueryServicer_to_server, QueryServicer(self.app, auth=auth), server, logger=log
        )
        health_servicer = add_health(server)
        names = (
            pb.query_pb2.DESCRIPTOR.services_by_name["Query"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        add_reflection(names, server)
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(names[0], health_pb2.HealthCheckResponse.SERVING)
        host = s.listen.rsplit(":", 1)[0]
        http_addr = ""
        if s.http:
            console = ConsoleOptions(
                trace_url=s.trace_url,
                actions=s.console_actions,
                transport=self._transport,
                auth=auth,
            )
            self.http_app = build_http_app(self.app, console=console)
            self.http_app.router.add_post("/rebuild", self._rebuild)
            self._runner = web.AppRunner(self.http_app, access_log=None)
            await self._runner.setup()
            hhost, _, hport = s.http.rpartition(":")
            # With TLS, the console is HTTPS with the same certificate (no client
            # certificate asked: browsers reach it).
            site = web.TCPSite(
                self._runner,
                hhost.strip("[]"),
                int(hport),
                ssl_context=https_context(self._transport) if self._transport.tls else None,
            )
            await site.start()
            self.http_port = int(self._runner.addresses[0][1])
            http_addr = f"{hhost}:{self.http_port}"
        if self._etcd is not None:
            address = s.advertise or f"{host}:{self.port}"
            self._registration = Registration(
                self._etcd,
                query_key(s.instance_id),
                query_value(dialable(address), http_addr),
                ttl_s=s.ttl_s,
            )
            await self._registration.start()
        log.info(
            "event=serving address=%s:%d http=%s db=%s shards_from=%s",
            host,
            self.port,
            http_addr or "-",
            s.db if "://" not in s.db else s.db.split("@")[-1],
            "etcd" if s.etcd else ",".join(s.coordinators),
        )

    async def _follow_etcd(self) -> None:
        etcd = Etcd(self.settings.etcd)
        await etcd.connect()
        self._etcd = etcd
        coords = PrefixCache(
            etcd, COORDINATORS, resync_s=self.settings.resync_s, on_change=self._on_coordinators
        )
        shards = PrefixCache(
            etcd, SHARDS, resync_s=self.settings.resync_s, on_change=self._on_shards
        )
        self._caches = [coords, shards]
        await shards.start()
        await coords.start()

    def _on_coordinators(self, items: Mapping[str, bytes]) -> None:
        self._coords = dict(items)
        self._refresh()

    def _on_shards(self, items: Mapping[str, bytes]) -> None:
        self._shards = dict(items)
        self._refresh()

    def _refresh(self) -> None:
        known = None
        if self._shards is not None:
            known = [k[len(SHARDS) : -len("/epoch")] for k in self._shards if k.endswith("/epoch")]
        m = shard_map(parse_coordinators(self._coords), known or [])
        self.app.set_owners({s: c.address for s, c in m.owners.items()}, known)

    async def _rebuild(self, request: web.Request) -> web.Response:
        try:
            out = await self.app.rebuild()
        except RuntimeError as e:
            return web.json_response({"error": str(e)}, status=409)
        except Exception as e:
            log.exception("event=rebuild_failed")
            return web.json_response({"error": f"rebuild failed: {e}"}, status=500)
        return web.json_response(out)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._registration is not None:
            await self._registration.close()
        for cache in self._caches:
            await cache.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.stop(self.settings.grace_s)
        await self.app.stop()
        if self._etcd is not None:
            await self._etcd.close()

    async def __aenter__(self) -> QueryServer:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(settings: QuerySettings, *, telemetry: Telemetry | None = None) -> None:
    """Runs the query service until SIGTERM or SIGINT. Prints ``http on HOST:PORT``
    (with --http), then ``listening on HOST:PORT``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with QueryServer(settings, telemetry=telemetry) as srv:
        host = settings.listen.rsplit(":", 1)[0]
        if srv.http_port:
            print(f"http on {settings.http.rsplit(':', 1)[0]}:{srv.http_port}", flush=True)
        print(f"listening on {host}:{srv.port}", flush=True)
        await stop.wait()
        log.info("event=stopping cause=signal")
