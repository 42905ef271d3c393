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

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar, cast

from grpc import aio
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

import accord.v1 as pb
from clients._errors import (
    AccordClientError,
    TransactionAborted,
    UnavailableError,
    from_rpc_error,
)
from clients._tracing import TracedStub, recording
from registry.transport import TransportSettings, make_channel

T = TypeVar("T")

_STATE_NAMES = {v: k.removeprefix("TXN_STATE_") for k, v in pb.TxnState.items()}
_BRANCH_STATE_NAMES = {v: k.removeprefix("BRANCH_STATE_") for k, v in pb.BranchState.items()}
FINAL_STATES = frozenset({"COMMITTED", "ABORTED", "COMPLETED", "COMPENSATED"})
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
    def from_dict(cls, d: dict[str, Any]) -> SagaStep:
        """From the JSON form used by ``accord txn saga --file``."""
        retry = d.get("retry") or {}
        known = {
            "name",
            "action",
            "compensation",
            "service",
            "address",
            "payload",
            "compensation_payload",
            "depends_on",
            "pivot",
            "timeout_ms",
            "retry",
        }
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"step {d.get('name')!r}: unknown fields {sorted(unknown)}")
        return cls(
            name=str(d["name"]),
            action=str(d["action"]),
            compensation=str(d.get("compensation", "")),
            service=str(d.get("service", "")),
            address=str(d.get("address", "")),
            payload=d.get("payload", b""),
            compensation_payload=d.get("compensation_payload"),
            depends_on=tuple(d.get("depends_on", ())),
            pivot=bool(d.get("pivot", False)),
            timeout_ms=int(d.get("timeout_ms", 0)),
            max_attempts=int(retry.get("max_attempts", 0)),
            initial_interval_ms=int(retry.get("initial_interval_ms", 0)),
            max_interval_ms=int(retry.get("max_interval_ms", 0)),
            multiplier=float(retry.get("multiplier", 0.0)),
            final_codes=tuple(retry.get("final_codes", ())),
        )


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
        return self.state in ("COMMITTED", "COMMITTING")

    @property
    def aborted(self) -> bool:
        return self.state in ("ABORTED", "ABORTING")

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"

    @property
    def compensated(self) -> bool:
        return self.state == "COMPENSATED"

    @property
    def stuck(self) -> bool:
        return self.state == "STUCK"

    @classmethod
    def from_pb(cls, t: pb.Transaction) -> TxnResult:
        return cls(
            gid=t.gid,
            state=_STATE_NAMES.get(t.state, str(t.state)),
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


class AccordClient:
    """Async client of one coordinator. Use as ``async with`` or call :meth:`close`."""

    def __init__(
        self,
        address: str,
        *,
        transport: TransportSettings | None = None,
        timeout_s: float = 60.0,
        connect: bool = True,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """``tracer_provider``: where client spans go (default: the global provider);
        each call then carries its span's W3C context to the coordinator."""
        self.address = address
        self._transport = transport
        self._tracer_provider = tracer_provider
        self._timeout = timeout_s
        self._etcd = ""
        self._coordinator_id = ""
        self._shard = ""
        self._channel: aio.Channel | None = None
        if connect:
            self._connect(address)

    def _connect(self, address: str) -> None:
        self.address = address
        self._channel = make_channel(address, self._transport)
        self._stub = pb.CoordinatorStub(self._channel)
        if recording(self._tracer_provider):
            tracer = trace.get_tracer("accord.client", tracer_provider=self._tracer_provider)
            self._stub = cast(pb.CoordinatorStub, TracedStub(self._stub, tracer))

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
    ) -> AccordClient:
        """A client of a live coordinator found in etcd: ``coordinator_id``, or the owner
        of ``shard``, or any one registered. :meth:`reconnect` finds it again after a
        failover. Raises :class:`UnavailableError` when none is registered."""
        client = cls(
            "",
            transport=transport,
            timeout_s=timeout_s,
            connect=False,
            tracer_provider=tracer_provider,
        )
        client._etcd, client._coordinator_id, client._shard = etcd, coordinator_id, shard
        await client.reconnect()
        return client

    async def reconnect(self) -> str:
        """Finds the coordinator again in etcd (after ``UNAVAILABLE``: a standby may own
        the shard now) and switches to it; returns its address. Without etcd, a no-op."""
        import random

        from registry import find_coordinators

        if not self._etcd:
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
            old = self._channel
            self._connect(chosen.address)
            if old is not None:
                await old.close()
        return self.address

    async def __aenter__(self) -> AccordClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        import asyncio

        assert self._channel is not None
        async with asyncio.timeout(timeout_s):
            await self._channel.channel_ready()

    # 2PC, interactive
    async def begin(self, *, timeout_ms: int = 0, idempotency_key: str = "") -> Transaction:
        req = pb.BeginRequest(idempotency_key=idempotency_key, timeout_ms=timeout_ms)
        resp = await _call(lambda: self._stub.Begin(req, timeout=self._timeout))
        return Transaction(self, resp.gid)

    def transaction(self, *, timeout_ms: int = 0, idempotency_key: str = "") -> _TransactionScope:
        """``async with client.transaction() as tx: await tx.enlist(...)`` commits on exit
        (raising :class:`TransactionAborted` if it aborted) and aborts on an exception."""
        return _TransactionScope(self, timeout_ms, idempotency_key)

    async def enlist(self, gid: str, branch: Branch) -> str:
        req = pb.EnlistRequest(gid=gid, branch=branch.to_pb())
        resp = await _call(lambda: self._stub.Enlist(req, timeout=self._timeout))
        return str(resp.branch_id)

    async def commit(self, gid: str) -> TxnResult:
        req = pb.CommitRequest(gid=gid)
        resp = await _call(lambda: self._stub.Commit(req, timeout=self._timeout))
        return TxnResult.from_pb(resp.transaction)

    async def abort(self, gid: str, reason: str = "") -> TxnResult:
        req = pb.AbortRequest(gid=gid, reason=reason)
        resp = await _call(lambda: self._stub.Abort(req, timeout=self._timeout))
        return TxnResult.from_pb(resp.transaction)

    # 2PC, one shot
    async def execute(
        self, branches: Sequence[Branch], *, idempotency_key: str = "", timeout_ms: int = 0
    ) -> TxnResult:
        req = pb.ExecuteRequest(
            idempotency_key=idempotency_key,
            timeout_ms=timeout_ms,
            branches=[b.to_pb() for b in branches],
        )
        resp = await _call(lambda: self._stub.Execute(req, timeout=self._timeout))
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
        (COMPLETED, COMPENSATED, or STUCK waiting for an operator)."""
        req = pb.StartSagaRequest(
            idempotency_key=idempotency_key,
            timeout_ms=timeout_ms,
            definition=pb.SagaDefinition(steps=[s.to_pb() for s in steps]),
            wait=wait,
        )
        timeout = None if wait else self._timeout
        resp = await _call(lambda: self._stub.StartSaga(req, timeout=timeout))
        return TxnResult.from_pb(resp.transaction)

    async def cancel_saga(self, gid: str, reason: str = "") -> TxnResult:
        req = pb.CancelSagaRequest(gid=gid, reason=reason)
        resp = await _call(lambda: self._stub.CancelSaga(req))
        return TxnResult.from_pb(resp.transaction)

    async def retry(self, gid: str) -> TxnResult:
        """Operator action: compensate a STUCK saga again."""
        req = pb.RetryTransactionRequest(gid=gid)
        resp = await _call(lambda: self._stub.RetryTransaction(req))
        return TxnResult.from_pb(resp.transaction)

    # reads
    async def get(self, gid: str) -> TxnResult:
        req = pb.GetTransactionRequest(gid=gid)
        return TxnResult.from_pb(
            await _call(lambda: self._stub.GetTransaction(req, timeout=self._timeout))
        )

    async def list(
        self, *, states: Sequence[str] = (), limit: int = 100, page_token: str = ""
    ) -> tuple[list[TxnResult], str]:
        try:
            codes = [pb.TxnState.Value(f"TXN_STATE_{s.upper()}") for s in states]
        except ValueError as e:
            raise ValueError(f"unknown state in {list(states)}: {e}") from None
        req = pb.ListTransactionsRequest(states=codes, limit=limit, page_token=page_token)
        resp = await _call(lambda: self._stub.ListTransactions(req, timeout=self._timeout))
        return [TxnResult.from_pb(t) for t in resp.transactions], resp.next_page_token

    async def watch(self, gid: str) -> AsyncIterator[TxnResult]:
        """Yields the transaction's state now, then after every change, until final."""
        stream = self._stub.WatchTransaction(pb.WatchTransactionRequest(gid=gid))
        try:
            async for event in stream:
                yield TxnResult.from_pb(event.transaction)
        except aio.AioRpcError as e:
            raise from_rpc_error(e) from e
