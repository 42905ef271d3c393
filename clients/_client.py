"""The client SDK: run a 2PC from another service in a few lines.

    async with AccordClient("127.0.0.1:7070") as accord:
        result = await accord.execute([
            Branch(service="bank-a", operation="debit", payload={"account": "a-1", "amount": 5}),
            Branch(service="bank-b", operation="credit", payload={"account": "b-1", "amount": 5}),
        ], idempotency_key="order-42")
        assert result.committed

Protobuf stays at the edge: results are plain frozen dataclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from google.protobuf import json_format
from grpc import aio
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

import accord.v1 as pb
from accord.client._errors import (
    AccordClientError,
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    TransactionAborted,
    UnavailableError,
    from_rpc_error,
)
from accord.client._session import DEFAULT_THRESHOLD, SessionStub
from accord.client._states import FINAL_STATES, TxnState
from accord.client._tracing import TracedStub, recording
from accord.common.auth import bearer_metadata, check_token_destination
from accord.common.gid import KeyPlacement, place_key, shard_of
from accord.common.transport import TransportSettings, make_channel

if TYPE_CHECKING:
    from accord.registry import Etcd, KeptOutcome, ShardState

T = TypeVar("T")
StubCall = Callable[[pb.CoordinatorStub], Awaitable[T]]

log = logging.getLogger("accord.client")

#: A sharded client re-reads etcd at least this often (new shards, moved owners) ...
SHARD_MAP_MAX_AGE_S = 10.0
#: ... and, after a failure, at most this often.
SHARD_MAP_MIN_AGE_S = 0.25

_BRANCH_STATE_NAMES = {v: k.removeprefix("BRANCH_STATE_") for k, v in pb.BranchState.items()}
_PROTOCOL_NAMES = {v: k.removeprefix("PROTOCOL_") for k, v in pb.Protocol.items()}


@dataclass(frozen=True, kw_only=True)
class Branch:
    """One branch: an operation on a participant service (by registry name) or address."""

    operation: str
    service: str = ""
    address: str = ""
    payload: bytes | dict[str, Any] | list[Any] = b""
    branch_id: str = ""

    def to_pb(self) -> pb.Branch:
        payload = self.payload
        if not isinstance(payload, bytes):
            payload = json.dumps(payload, separators=(",", ":")).encode()
        return pb.Branch(
            service=self.service,
            address=self.address,
            operation=self.operation,
            payload=payload,
            branch_id=self.branch_id,
        )


def _encode(payload: bytes | dict[str, Any] | list[Any] | str) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass(frozen=True, kw_only=True)
class SagaStep:
    """One saga step: an action and its compensation on a participant service."""

    name: str
    action: str
    compensation: str = ""
    service: str = ""
    address: str = ""
    payload: bytes | dict[str, Any] | list[Any] | str = b""
    #: Sent with the compensation; the action's payload when None.
    compensation_payload: bytes | dict[str, Any] | list[Any] | str | None = None
    depends_on: tuple[str, ...] = ()
    pivot: bool = False
    timeout_ms: int = 0
    max_attempts: int = 0
    initial_interval_ms: int = 0
    max_interval_ms: int = 0
    multiplier: float = 0.0
    final_codes: tuple[str, ...] = ()

    def to_pb(self) -> pb.SagaStep:
        return pb.SagaStep(
            name=self.name,
            service=self.service,
            address=self.address,
            action=self.action,
            compensation=self.compensation,
            payload=_encode(self.payload),
            compensation_payload=b""
            if self.compensation_payload is None
            else _encode(self.compensation_payload),
            depends_on=list(self.depends_on),
            retry=pb.RetryPolicy(
                initial_interval_ms=self.initial_interval_ms,
                multiplier=self.multiplier,
                max_interval_ms=self.max_interval_ms,
                max_attempts=self.max_attempts,
                final_codes=list(self.final_codes),
            ),
            timeout_ms=self.timeout_ms,
            pivot=self.pivot,
        )

    @classmethod
    def from_pb(cls, st: pb.SagaStep) -> SagaStep:
        return cls(
            name=st.name,
            action=st.action,
            compensation=st.compensation,
            service=st.service,
            address=st.address,
            payload=st.payload,
            compensation_payload=st.compensation_payload or None,
            depends_on=tuple(st.depends_on),
            pivot=st.pivot,
            timeout_ms=st.timeout_ms,
            max_attempts=st.retry.max_attempts,
            initial_interval_ms=st.retry.initial_interval_ms,
            max_interval_ms=st.retry.max_interval_ms,
            multiplier=st.retry.multiplier,
            final_codes=tuple(st.retry.final_codes),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SagaStep:
        """From the JSON form used by ``accord txn saga --file``: ``accord.v1.SagaStep``
        in protobuf's JSON mapping (``depends_on`` or ``dependsOn``, ``retry`` a
        RetryPolicy), except that a payload is a JSON value or text, not base64."""
        if not isinstance(d, dict):
            raise ValueError(f"a step must be a JSON object, not {d!r}")
        fields = {k: v for k, v in d.items() if k not in _PAYLOAD_FIELDS}
        try:
            st = json_format.ParseDict(fields, pb.SagaStep())
        except json_format.ParseError as e:
            raise ValueError(f"step {d.get('name')!r}: {e}") from None
        for key, field_name in _PAYLOAD_FIELDS.items():
            if key in d:
                setattr(st, field_name, _encode(d[key]))
        return cls.from_pb(st)


#: The payload fields of a step's JSON (both spellings of protobuf's JSON mapping): any
#: JSON value, or text sent as it is (protobuf's own mapping would want base64).
_PAYLOAD_FIELDS = {
    "payload": "payload",
    "compensation_payload": "compensation_payload",
    "compensationPayload": "compensation_payload",
}


@dataclass(frozen=True, kw_only=True)
class StepResult:
    name: str
    service: str
    address: str
    action: str
    state: str
    attempts: int
    compensation_attempts: int
    last_error: str
    result: bytes


@dataclass(frozen=True, kw_only=True)
class BranchResult:
    branch_id: str
    service: str
    address: str
    operation: str
    state: str
    attempts: int
    last_error: str


@dataclass(frozen=True, kw_only=True)
class TxnResult:
    gid: str
    #: A :class:`TxnState` (its name as text if this client does not know the state).
    state: str
    reason: str = ""
    lsn: int = 0
    idempotency_key: str = ""
    one_phase: bool = False
    created_unix_ms: int = 0
    deadline_unix_ms: int = 0
    branches: tuple[BranchResult, ...] = field(default=())
    steps: tuple[StepResult, ...] = field(default=())
    protocol: str = "TWO_PHASE_COMMIT"

    @property
    def committed(self) -> bool:
        """The commit decision is durable (phase two may still be finishing)."""
        return self.state in (TxnState.COMMITTED, TxnState.COMMITTING)

    @property
    def aborted(self) -> bool:
        return self.state in (TxnState.ABORTED, TxnState.ABORTING)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def completed(self) -> bool:
        return self.state == TxnState.COMPLETED

    @property
    def compensated(self) -> bool:
        return self.state == TxnState.COMPENSATED

    @property
    def stuck(self) -> bool:
        return self.state == TxnState.STUCK

    @classmethod
    def from_pb(cls, t: pb.Transaction) -> TxnResult:
        return cls(
            gid=t.gid,
            state=TxnState.from_pb(t.state),
            reason=t.reason,
            lsn=t.lsn,
            idempotency_key=t.idempotency_key,
            one_phase=t.one_phase,
            created_unix_ms=t.created_unix_ms,
            deadline_unix_ms=t.deadline_unix_ms,
            branches=tuple(
                BranchResult(
                    branch_id=b.branch.branch_id,
                    service=b.branch.service,
                    address=b.resolved_address or b.branch.address,
                    operation=b.branch.operation,
                    state=_BRANCH_STATE_NAMES.get(b.state, str(b.state)),
                    attempts=b.attempts,
                    last_error=b.last_error,
                )
                for b in t.branches
            ),
            steps=tuple(
                StepResult(
                    name=st.step.name,
                    service=st.step.service,
                    address=st.resolved_address or st.step.address,
                    action=st.step.action,
                    state=_BRANCH_STATE_NAMES.get(st.state, str(st.state)),
                    attempts=st.attempts,
                    compensation_attempts=st.compensation_attempts,
                    last_error=st.last_error,
                    result=st.result,
                )
                for st in t.steps
            ),
            protocol=_PROTOCOL_NAMES.get(t.protocol, str(t.protocol)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "gid": self.gid,
            "state": self.state,
            "reason": self.reason,
            "lsn": self.lsn,
            "idempotency_key": self.idempotency_key,
            "one_phase": self.one_phase,
            "created_unix_ms": self.created_unix_ms,
            "deadline_unix_ms": self.deadline_unix_ms,
            "protocol": self.protocol,
            "branches": [b.__dict__ for b in self.branches],
            "steps": [
                {**st.__dict__, "result": st.result.decode(errors="replace")} for st in self.steps
            ],
        }


async def _call(work: Callable[[], Awaitable[T]]) -> T:
    try:
        return await work()
    except aio.AioRpcError as e:
        raise from_rpc_error(e) from e


class Transaction:
    """An interactive 2PC transaction: enlist branches, then commit or abort."""

    def __init__(self, client: AccordClient, gid: str) -> None:
        self.client = client
        self.gid = gid

    async def enlist(self, branch: Branch) -> str:
        return await self.client.enlist(self.gid, branch)

    async def commit(self) -> TxnResult:
        return await self.client.commit(self.gid)

    async def abort(self, reason: str = "") -> TxnResult:
        return await self.client.abort(self.gid, reason)


class _TransactionScope:
    def __init__(self, client: AccordClient, timeout_ms: int, key: str) -> None:
        self._client, self._timeout_ms, self._key = client, timeout_ms, key
        self.tx: Transaction | None = None
        self.result: TxnResult | None = None

    async def __aenter__(self) -> Transaction:
        self.tx = await self._client.begin(timeout_ms=self._timeout_ms, idempotency_key=self._key)
        return self.tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.tx is not None
        if exc is not None:
            with contextlib.suppress(AccordClientError):
                await self.tx.abort(f"client error: {exc_type.__name__ if exc_type else ''}")
            return
        self.result = await self.tx.commit()
        if not self.result.committed:
            raise TransactionAborted(f"transaction {self.tx.gid} aborted: {self.result.reason}")


class _TokenStub:
    """Wraps a ``CoordinatorStub``: every call (unary and streaming) carries the bearer
    token in its ``authorization`` metadata, beside any metadata the caller gives."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        extra = self._metadata

        def call(request: Any, **kw: Any) -> Any:
            kw["metadata"] = (*(kw.get("metadata") or ()), *extra)
            return method(request, **kw)

        return call


@dataclass(frozen=True)
class _Conn:
    address: str
    channel: aio.Channel
    #: A :class:`SessionStub` (Execute/StartSaga/Commit/Abort may go on its session).
    stub: pb.CoordinatorStub

    async def close(self, grace: float | None = None) -> None:
        await cast(SessionStub, self.stub).close()
        await self.channel.close(grace)


class AccordClient:
    """Async client of Accord. Use as ``async with`` or call :meth:`close`.

    ``AccordClient(address)`` talks to one coordinator. ``await
    AccordClient.from_etcd(url)`` is *sharded*: it talks to the owner of every shard
    registered in etcd, spreads new transactions over them, and sends every call about
    a gid to the shard that made it (see :meth:`from_etcd`)."""

    def __init__(
        self,
        address: str,
        *,
        transport: TransportSettings | None = None,
        timeout_s: float = 60.0,
        connect: bool = True,
        tracer_provider: TracerProvider | None = None,
        token: str = "",
        session: str = "auto",
        session_threshold: int = DEFAULT_THRESHOLD,
    ) -> None:
        """``tracer_provider``: where client spans go (default: the global provider);
        each call then carries its span's W3C context to the coordinator. ``token``: a
        bearer token sent with every call (coordinators with auth on require one); it is
        sent only over TLS or to a loopback address (:class:`TokenRefused` otherwise).

        ``session``: how Execute, StartSaga, Commit and Abort travel: ``"auto"`` (the
        default) on one ``Coordinator/Session`` stream per coordinator while
        ``session_threshold`` or more of them are in flight, else as unary calls;
        ``"unary"`` never on the stream; ``"session"`` always. Results, errors and
        retry-safety are the same either way (see ``accord.client._session``)."""
        if session not in ("auto", "unary", "session"):
            raise ValueError(f"session must be auto, unary or session, not {session!r}")
        if session_threshold < 1:
            raise ValueError(f"session_threshold must be >= 1, not {session_threshold}")
        self._session_mode = session
        self._session_threshold = session_threshold
        self.address = address
        self._transport = transport
        self._token = token
        self._tracer_provider = tracer_provider
        self._timeout = timeout_s
        self._etcd = ""
        self._coordinator_id = ""
        self._shard = ""
        self._channel: aio.Channel | None = None
        # Sharded mode (from_etcd without a coordinator or shard): one connection per
        # shard owner, the live shards, the live ones that take new keyless
        # transactions (not retired), every known one (sorted), the retired ones, each
        # known shard's state (for messages), a round-robin counter for keyless new
        # transactions, and one etcd client (shard map, kept outcomes of retired shards).
        self._sharded = False
        self._conns: dict[str, _Conn] = {}
        self._live: tuple[str, ...] = ()
        self._serving: tuple[str, ...] = ()
        self._known: tuple[str, ...] = ()
        self._retired: frozenset[str] = frozenset()
        self._states: dict[str, ShardState] = {}
        self._etcd_client: Etcd | None = None
        self._rr = 0
        self._map_at = 0.0
        self._map_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._conn: _Conn | None = None
        if connect:
            self._connect(address)

    def _open(self, address: str) -> _Conn:
        if self._token:
            t = self._transport or TransportSettings.from_env()
            check_token_destination(address, secure=t.tls or t.ca is not None)
        channel = make_channel(address, self._transport)
        raw = pb.CoordinatorStub(channel)
        stub = raw
        if self._token:
            stub = cast(pb.CoordinatorStub, _TokenStub(stub, bearer_metadata(self._token)))
        tracer = None
        if recording(self._tracer_provider):
            tracer = trace.get_tracer("accord.client", tracer_provider=self._tracer_provider)
            stub = cast(pb.CoordinatorStub, TracedStub(stub, tracer))
        session = SessionStub(
            stub,
            raw,
            mode=self._session_mode,
            threshold=self._session_threshold,
            metadata=bearer_metadata(self._token),
            tracer=tracer,
        )
        return _Conn(address, channel, cast(pb.CoordinatorStub, session))

    def _connect(self, address: str) -> None:
        conn = self._open(address)
        self._conn = conn
        self.address, self._channel, self._stub = address, conn.channel, conn.stub

    @classmethod
    async def from_etcd(
        cls,
        etcd: str,
        *,
        coordinator_id: str = "",
        shard: str = "",
        transport: TransportSettings | None = None,
        timeout_s: float = 60.0,
        tracer_provider: TracerProvider | None = None,
        token: str = "",
        session: str = "auto",
        session_threshold: int = DEFAULT_THRESHOLD,
    ) -> AccordClient:
        """A client of the coordinators registered in etcd (``token``: as in the
        constructor, sent to every coordinator).

        With ``coordinator_id`` or ``shard``: a client of that one coordinator (or of
        the shard's current owner); :meth:`reconnect` finds it again after a failover.

        With neither: a sharded client of every shard's owner. New transactions go
        round robin over the live shards that are not retired; one with an
        idempotency key always goes to the key's shard (rendezvous hashing over every
        shard that has ever had an owner, so a retry reaches the shard that saw the
        first attempt, or fails with ``UNAVAILABLE`` while that shard has no owner).
        Calls about a gid go to the shard named in the gid (an older gid that names
        none: to each shard in turn). After ``UNAVAILABLE`` the client reads etcd
        again before raising, so a retry reaches a standby that took the shard over;
        it also re-reads every :data:`SHARD_MAP_MAX_AGE_S` to see new shards.

        A shard retired with ``accord shard retire`` stays in the ranking (no key
        moves), but a key ranked first on it is answered from the outcome the shard
        kept for that key, if any (one etcd read: gid and state, what a retry of the
        first request would have got from its coordinator), and otherwise goes to the
        next shard of its ranking that is not retired. One check is lost: a
        coordinator refuses a key reused for a *different* request (``ALREADY_EXISTS``),
        but a kept outcome records no request, so such a reuse gets the kept outcome
        (only a 2PC/saga mismatch is still refused). Calls about a gid of a retired
        shard answer from its kept outcome (``get``, ``watch``, and a repeated
        ``commit``/``abort``); a gid without an idempotency key was not kept:
        ``NOT_FOUND`` saying so. All of it is read from etcd, so it holds across
        client restarts.

        Raises :class:`UnavailableError` when no coordinator is registered."""
        client = cls(
            "",
            transport=transport,
            timeout_s=timeout_s,
            connect=False,
            tracer_provider=tracer_provider,
            token=token,
            session=session,
            session_threshold=session_threshold,
        )
        client._etcd, client._coordinator_id, client._shard = etcd, coordinator_id, shard
        client._sharded = not coordinator_id and not shard
        await client.reconnect()
        return client

    @property
    def shards(self) -> dict[str, str]:
        """Sharded client: the address of each live shard's owner, as last read."""
        return {s: c.address for s, c in self._conns.items()}

    async def reconnect(self) -> str:
        """Finds the coordinator again in etcd (after ``UNAVAILABLE``: a standby may own
        the shard now) and switches to it; returns its address (a sharded client: reads
        the shard map again; returns every owner's address, comma-separated). Without
        etcd, a no-op."""
        import random

        from accord.registry import find_coordinators

        if not self._etcd:
            return self.address
        if self._sharded:
            await self._reload_map()
            return self.address
        try:
            live = await find_coordinators(self._etcd)
        except ConnectionError as e:
            raise UnavailableError(str(e)) from e
        if self._coordinator_id:
            live = [c for c in live if c.coordinator_id == self._coordinator_id]
        if self._shard:
            live = [c for c in live if c.shard == self._shard]
            # The owner with the highest epoch is the current one.
            live = [c for c in live if c.epoch == max(x.epoch for x in live)]
        if not live:
            wanted = self._coordinator_id or (f"of shard {self._shard}" if self._shard else "")
            raise UnavailableError(
                f"no live coordinator{' ' + wanted if wanted else ''} registered in etcd "
                f"at {self._etcd}"
            )
        if self.address not in {c.address for c in live}:
            chosen = random.choice(live)
            old = self._conn
            self._connect(chosen.address)
            if old is not None:
                await old.close()
        return self.address

    # ------------------------------------------------------------ shard routing

    async def _etcd_conn(self) -> Etcd:
        """The sharded client's one etcd client, connected on first use."""
        # etcd's client is a dependency of the registry, not of the SDK: only a client
        # made with from_etcd needs it.
        from accord.registry import Etcd

        if self._etcd_client is None:
            client = Etcd(self._etcd)
            try:
                await client.connect()
            except Exception as e:
                raise UnavailableError(f"etcd at {self._etcd} unreachable: {e}") from e
            self._etcd_client = client
        return self._etcd_client

    async def _reload_map(self) -> None:
        from accord.registry import find_shards

        try:
            m = await find_shards(self._etcd, etcd=await self._etcd_conn())
        except ConnectionError as e:
            raise UnavailableError(str(e)) from e
        if not m.owners and not m.retired:
            raise UnavailableError(f"no live coordinator registered in etcd at {self._etcd}")
        conns: dict[str, _Conn] = {}
        for shard, info in sorted(m.owners.items()):
            old = self._conns.get(shard)
            keep = old is not None and old.address == info.address
            conns[shard] = old if keep and old is not None else self._open(info.address)
        stale = [c for s, c in self._conns.items() if conns.get(s) is not c]
        self._conns, self._live, self._known = conns, tuple(conns), m.known
        self._serving, self._retired, self._states = m.serving, m.retired, m.states
        self.address = ",".join(c.address for c in conns.values())
        self._map_at = time.monotonic()
        for c in stale:
            # Calls still running on a former owner may finish (or fail) on their own.
            task = asyncio.get_running_loop().create_task(c.close(grace=self._timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if stale:
            log.info("event=shard_map_changed shards=%s", self.shards)

    async def _refresh(self) -> None:
        """Reads the shard map again, unless that was done a moment ago; concurrent
        callers share one read. Never raises: the caller's own error says more."""
        if time.monotonic() - self._map_at < SHARD_MAP_MIN_AGE_S:
            return
        if self._map_task is None or self._map_task.done():
            self._map_task = asyncio.get_running_loop().create_task(self._refresh_once())
        await asyncio.shield(self._map_task)

    async def _refresh_once(self) -> None:
        try:
            await self._reload_map()
        except UnavailableError as e:
            log.warning("event=shard_map_unavailable error=%s", e)
            self._map_at = time.monotonic()  # do not hammer an unreachable etcd

    def _refresh_if_old(self) -> None:
        if time.monotonic() - self._map_at > SHARD_MAP_MAX_AGE_S and (
            self._map_task is None or self._map_task.done()
        ):
            self._map_task = asyncio.get_running_loop().create_task(self._refresh_once())

    def _place(self, key: str) -> KeyPlacement:
        """Where a new transaction goes: a keyed one, see :func:`place_key` (over every
        known shard, retired ones ranked too); a keyless one, round robin over the live
        shards that are not retired."""
        self._refresh_if_old()
        if not self._known:
            raise UnavailableError(f"no coordinator registered in etcd at {self._etcd}")
        if key:
            return place_key(key, self._known, self._retired)
        if not self._serving:
            raise UnavailableError(
                f"no live coordinator of a shard that is not retired is registered in etcd "
                f"at {self._etcd}"
            )
        self._rr += 1
        return KeyPlacement(self._serving[self._rr % len(self._serving)])

    def _down(self, shard: str) -> UnavailableError:
        """UNAVAILABLE for a shard without a live owner, saying what an operator can do."""
        url = self._etcd
        st = self._states.get(shard)
        if st is None:
            return UnavailableError(
                f"UNAVAILABLE: no live coordinator owns shard {shard!r}, and etcd at {url} "
                f"knows no such shard (known shards: {list(self._known)})"
            )
        if st.retired is not None:
            return UnavailableError(
                f"UNAVAILABLE: shard {shard!r} is retired (at {st.retired.at or '?'}) and "
                f"no shard that is not retired is left (known shards: {list(self._known)})"
            )
        return UnavailableError(
            f"UNAVAILABLE: no live coordinator owns shard {shard!r} "
            f"(last owner {st.owner or 'unknown'}, epoch {st.epoch}): start one "
            f"(accord coordinator --shard {shard} --wal-dir ... --etcd {url}), or retire "
            f"the shard (accord shard retire {shard} --etcd {url} --wal-dir ...)"
        )

    async def _on_shard(self, shard: str, call: StubCall[T], *, gid: str = "") -> T:
        """``call`` on the owner of ``shard``; for a call about ``gid`` of a retired
        shard without an owner, on the outcome the shard kept for it."""
        if not self._sharded:
            return await _call(lambda: call(self._stub))
        conn = self._conns.get(shard)
        if conn is None:
            await self._refresh()  # a standby may own it by now
            conn = self._conns.get(shard)
            if conn is None:
                if gid and shard in self._retired:
                    return await call(await self._kept_stub(shard, gid))
                raise self._down(shard)
        stub = conn.stub
        try:
            return await _call(lambda: call(stub))
        except UnavailableError:
            await self._refresh()
            raise

    async def _new(self, key: str, call: StubCall[T]) -> T:
        """A call that starts a transaction, on the shard it belongs to; a key first
        ranked on retired shards is answered from their kept outcome, if one is kept."""
        if not self._sharded:
            return await _call(lambda: call(self._stub))
        placed = self._place(key)
        if placed.shard not in self._conns:
            await self._refresh()  # a standby may own it, or it may be retired, by now
            placed = self._place(key)
        if placed.retired:
            from accord.registry import kept_for_key

            try:
                found = await kept_for_key(await self._etcd_conn(), placed.retired, key)
            except ConnectionError as e:
                raise UnavailableError(f"UNAVAILABLE: {e}") from e
            if found is not None:
                shard, kept = found
                return await call(cast(pb.CoordinatorStub, _KeptStub(shard, kept.gid, kept)))
        if not placed.shard:
            raise self._down(placed.retired[-1])
        return await self._on_shard(placed.shard, call)

    async def _kept_stub(self, shard: str, gid: str) -> pb.CoordinatorStub:
        from accord.registry import kept_for_gid

        try:
            kept = await kept_for_gid(await self._etcd_conn(), shard, gid)
        except ConnectionError as e:
            raise UnavailableError(f"UNAVAILABLE: {e}") from e
        return cast(pb.CoordinatorStub, _KeptStub(shard, gid, kept))

    async def _gid_shard(self, gid: str) -> str:
        """The shard of ``gid``; for an older gid that names none, the live shard that
        knows it (NotFoundError if none does)."""
        if not self._sharded:
            return ""
        shard = shard_of(gid)
        if shard:
            return shard
        req = pb.GetTransactionRequest(gid=gid)
        for s in self._live:
            with contextlib.suppress(NotFoundError):
                await self._on_shard(
                    s, lambda stub: stub.GetTransaction(req, timeout=self._timeout)
                )
                return s
        raise NotFoundError(
            f"NOT_FOUND: unknown transaction {gid!r} (asked shards {list(self._live)})"
        )

    async def _by_gid(self, gid: str, call: StubCall[T]) -> T:
        """A call about ``gid``, on the shard that made it."""
        return await self._on_shard(await self._gid_shard(gid), call, gid=gid)

    # ------------------------------------------------------------ life cycle

    async def __aenter__(self) -> AccordClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._map_task is not None:
            self._map_task.cancel()
            # Its own cancellation comes back as a value; ours still propagates.
            await asyncio.gather(self._map_task, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
        for conn in self._conns.values():
            await conn.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self._etcd_client is not None:
            client, self._etcd_client = self._etcd_client, None
            await client.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        channels = [c.channel for c in self._conns.values()] if self._sharded else [self._channel]
        async with asyncio.timeout(timeout_s):
            for channel in channels:
                assert channel is not None
                await channel.channel_ready()

    # 2PC, interactive
    async def begin(self, *, timeout_ms: int = 0, idempotency_key: str = "") -> Transaction:
        """Begins an interactive 2PC transaction. An ``idempotency_key`` names its first
        transaction for good, an aborted one included (like Stripe's keys): a retry with
        it returns that transaction, so a new attempt after fixing the cause of an abort
        needs a new key."""
        req = pb.BeginRequest(idempotency_key=idempotency_key, timeout_ms=timeout_ms)
        resp = await self._new(idempotency_key, lambda stub: stub.Begin(req, timeout=self._timeout))
        return Transaction(self, resp.gid)

    def transaction(self, *, timeout_ms: int = 0, idempotency_key: str = "") -> _TransactionScope:
        """``async with client.transaction() as tx: await tx.enlist(...)`` commits on exit
        (raising :class:`TransactionAborted` if it aborted) and aborts on an exception."""
        return _TransactionScope(self, timeout_ms, idempotency_key)

    async def enlist(self, gid: str, branch: Branch) -> str:
        req = pb.EnlistRequest(gid=gid, branch=branch.to_pb())
        resp = await self._by_gid(gid, lambda stub: stub.Enlist(req, timeout=self._timeout))
        return str(resp.branch_id)

    async def commit(self, gid: str) -> TxnResult:
        req = pb.CommitRequest(gid=gid)
        resp = await self._by_gid(gid, lambda stub: stub.Commit(req, timeout=self._timeout))
        return TxnResult.from_pb(resp.transaction)

    async def abort(self, gid: str, reason: str = "") -> TxnResult:
        req = pb.AbortRequest(gid=gid, reason=reason)
        resp = await self._by_gid(gid, lambda stub: stub.Abort(req, timeout=self._timeout))
        return TxnResult.from_pb(resp.transaction)

    # 2PC, one shot
    async def execute(
        self, branches: Sequence[Branch], *, idempotency_key: str = "", timeout_ms: int = 0
    ) -> TxnResult:
        """Begin, enlist ``branches`` and commit in one call; returns the outcome. An
        ``idempotency_key`` names its first transaction for good, an aborted one included
        (like Stripe's keys): a retry with it returns that outcome, so a new attempt after
        fixing the cause of an abort needs a new key."""
        req = pb.ExecuteRequest(
            idempotency_key=idempotency_key,
            timeout_ms=timeout_ms,
            branches=[b.to_pb() for b in branches],
        )
        resp = await self._new(
            idempotency_key, lambda stub: stub.Execute(req, timeout=self._timeout)
        )
        return TxnResult.from_pb(resp.transaction)

    # sagas
    async def start_saga(
        self,
        steps: Sequence[SagaStep],
        *,
        idempotency_key: str = "",
        timeout_ms: int = 0,
        wait: bool = True,
    ) -> TxnResult:
        """Starts a saga; with wait (the default) returns once it has ended
        (COMPLETED, COMPENSATED, or STUCK waiting for an operator). An
        ``idempotency_key`` names its first saga for good, a compensated one included
        (like Stripe's keys): a retry with it returns that saga, so a new attempt after
        fixing the cause needs a new key."""
        req = pb.StartSagaRequest(
            idempotency_key=idempotency_key,
            timeout_ms=timeout_ms,
            definition=pb.SagaDefinition(steps=[s.to_pb() for s in steps]),
            wait=wait,
        )
        timeout = None if wait else self._timeout
        resp = await self._new(idempotency_key, lambda stub: stub.StartSaga(req, timeout=timeout))
        return TxnResult.from_pb(resp.transaction)

    async def cancel_saga(self, gid: str, reason: str = "") -> TxnResult:
        req = pb.CancelSagaRequest(gid=gid, reason=reason)
        resp = await self._by_gid(gid, lambda stub: stub.CancelSaga(req))
        return TxnResult.from_pb(resp.transaction)

    async def retry(self, gid: str) -> TxnResult:
        """Operator action: compensate a STUCK saga again."""
        req = pb.RetryTransactionRequest(gid=gid)
        resp = await self._by_gid(gid, lambda stub: stub.RetryTransaction(req))
        return TxnResult.from_pb(resp.transaction)

    # reads
    async def get(self, gid: str) -> TxnResult:
        req = pb.GetTransactionRequest(gid=gid)
        return TxnResult.from_pb(
            await self._by_gid(gid, lambda stub: stub.GetTransaction(req, timeout=self._timeout))
        )

    async def list(
        self, *, states: Sequence[str] = (), limit: int = 100, page_token: str = ""
    ) -> tuple[list[TxnResult], str]:
        """Transactions in gid order, a page at a time. A sharded client asks every
        live shard for a page after ``page_token`` and keeps the first ``limit`` of
        them all: the same order and paging as one coordinator's."""
        try:
            codes = [TxnState(s.upper()).to_pb() for s in states]
        except ValueError as e:
            raise ValueError(f"unknown state in {list(states)}: {e}") from None
        req = pb.ListTransactionsRequest(states=codes, limit=limit, page_token=page_token)
        shards = self._live if self._sharded else ("",)
        pages = await asyncio.gather(
            *(
                self._on_shard(s, lambda stub: stub.ListTransactions(req, timeout=self._timeout))
                for s in shards
            )
        )
        txns = sorted((t for p in pages for t in p.transactions), key=lambda t: t.gid)
        more = len(txns) > limit or any(p.next_page_token for p in pages)
        if len(shards) == 1:
            return [TxnResult.from_pb(t) for t in txns], pages[0].next_page_token
        txns = txns[:limit] if limit > 0 else txns
        token = txns[-1].gid if more and txns else ""
        return [TxnResult.from_pb(t) for t in txns], token

    async def subscribe(
        self, from_lsn: int = 0, *, max_batch: int = 0, shard: str = ""
    ) -> AsyncGenerator[pb.SubscribeResponse, None]:
        """The shard's event feed after ``from_lsn`` (``Coordinator/Subscribe``):
        batches of ``accord.v1.FeedEvent`` in LSN order, each with the shard's durable
        LSN, for as long as the stream lasts. When it breaks (an AccordClientError, e.g.
        UNAVAILABLE while the coordinator restarts), subscribe again from the last
        event's LSN: nothing is lost, and only events at or below it can come twice. A
        sharded client (:meth:`from_etcd`) needs ``shard``."""
        if self._sharded:
            if not shard:
                raise ValueError("a sharded client subscribes to one shard: give shard=")
            if shard not in self._conns:
                await self._refresh()
            if shard not in self._conns:
                raise UnavailableError(f"UNAVAILABLE: no live coordinator owns shard {shard!r}")
            stub = self._conns[shard].stub
        else:
            stub = self._stub
        stream = stub.Subscribe(pb.SubscribeRequest(from_lsn=from_lsn, max_batch=max_batch))
        try:
            async for batch in stream:
                yield batch
        except aio.AioRpcError as e:
            raise from_rpc_error(e) from e
        finally:
            stream.cancel()

    async def watch(self, gid: str) -> AsyncIterator[TxnResult]:
        """Yields the transaction's state now, then after every change, until final."""
        shard = await self._gid_shard(gid)
        if self._sharded:
            if shard not in self._conns:
                await self._refresh()  # a standby may own it by now
            if shard not in self._conns:
                if shard not in self._retired:
                    raise self._down(shard)
                # A retired shard's kept outcome is final: it is all there is to see.
                kept = await self._kept_stub(shard, gid)
                req = pb.GetTransactionRequest(gid=gid)
                yield TxnResult.from_pb(await kept.GetTransaction(req))
                return
            stub = self._conns[shard].stub
        else:
            stub = self._stub
        stream = stub.WatchTransaction(pb.WatchTransactionRequest(gid=gid))
        try:
            async for event in stream:
                yield TxnResult.from_pb(event.transaction)
        except aio.AioRpcError as e:
            err = from_rpc_error(e)
            if self._sharded and isinstance(err, UnavailableError):
                await self._refresh()
            raise err from e


class _KeptStub:
    """Stands in for the coordinator of a retired shard: answers from the outcome the
    shard kept in etcd for an idempotency key (``kept``; None when the transaction had
    none, so nothing was kept), as its coordinator would have answered a retry."""

    def __init__(self, shard: str, gid: str, kept: KeptOutcome | None) -> None:
        self._shard, self._gid, self._kept = shard, gid, kept

    def _txn(self) -> pb.Transaction:
        kept = self._kept
        if kept is None:
            raise NotFoundError(
                f"NOT_FOUND: transaction {self._gid!r} is unknown now: its shard "
                f"{self._shard!r} was retired, and only the outcomes of transactions with "
                "an idempotency key were kept"
            )
        t = pb.Transaction(gid=kept.gid, idempotency_key=kept.key, reason=kept.reason)
        with contextlib.suppress(ValueError):
            t.state = pb.TxnState.Value(f"TXN_STATE_{kept.state}")
        with contextlib.suppress(ValueError):
            t.protocol = pb.Protocol.Value(f"PROTOCOL_{kept.protocol}")
        return t

    def _of(self, protocol: int) -> pb.Transaction:
        t = self._txn()
        if t.protocol != protocol:
            raise AlreadyExistsError(
                f"ALREADY_EXISTS: idempotency key {t.idempotency_key!r} was used for a "
                f"different request (transaction {t.gid}, kept by retired shard "
                f"{self._shard!r})"
            )
        return t

    def _final(self, what: str) -> FailedPreconditionError:
        t = self._txn()
        state = TxnState.from_pb(t.state)
        return FailedPreconditionError(
            f"FAILED_PRECONDITION: cannot {what} transaction {t.gid}: it is {state}, and "
            f"its shard {self._shard!r} was retired (only its outcome is kept)"
        )

    async def Begin(self, req: pb.BeginRequest, **_: Any) -> pb.BeginResponse:
        return pb.BeginResponse(gid=self._of(pb.PROTOCOL_TWO_PHASE_COMMIT).gid)

    async def Execute(self, req: pb.ExecuteRequest, **_: Any) -> pb.TransactionResponse:
        return pb.TransactionResponse(transaction=self._of(pb.PROTOCOL_TWO_PHASE_COMMIT))

    async def StartSaga(self, req: pb.StartSagaRequest, **_: Any) -> pb.TransactionResponse:
        return pb.TransactionResponse(transaction=self._of(pb.PROTOCOL_SAGA))

    async def GetTransaction(self, req: pb.GetTransactionRequest, **_: Any) -> pb.Transaction:
        return self._txn()

    async def Commit(self, req: pb.CommitRequest, **_: Any) -> pb.TransactionResponse:
        # As the coordinator: a Commit of a decided transaction reports its outcome.
        return pb.TransactionResponse(transaction=self._of(pb.PROTOCOL_TWO_PHASE_COMMIT))

    async def Abort(self, req: pb.AbortRequest, **_: Any) -> pb.TransactionResponse:
        t = self._of(pb.PROTOCOL_TWO_PHASE_COMMIT)
        if t.state in (pb.TXN_STATE_COMMITTED, pb.TXN_STATE_COMMITTING):
            raise self._final("abort")
        return pb.TransactionResponse(transaction=t)

    async def Enlist(self, req: pb.EnlistRequest, **_: Any) -> pb.EnlistResponse:
        raise self._final("enlist in")

    async def CancelSaga(self, req: pb.CancelSagaRequest, **_: Any) -> pb.TransactionResponse:
        raise self._final("cancel")

    async def RetryTransaction(
        self, req: pb.RetryTransactionRequest, **_: Any
    ) -> pb.TransactionResponse:
        raise self._final("retry")
