"""The coordinator's gRPC transport: handlers only translate between protobuf and the
engine's plain values (``_specs``, the ``Txn`` model), and one table maps domain errors
to status codes. Also the server's lifecycle:
open the WAL, replay it, serve, resume unfinished transactions, stop gracefully.

Who may call what (``accord.common.auth``): with auth configured, every client RPC checks
the caller's bearer token first, before anything is read, logged or kept (UNAUTHENTICATED
or PERMISSION_DENIED change nothing); a ``client`` sees and drives only the transactions
it started (another caller's gid is NOT_FOUND), a ``reader`` reads everything, an
``admin`` does everything. QueryOutcome takes no token: participants ask it (see the
README's "Callers and roles"). Health and reflection are open.

SIGTERM/SIGINT stop it in every state (:func:`serve`): waiting for etcd, waiting as a
standby for its shard, waiting for the WAL directory's lock, replaying, serving. The
start-up is cancelled where it waits, and what it holds is given back (the shard's
lease is revoked), so a stopped standby never takes its shard over."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context

import accord.v1 as pb
from accord.common.auth import (
    ANONYMOUS,
    Authenticator,
    AuthSettings,
    PermissionDenied,
    Principal,
    Role,
    Unauthenticated,
)
from accord.common.exits import ExitCode, StartupError
from accord.common.grpc_safe import add_health, add_reflection, add_servicer
from accord.common.runner import stop_on_signals
from accord.common.telemetry import Telemetry, incoming_context
from accord.common.transport import TransportSettings, bind, make_server
from accord.coordinator import _session
from accord.coordinator._calls import ParticipantCalls, Transport
from accord.coordinator._config import CoordinatorConfig
from accord.coordinator._engine import Engine
from accord.coordinator._errors import (
    AccordError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from accord.coordinator._failpoints import Failpoints
from accord.coordinator._feed import FeedHub, OutOfRange
from accord.coordinator._specs import branch_from_pb, saga_from_pb
from accord.coordinator._states import TxnState
from accord.coordinator._telemetry import CoordinatorTelemetry
from accord.coordinator.wal import WAL, WalLockedError
from accord.registry import (
    DEFAULT_TTL_S,
    EtcdRegistry,
    Registration,
    Registry,
    StaticRegistry,
    coordinator_key,
    coordinator_value,
    dialable,
)
from accord.registry._etcd import DEFAULT_ETCD_WAIT_S
from accord.registry._shard import Owner, ShardLease

log = logging.getLogger("accord.coordinator")

_STATUS: dict[type[AccordError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}

T = TypeVar("T")


def status_for(error: AccordError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = _STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


async def _guard(
    context: aio.ServicerContext[Any, Any], work: Awaitable[T], *, traced: bool = False
) -> T:
    """Runs a handler body; domain errors become their status, anything unexpected
    becomes INTERNAL with the traceback logged (never sent). ``traced``: the caller's
    trace context (from the metadata) is current while it runs, so a transaction it
    starts is a child of the caller's span."""
    if traced:
        parent = incoming_context(context.invocation_metadata())
        if parent is not None:
            otel_context.attach(parent)  # this handler's task only
    try:
        return await work
    except AccordError as e:
        await context.abort(status_for(e), str(e))
    except (asyncio.CancelledError, aio.AbortError):
        raise
    except Exception:
        log.exception("event=internal_error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the coordinator's log)")
    raise AssertionError("unreachable")


class CoordinatorServicer(pb.CoordinatorServicer):
    def __init__(
        self,
        engine: Engine,
        *,
        tracing: bool = False,
        feed: FeedHub | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self._e = engine
        self._traced = tracing
        self._feed = feed
        self._auth = auth
        #: Open WatchTransaction/Subscribe streams per caller (auth on only).
        self._watching: Counter[str] = Counter()
        #: Runs Session calls as the unary handlers run them.
        self._runner = _session.CallRunner(engine, status_for, traced=tracing)

    async def _caller(self, context: Any, *roles: Role) -> Principal:
        """The caller, when its token is valid and it holds one of ``roles``; otherwise
        the call ends here (UNAUTHENTICATED / PERMISSION_DENIED), having touched
        nothing. Nothing is logged: a flood of bad tokens must not flood the log."""
        if self._auth is None:
            return ANONYMOUS
        try:
            p = self._auth.from_metadata(context.invocation_metadata())
            p.require(*roles)
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except PermissionDenied as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        return p

    async def _guard_own(
        self,
        context: Any,
        gid: str,
        p: Principal,
        work: Callable[[], Awaitable[T]],
        *,
        traced: bool = False,
    ) -> T:
        """:func:`_guard` of ``work``, after checking that ``p`` may drive ``gid``: its
        own (or the caller ""'s), any for an admin; NOT_FOUND otherwise."""

        async def run() -> T:
            if not p.has(Role.ADMIN):
                self._e.get(gid, caller=p.caller)
            return await work()

        return await _guard(context, run(), traced=traced)

    async def Begin(self, request: pb.BeginRequest, context: Any) -> pb.BeginResponse:
        p = await self._caller(context, Role.CLIENT)
        txn = await _guard(
            context,
            self._e.begin(
                key=request.idempotency_key, timeout_ms=request.timeout_ms, caller=p.caller
            ),
            traced=self._traced,
        )
        return pb.BeginResponse(gid=txn.gid, deadline_unix_ms=txn.deadline_ms)

    async def Enlist(self, request: pb.EnlistRequest, context: Any) -> pb.EnlistResponse:
        p = await self._caller(context, Role.CLIENT)
        if not request.HasField("branch"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "branch is required")
        bid = await self._guard_own(
            context,
            request.gid,
            p,
            lambda: self._e.enlist(request.gid, branch_from_pb(request.branch)),
        )
        return pb.EnlistResponse(branch_id=bid)

    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.TransactionResponse:
        p = await self._caller(context, Role.CLIENT)
        txn = await self._guard_own(
            context, request.gid, p, lambda: self._e.commit(request.gid), traced=self._traced
        )
        return pb.TransactionResponse(transaction=txn.to_pb())

    async def Abort(self, request: pb.AbortRequest, context: Any) -> pb.TransactionResponse:
        p = await self._caller(context, Role.CLIENT)
        txn = await self._guard_own(
            context, request.gid, p, lambda: self._e.abort(request.gid, request.reason)
        )
        return pb.TransactionResponse(transaction=txn.to_pb())

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.TransactionResponse:
        p = await self._caller(context, Role.CLIENT)
        txn = await _guard(
            context,
            self._e.execute(
                key=request.idempotency_key,
                timeout_ms=request.timeout_ms,
                branches=[branch_from_pb(b) for b in request.branches],
                caller=p.caller,
            ),
            traced=self._traced,
        )
        return pb.TransactionResponse(transaction=txn.to_pb())

    async def StartSaga(self, request: pb.StartSagaRequest, context: Any) -> pb.TransactionResponse:
        p = await self._caller(context, Role.CLIENT)
        txn = await _guard(
            context,
            self._e.start_saga(
                key=request.idempotency_key,
                timeout_ms=request.timeout_ms,
                definition=saga_from_pb(request.definition),
                wait=request.wait,
                caller=p.caller,
            ),
            traced=self._traced,
        )
        return pb.TransactionResponse(transaction=txn.to_pb())

    async def CancelSaga(
        self, request: pb.CancelSagaRequest, context: Any
    ) -> pb.TransactionResponse:
        p = await self._caller(context, Role.CLIENT)
        txn = await self._guard_own(
            context, request.gid, p, lambda: self._e.cancel_saga(request.gid, request.reason)
        )
        return pb.TransactionResponse(transaction=txn.to_pb())

    async def RetryTransaction(
        self, request: pb.RetryTransactionRequest, context: Any
    ) -> pb.TransactionResponse:
        await self._caller(context, Role.ADMIN)
        txn = await _guard(context, self._e.retry(request.gid))
        return pb.TransactionResponse(transaction=txn.to_pb())

    async def GetTransaction(
        self, request: pb.GetTransactionRequest, context: Any
    ) -> pb.Transaction:
        p = await self._caller(context, Role.CLIENT, Role.READER)

        async def run() -> pb.Transaction:
            return self._e.get(request.gid, caller=p.scope).to_pb()

        return await _guard(context, run())

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Any
    ) -> pb.ListTransactionsResponse:
        p = await self._caller(context, Role.CLIENT, Role.READER)

        async def run() -> pb.ListTransactionsResponse:
            limits = self._e.config.limits
            if request.limit > limits.max_list:
                raise InvalidArgument(f"limit {request.limit} is over {limits.max_list}")
            try:
                states = [TxnState(s) for s in request.states]
            except ValueError as e:
                raise InvalidArgument(f"states: {e}") from None
            txns, token = self._e.list(
                states, request.limit or 100, request.page_token, caller=p.scope
            )
            return pb.ListTransactionsResponse(
                transactions=[t.to_pb() for t in txns], next_page_token=token
            )

        return await _guard(context, run())

    def _watch_slot(self, p: Principal) -> str | None:
        """Takes one of the caller's watcher slots; why not, when it has none left."""
        if not p.caller:
            return None
        limit = self._e.config.limits.max_watchers_per_caller
        if limit and self._watching[p.caller] >= limit:
            return (
                f"caller {p.caller!r} has {self._watching[p.caller]} watch/subscribe streams "
                f"open (limit {limit} per caller: --max-watchers-per-caller)"
            )
        self._watching[p.caller] += 1
        return None

    def _watch_done(self, p: Principal) -> None:
        if p.caller:
            self._watching[p.caller] -= 1
            if self._watching[p.caller] <= 0:
                del self._watching[p.caller]

    async def WatchTransaction(
        self, request: pb.WatchTransactionRequest, context: Any
    ) -> AsyncIterator[pb.TransactionEvent]:
        p = await self._caller(context, Role.CLIENT, Role.READER)
        full = self._watch_slot(p)
        if full is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, full)
            return
        try:
            try:
                stream = self._e.watch(request.gid, caller=p.scope)
                first = await anext(stream)
            except AccordError as e:
                await context.abort(status_for(e), str(e))
                return
            yield first
            async for event in stream:
                yield event
        finally:
            self._watch_done(p)

    async def QueryOutcome(
        self, request: pb.QueryOutcomeRequest, context: Any
    ) -> pb.QueryOutcomeResponse:
        async def run() -> pb.QueryOutcomeResponse:
            return pb.QueryOutcomeResponse(outcome=self._e.query_outcome(request.gid))  # type: ignore[arg-type]

        return await _guard(context, run())

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: Any
    ) -> AsyncIterator[pb.SubscribeResponse]:
        p = await self._caller(context, Role.READER)
        feed = self._feed
        if feed is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server has no event feed")
            return
        full = self._watch_slot(p)
        if full is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, full)
            return
        stream = feed.stream(request.from_lsn, request.max_batch)
        try:
            async for response in stream:
                yield response
        except OutOfRange as e:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
        except AccordError as e:
            await context.abort(status_for(e), str(e))
        finally:
            self._watch_done(p)
            await stream.aclose()
        # The hub closed: the coordinator is stopping (resubscribe from the last LSN).
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is stopping")

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: Any
    ) -> AsyncIterator[pb.SessionResponse]:
        """Execute/StartSaga/Commit/Abort calls over one stream (``_session``): each
        answered with the unary RPC's response or status."""
        try:
            caller = _session.Caller(self._auth, context.invocation_metadata())
        except Unauthenticated as e:
            # Take the client's first message before ending the stream: a stream ended
            # while that write is still on its way can reach the client as a local
            # "INTERNAL: Internal error from Core" instead of this status (seen about 1
            # in 20 times).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(request_iterator)), 1.0)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            return
        session = _session.Session(
            self._runner, caller, max_calls=self._e.config.limits.max_session_calls
        )
        async for response in session.serve(request_iterator):
            yield response


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    listen: str = "127.0.0.1:7070"
    wal_dir: Path = Path("accord-wal")
    config: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    grace_s: float = 5.0
    #: Lease TTL of the coordinator's own registration and of its shard (with etcd).
    registration_ttl_s: int = DEFAULT_TTL_S
    #: After taking a shard over, how long to wait for the former owner's WAL lock.
    takeover_wait_s: float = 300.0
    #: With etcd: how long to wait at start-up for etcd's first answer before giving up.
    etcd_wait_s: float = DEFAULT_ETCD_WAIT_S
    #: Keep the WAL's SYNCED marker (chaos testing: lets a power loss be simulated).
    wal_sync_marker: bool = False
    #: How participant calls travel: one stream per participant address (``stream``),
    #: one RPC per call (``unary``), or streams where supported (``auto``).
    participant_transport: Transport = Transport.AUTO
    #: Bearer tokens (``accord.common.auth``): off unless a token file or JWT key is given.
    auth: AuthSettings = field(default_factory=AuthSettings)


#: Exit status of a coordinator that stopped because another one owns its shard now.
EXIT_FENCED = ExitCode.FENCED


class WalLockedStartupError(StartupError):
    """The WAL directory is held by another coordinator (its pid in the message)."""


def _fail_stop(exc: BaseException) -> None:
    """The WAL could not make a record durable: stop now, answer nothing more."""
    log.critical("event=wal_failure action=fail-stop error=%r", str(exc))
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    os._exit(ExitCode.WAL_FAILURE)


def _fenced_stop(_why: str) -> None:
    """Another coordinator owns the shard: exit at once (the reason is logged already)."""
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    os._exit(EXIT_FENCED)


class CoordinatorServer:
    """``async with CoordinatorServer(settings, registry=...) as srv:`` opens the WAL,
    replays it, serves on ``srv.port`` and drives recovery; leaving the block stops
    gracefully. ``stop()`` is safe to call twice."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        registry: Registry | None = None,
        transport: TransportSettings | None = None,
        failpoints: Failpoints | None = None,
        on_fatal: Callable[[BaseException], None] = _fail_stop,
        on_fenced: Callable[[str], None] = _fenced_stop,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = CoordinatorTelemetry(telemetry)
        self._registry = registry or StaticRegistry()
        self._transport = transport or TransportSettings.from_env()
        self._fp = failpoints if failpoints is not None else Failpoints.from_env()
        self._on_fatal = on_fatal
        self.port = 0
        self.engine: Engine | None = None
        self._server: aio.Server | None = None
        self._wal: WAL | None = None
        self._calls: ParticipantCalls | None = None
        self._stopped = False
        self.registration: Registration | None = None
        self.shard: ShardLease | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._on_fenced = on_fenced
        #: The event feed (Subscribe): made before the WAL opens, which feeds it.
        self.feed: FeedHub | None = None

    async def start(self) -> None:
        s = self.settings
        auth = s.auth.build()  # a bad token file or key stops start-up (one line)
        server, _ = make_server(self._transport)
        self._server = server
        self.port = bind(server, s.listen, self._transport)
        host = s.listen.rsplit(":", 1)[0]
        config = s.config
        if not config.advertise_address:
            config = replace(config, advertise_address=f"{host}:{self.port}")
        if isinstance(self._registry, EtcdRegistry):
            await self._registry.etcd.wait_reachable(s.etcd_wait_s)
        await self._registry.start()
        if isinstance(self._registry, EtcdRegistry):
            # The shard is owned through etcd: a standby waits here until the owner's
            # lease ends, and every owner gets a higher fencing epoch.
            self.shard = ShardLease(
                self._registry.etcd,
                config.shard,
                owner_id=config.coordinator_id,
                address=dialable(config.advertise_address),
                ttl_s=s.registration_ttl_s,
            )
            epoch = await self.shard.acquire(on_wait=self._on_standby)
            config = replace(config, epoch=epoch)
            self._watchers.append(asyncio.get_running_loop().create_task(self._watch_shard()))
        self.feed = FeedHub(
            config.shard,
            s.wal_dir,
            telemetry=self.telemetry,
            max_subscribers=config.limits.max_subscribers,
        )
        wal, recovered = await self._open_wal()
        self._wal = wal
        for note in recovered.repaired:
            log.warning("event=wal_repaired note=%r", note)
        self._calls = ParticipantCalls(
            registry=self._registry,
            transport=self._transport,
            on_fenced=self._fenced,
            mode=s.participant_transport,
            on_fallback=self.telemetry.on_stream_fallback,
            on_stream_open=self.telemetry.on_stream_open,
            may_act=self.shard.may_act if self.shard is not None else None,
        )
        engine = Engine(
            wal=wal,
            calls=self._calls,
            config=config,
            failpoints=self._fp,
            telemetry=self.telemetry,
        )
        await engine.replay_yielding(
            recovered.checkpoint, [(r.lsn, r.rtype, r.payload) for r in recovered.records]
        )
        self.engine = engine
        # Requests that do not decode: INVALID_ARGUMENT, one log line per 10 s at most.
        add_servicer(
            pb.add_CoordinatorServicer_to_server,
            CoordinatorServicer(engine, tracing=self.telemetry.tracing, feed=self.feed, auth=auth),
            server,
            logger=log,
        )
        health_servicer = add_health(server)
        names = (
            pb.coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        add_reflection(names, server)
        await server.start()
        pending = await engine.resume()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(names[0], health_pb2.HealthCheckResponse.SERVING)
        if isinstance(self._registry, EtcdRegistry):
            # Clients that find coordinators through etcd see this one from now on.
            self.registration = Registration(
                self._registry.etcd,
                coordinator_key(config.coordinator_id),
                coordinator_value(dialable(config.advertise_address), config.shard, config.epoch),
                ttl_s=s.registration_ttl_s,
            )
            await self.registration.start()
        log.info(
            "event=serving coordinator=%s address=%s:%d wal=%s replayed=%d unfinished=%d",
            config.coordinator_id,
            host,
            self.port,
            s.wal_dir,
            len(recovered.records),
            pending,
        )

    def _on_standby(self, owner: Owner) -> None:
        print(
            f"standby for shard {self.settings.config.shard} "
            f"(owner {owner.owner_id}, epoch {owner.epoch})",
            flush=True,
        )

    async def _open_wal(self) -> tuple[WAL, Any]:
        """Opens the WAL; after a takeover, waits for the former owner to let go of the
        directory's lock (a paused process holds it until it wakes and stops)."""
        s = self.settings
        deadline = asyncio.get_running_loop().time() + s.takeover_wait_s
        waited = False
        while True:
            try:
                return await WAL.open(
                    s.wal_dir,
                    segment_size=s.config.segment_size,
                    failpoints=self._fp,
                    on_fatal=self._on_fatal,
                    on_sync=self.telemetry.on_wal_sync,
                    sync_marker=s.wal_sync_marker,
                    feed=self.feed,
                )
            except WalLockedError as e:
                if self.shard is None:
                    # Static mode: nothing to wait for; another coordinator runs there.
                    raise WalLockedStartupError(str(e)) from None
                if asyncio.get_running_loop().time() > deadline:
                    raise WalLockedStartupError(
                        f"{e} (waited {s.takeover_wait_s:g} s after taking shard "
                        f"{self.shard.shard} over)"
                    ) from None
                if not waited:
                    waited = True
                    log.warning(
                        "event=wal_lock_wait shard=%s wal=%s (the former owner still holds "
                        "it) error=%r",
                        self.shard.shard,
                        s.wal_dir,
                        str(e),
                    )
                await asyncio.sleep(0.2)

    async def _watch_shard(self) -> None:
        assert self.shard is not None
        await self.shard.lost.wait()
        self._fenced(f"lost the lease of shard {self.shard.shard} (epoch {self.shard.epoch})")

    def _fenced(self, why: str) -> None:
        """Another coordinator owns this shard now: stop at once, answer nothing more."""
        log.critical("event=fenced action=stop reason=%r", why)
        self._on_fenced(why)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in self._watchers:
            task.cancel()
        if self.registration is not None:
            await self.registration.close()
        self._close_feed()
        if self._server is not None:
            await self._server.stop(self.settings.grace_s)
        if self.engine is not None:
            await self.engine.close()
        if self._calls is not None:
            await self._calls.close()
        if self._wal is not None:
            await self._wal.close()
        if self.shard is not None:
            await self.shard.close()  # after the WAL is closed: a successor may open it
        await self._registry.close()

    def _close_feed(self) -> None:
        """Ends the Subscribe streams (UNAVAILABLE), so a stop does not wait out the
        grace period for subscribers that would never leave on their own."""
        if self.feed is not None:
            self.feed.close()

    async def __aenter__(self) -> CoordinatorServer:
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


#: The cyclic garbage collector's thresholds while serving (CPython's default is
#: (700, 10, 10)). A transaction allocates hundreds of short-lived objects (tasks,
#: futures, messages), and every collection of the oldest generation walks every
#: finished transaction kept for look-ups, so with the defaults the engine's CPU per
#: transaction grew with the number kept: ``python -m bench.engine --default-gc`` gave
#: 311, 345, 371 us per transaction in three rounds of 20 000; with these (and
#: ``gc.freeze`` after start-up) 311, 305, 288 us.
GC_THRESHOLDS = (20_000, 50, 50)


def tune_gc() -> None:
    """Called once start-up (recovery included) is done: what start-up allocated leaves
    the collector's sight (``gc.freeze``) and collections become rarer. Young cycles are
    still collected every ``GC_THRESHOLDS[0]`` allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(
    settings: ServerSettings,
    *,
    registry: Registry | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Runs a coordinator until SIGTERM or SIGINT, which stop it in any state (start-up
    included: see the module's docstring); returns normally then. Prints ``listening on
    HOST:PORT``. The caller owns ``telemetry`` (and shuts it down after this returns)."""
    server = CoordinatorServer(settings, registry=registry, telemetry=telemetry)
    async with stop_on_signals() as signalled, server as srv:
        host = settings.listen.rsplit(":", 1)[0]
        tune_gc()
        print(f"listening on {host}:{srv.port}", flush=True)
        await asyncio.Event().wait()  # until a signal cancels this task
    log.info("event=stopped cause=%s", signalled.signal or "return")
