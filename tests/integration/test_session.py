"""``Coordinator/Session`` against real processes: a coordinator and two bank participants
on 127.0.0.1. The streaming client path gives what the unary path gives (outcomes,
sagas, every error status with its message), answers many concurrent calls out of
order, survives a coordinator SIGKILLed mid-session (pending calls fail UNAVAILABLE, the
client's retries with idempotency keys finish the work, money is conserved), applies
auth per stream and per call, and its limits."""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry.sdk.trace import TracerProvider

import accord.v1 as pb
from accord.client import (
    AccordClient,
    AccordClientError,
    Branch,
    SagaStep,
    SyncAccordClient,
    TxnResult,
    UnavailableError,
)
from accord.common.transport import make_channel
from tests.integration._otlp import OtlpReceiver, Span
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, free_port, open_accounts
from tests.integration.test_tracing import _one, client_tracing, receiver
from tests.integration.test_tracing import _start as tracing_banks
from tests.integration.test_tracing import transfer as tracing_transfer

pytestmark = pytest.mark.integration
__all__ = ["client_tracing", "receiver"]  # fixtures (tracing), shared with test_tracing

A = "tok-client-a-" + "a" * 20
B = "tok-client-b-" + "b" * 20
READER = "tok-reader-" + "d" * 20


def transfer(src: str = "x", dst: str = "y", amount: int = 1) -> list[Branch]:
    return [
        Branch(service="bank-a", operation="debit", payload={"account": src, "amount": amount}),
        Branch(service="bank-b", operation="credit", payload={"account": dst, "amount": amount}),
    ]


async def two_banks(cluster: Cluster, x: int = 1000) -> dict[str, str]:
    a = cluster.bank("bank-a")
    b = cluster.bank("bank-b")
    await open_accounts(a.address, {"x": x})
    await open_accounts(b.address, {"y": 0})
    return {"bank-a": a.address, "bank-b": b.address}


def slow_saga(dead: str, key: str = "") -> pb.StartSagaRequest:
    """A saga (wait=True) of one step on ``dead``, a port nobody listens on: it ends
    COMPENSATED after three attempts, 0.4 s apart."""
    step = SagaStep(
        name="s",
        address=dead,
        action="debit",
        compensation="refund",
        max_attempts=3,
        initial_interval_ms=400,
        max_interval_ms=400,
        multiplier=1.0,
    )
    return pb.StartSagaRequest(
        idempotency_key=key, wait=True, definition=pb.SagaDefinition(steps=[step.to_pb()])
    )


def shape(r: TxnResult) -> dict[str, Any]:
    """What must match between the two paths (not the gid, key, times or LSN)."""
    d = r.to_dict()
    for k in ("gid", "idempotency_key", "created_unix_ms", "deadline_unix_ms", "lsn"):
        d.pop(k)
    # Balances in a refusal's reason differ (the paths run one after the other).
    d["reason"] = re.sub(r"\d+", "N", d["reason"].replace(r.gid, "GID"))
    for b in d["branches"]:
        b["last_error"] = b["last_error"].replace(r.gid, "GID")
    return d


async def outcome(call: Any) -> tuple[str, str]:
    """(error class, message) of a call, or ("ok", "")."""
    try:
        await call
    except AccordClientError as e:
        return type(e).__name__, str(e)
    return "ok", ""


async def test_session_gives_what_unary_gives(cluster: Cluster) -> None:
    services = await two_banks(cluster)
    coord = cluster.coordinator(services)
    addr = coord.address
    saga = [
        SagaStep(
            name="debit",
            service="bank-a",
            action="debit",
            compensation="refund",
            payload={"account": "x", "amount": 2},
        ),
        SagaStep(
            name="credit",
            service="bank-b",
            action="credit",
            compensation="uncredit",
            payload={"account": "y", "amount": 2},
            depends_on=("debit",),
        ),
    ]
    failing_saga = [
        saga[0],
        SagaStep(
            name="credit",
            service="bank-b",
            action="credit",
            compensation="uncredit",
            payload={"account": "nobody", "amount": 2},
            depends_on=("debit",),
        ),
    ]
    async with (
        AccordClient(addr, session="unary", timeout_s=20) as unary,
        AccordClient(addr, session="session", timeout_s=20) as streamed,
    ):
        results: dict[str, list[TxnResult]] = {}
        for name, c in (("unary", unary), ("session", streamed)):
            got = [
                await c.execute(transfer(), idempotency_key=f"{name}-commit"),
                # The participant refuses (insufficient funds): ABORTED.
                await c.execute(transfer(amount=10**6), idempotency_key=f"{name}-refused"),
                await c.start_saga(saga, idempotency_key=f"{name}-saga"),
                await c.start_saga(failing_saga, idempotency_key=f"{name}-compensated"),
            ]
            # A retry with the same key gives the same transaction.
            again = await c.execute(transfer(), idempotency_key=f"{name}-commit")
            assert again.gid == got[0].gid
            # Interactive: begin and enlist unary, commit and abort on the stream.
            tx = await c.begin()
            await tx.enlist(transfer()[0])
            await tx.enlist(transfer()[1])
            got.append(await tx.commit())
            tx2 = await c.begin()
            await tx2.enlist(transfer()[0])
            got.append(await tx2.abort("changed my mind"))
            results[name] = got
        assert streamed._stub.session_calls == 7  # type: ignore[attr-defined]
        assert unary._stub.session_calls == 0  # type: ignore[attr-defined]
        states = [r.state for r in results["session"]]
        assert states == [
            "COMMITTED",
            "ABORTED",
            "COMPLETED",
            "COMPENSATED",
            "COMMITTED",
            "ABORTED",
        ]
        assert [shape(r) for r in results["session"]] == [shape(r) for r in results["unary"]]

        # Every error status, with the same message on both paths.
        committed = results["unary"][0].gid
        unknown = committed[:-4] + ("0000" if not committed.endswith("0000") else "1111")
        other_shard = "s9:" + committed.split(":", 1)[-1]
        await unary.execute(transfer(), idempotency_key="reused")
        cases: dict[str, Callable[[AccordClient], Awaitable[Any]]] = {
            "INVALID_ARGUMENT": lambda c: c.execute(transfer(), idempotency_key="k" * 500),
            "INVALID_ARGUMENT (no branch)": lambda c: c.execute([]),
            "NOT_FOUND": lambda c: c.commit(unknown),
            "NOT_FOUND (abort)": lambda c: c.abort(unknown),
            "FAILED_PRECONDITION": lambda c: c.abort(committed),
            "FAILED_PRECONDITION (shard)": lambda c: c.commit(other_shard),
            "ALREADY_EXISTS": lambda c: c.execute(transfer(amount=2), idempotency_key="reused"),
            "UNAVAILABLE": lambda c: c.execute(
                [Branch(service="no-such-bank", operation="debit", payload={})]
            ),
        }
        for what, make in cases.items():
            u = await outcome(make(unary))
            s = await outcome(make(streamed))
            assert u == s, what
            assert u[1].startswith(what.split()[0] + ":"), (what, u)


async def test_many_calls_answered_out_of_order(cluster: Cluster) -> None:
    services = await two_banks(cluster, x=10**9)
    # A participant that never answers: a saga with a step there ends (compensated) after
    # its attempts, while the transactions sent after it finish first.
    dead = f"127.0.0.1:{free_port()}"
    coord = cluster.coordinator(services)
    async with make_channel(coord.address) as channel:
        call = pb.CoordinatorStub(channel).Session()
        first = pb.SessionCall(call_id=7, start_saga=slow_saga(dead, "slow"))
        await call.write(pb.SessionRequest(calls=[first]))
        for i in range(0, 20, 4):  # in messages of four calls
            calls = [
                pb.SessionCall(
                    call_id=100 + j,
                    execute=pb.ExecuteRequest(
                        idempotency_key=f"fast-{j}", branches=[b.to_pb() for b in transfer()]
                    ),
                )
                for j in range(i, i + 4)
            ]
            await call.write(pb.SessionRequest(calls=calls))
        await call.done_writing()
        answers = [r async for msg in call for r in msg.results]
    order = [a.call_id for a in answers]
    assert sorted(order) == [7, *range(100, 120)]
    assert order[-1] == 7  # the slow one, sent first, answered last
    for a in answers:
        t = a.response.transaction
        if a.call_id == 7:
            assert t.idempotency_key == "slow" and t.state == pb.TXN_STATE_COMPENSATED
        else:
            assert t.idempotency_key == f"fast-{a.call_id - 100}"
            assert t.state == pb.TXN_STATE_COMMITTED

    # Through the client: 200 calls at once, commits and refusals mixed; each caller
    # gets the answer to its own request.
    async with AccordClient(coord.address, session="auto", session_threshold=4) as c:
        amounts = [random.Random(i).choice((1, 2, 3, 10**12)) for i in range(200)]
        results = await asyncio.gather(
            *(
                c.execute(transfer(amount=amt), idempotency_key=f"mix-{i}")
                for i, amt in enumerate(amounts)
            )
        )
        assert c._stub.session_calls >= 190  # type: ignore[attr-defined]
    for i, (amt, r) in enumerate(zip(amounts, results, strict=True)):
        assert r.idempotency_key == f"mix-{i}"
        assert r.committed == (amt < 10**12), (i, amt, r.state)
    moved = sum(a for a in amounts if a < 10**12) + 20

    # The synchronous wrapper, called from several threads at once, on the stream.
    def sync_calls() -> list[TxnResult]:
        with (
            SyncAccordClient(coord.address, session="session") as sync,
            ThreadPoolExecutor(4) as pool,
        ):
            got = list(
                pool.map(lambda i: sync.execute(transfer(), idempotency_key=f"s{i}"), range(8))
            )
            assert sync._client._stub.session_calls == 8  # type: ignore[attr-defined]
            return got

    assert all(r.committed for r in await asyncio.to_thread(sync_calls))
    assert (await balances(services["bank-b"])).total == moved + 8


async def test_coordinator_killed_mid_session(cluster: Cluster) -> None:
    initial = 10**6
    services = await two_banks(cluster, x=initial)
    port = free_port()
    coord = cluster.coordinator(services, port=port)
    restarted = asyncio.Event()
    unavailable: list[str] = []
    done: dict[str, TxnResult] = {}

    async def worker(c: AccordClient, w: int) -> None:
        for i in range(10_000):
            key = f"w{w}-{i}"
            deadline = time.monotonic() + 60
            while True:  # the retry loop a caller runs (as the chaos harness does)
                try:
                    done[key] = await c.execute(transfer(), idempotency_key=key)
                    break
                except UnavailableError as e:
                    unavailable.append(str(e))
                    assert time.monotonic() < deadline, f"{key} still unavailable: {e}"
                    await asyncio.sleep(0.1)
            if restarted.is_set() and i >= 5:
                return

    async with AccordClient(coord.address, session="session", timeout_s=30) as c:
        workers = [asyncio.create_task(worker(c, w)) for w in range(32)]
        for _ in range(600):
            if len(done) >= 200:
                break
            await asyncio.sleep(0.05)
        session = c._stub.session  # type: ignore[attr-defined]
        for _ in range(1000):  # kill it with calls pending (answers come in batches)
            if session.pending:
                break
            await asyncio.sleep(0.001)
        assert session.pending
        coord.kill()
        await asyncio.sleep(0.5)
        coord = cluster.coordinator(services, port=port)
        restarted.set()
        await asyncio.wait_for(asyncio.gather(*workers), 120)
    assert any("session broken" in m for m in unavailable), unavailable[:3]
    # A transaction cut off by the crash before its decision is aborted (presumed
    # abort), and its key's retry says so; every other one committed.
    committed = [k for k, r in done.items() if r.committed]
    assert all(r.committed or r.aborted for r in done.values())
    assert len(done) - len(committed) <= 64, len(done) - len(committed)
    for bank in services.values():  # the restarted coordinator resolves what was held
        await assert_eventually(
            functools.partial(balances, bank),
            lambda r: r.prepared_branches == 0,
            what="no branch held prepared",
        )
    a, b = await balances(services["bank-a"]), await balances(services["bank-b"])
    assert a.total + b.total == initial  # conserved
    assert b.total == len(committed)  # each key's transfer made once, or not at all


async def test_auth_per_stream_and_per_call(cluster: Cluster) -> None:
    services = await two_banks(cluster)
    tokens = cluster.root / "tokens"
    tokens.write_text(f"{A} client shop-a\n{B} client shop-b\n{READER} reader dash\n")
    coord = cluster.coordinator(
        services, extra=["--auth-tokens", str(tokens), "--max-inflight-per-caller", "3"]
    )
    addr = coord.address

    async def both(token: str, make: Any) -> tuple[tuple[str, str], tuple[str, str]]:
        async with (
            AccordClient(addr, token=token, session="unary", timeout_s=10) as u,
            AccordClient(addr, token=token, session="session", timeout_s=10) as s,
        ):
            return await outcome(make(u)), await outcome(make(s))

    u, s = await both("", lambda c: c.execute(transfer()))
    assert u == s and u[0] == "UnauthenticatedError"
    u, s = await both("tok-wrong-" + "z" * 20, lambda c: c.start_saga([]))
    assert u == s and u[0] == "UnauthenticatedError"
    u, s = await both(READER, lambda c: c.execute(transfer()))
    assert u == s and u[0] == "PermissionDeniedError" and "lacks the client role" in u[1]

    async with (
        AccordClient(addr, token=A, session="session", timeout_s=10) as ca,
        AccordClient(addr, token=B, session="session", timeout_s=10) as cb,
        AccordClient(addr, token=B, session="unary", timeout_s=10) as cb_unary,
    ):
        ta = await ca.execute(transfer(), idempotency_key="order-1")
        tb = await cb.execute(transfer(), idempotency_key="order-1")
        assert ta.committed and tb.committed and ta.gid != tb.gid
        # B cannot drive A's transaction: NOT_FOUND, as unary.
        for name in ("commit", "abort"):
            s_out = await outcome(getattr(cb, name)(ta.gid))
            u_out = await outcome(getattr(cb_unary, name)(ta.gid))
            assert s_out == u_out and s_out[0] == "NotFoundError"
        # Per-caller limit (3 unfinished): the fourth is RESOURCE_EXHAUSTED, per call.
        for _ in range(3):
            await cb_unary.begin(timeout_ms=60_000)
        s_out = await outcome(cb.execute(transfer()))
        u_out = await outcome(cb_unary.execute(transfer()))
        assert s_out == u_out and s_out[0] == "ResourceExhaustedError"
        assert (await ca.execute(transfer())).committed  # A's session is unaffected

        # A's token is revoked while its session is open: its calls are refused from
        # the next check on (at most a second later), as unary ones are.
        tokens.write_text(f"{B} client shop-b\n")
        await asyncio.sleep(2.2)
        s_out = await outcome(ca.execute(transfer()))
        assert s_out[0] == "UnauthenticatedError", s_out
    assert A not in coord.output()


async def test_limits_and_bad_input(cluster: Cluster) -> None:
    services = await two_banks(cluster)
    dead = f"127.0.0.1:{free_port()}"
    coord = cluster.coordinator(services, extra=["--max-session-calls", "4"])
    async with make_channel(coord.address) as channel:
        call = pb.CoordinatorStub(channel).Session()
        empty = pb.SessionCall(call_id=9)  # no call in it
        await call.write(pb.SessionRequest(calls=[empty]))
        slow = [pb.SessionCall(call_id=i + 1, start_saga=slow_saga(dead)) for i in range(6)]
        await call.write(pb.SessionRequest(calls=slow))  # four in flight, two over the limit
        await call.done_writing()
        answers = {r.call_id: r async for msg in call for r in msg.results}
        assert await call.code() == grpc.StatusCode.OK
    over = [i for i, a in answers.items() if a.HasField("error") and a.error.code == 8]
    assert sorted(over) == [5, 6]
    assert "limit 4 per session" in answers[5].error.message
    assert answers[9].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for i in (1, 2, 3, 4):
        assert answers[i].response.transaction.state == pb.TXN_STATE_COMPENSATED

    # A message that does not decode ends the stream INVALID_ARGUMENT; the call sent
    # before it is still answered.
    async with aio.insecure_channel(coord.address) as channel:
        raw = channel.stream_stream(
            "/accord.v1.Coordinator/Session",
            request_serializer=lambda b: b,
            response_deserializer=pb.SessionResponse.FromString,
        )
        call = raw()
        good = pb.SessionRequest(
            calls=[
                pb.SessionCall(
                    call_id=1, execute=pb.ExecuteRequest(branches=[b.to_pb() for b in transfer()])
                )
            ]
        )
        await call.write(good.SerializeToString())
        await asyncio.sleep(0.5)
        await call.write(b"\xff\xff\xff\xff")
        got: list[pb.SessionResult] = []
        with pytest.raises(aio.AioRpcError) as refused:
            async for msg in call:
                got.extend(msg.results)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [m.call_id for m in got] == [1]
        assert got[0].response.transaction.state == pb.TXN_STATE_COMMITTED

    # A request over the message limit goes unary and fails alone, as it always did;
    # the session's other calls are answered.
    async with AccordClient(coord.address, session="session", timeout_s=20) as c:
        big = [Branch(service="bank-a", operation="debit", payload=b"x" * (5 << 20))]
        refusal = asyncio.create_task(outcome(c.execute(big)))
        rs = await asyncio.gather(*(c.execute(transfer()) for _ in range(5)))
        assert (await refusal)[0] == "ResourceExhaustedError"
        assert all(r.committed for r in rs)
        assert c._stub.session is not None and c._stub.session.broken is None  # type: ignore[attr-defined]


async def test_each_call_is_its_own_trace(
    cluster: Cluster, receiver: OtlpReceiver, client_tracing: TracerProvider
) -> None:
    services = await tracing_banks(cluster, receiver)
    coord = cluster.coordinator(services, env=receiver.env())
    async with AccordClient(
        coord.address, tracer_provider=client_tracing, session="session"
    ) as client:
        results = await asyncio.gather(*(client.execute(tracing_transfer(i + 1)) for i in range(3)))
        assert client._stub.session_calls == 3  # type: ignore[attr-defined]
    assert all(r.committed for r in results)

    def complete(spans: list[Span]) -> bool:
        roots = [s for s in spans if s.name == "accord.txn 2pc"]
        handlers = [s for s in spans if s.name.startswith("accord.participant ")]
        return len(roots) == 3 and len(handlers) >= 12

    spans = receiver.wait_for(complete, what="3 roots and 12 participant spans")
    for r in results:
        client_span = _one(spans, "accord.client Execute", **{"accord.gid": r.gid})
        assert client_span.kind == "CLIENT"
        root = _one(spans, "accord.txn 2pc", **{"accord.gid": r.gid})
        assert root.parent_id == client_span.span_id
        assert root.trace_id == client_span.trace_id
        # The participants' handler spans of this transaction are in its trace.
        handlers = [
            s
            for s in spans
            if s.name.startswith("accord.participant ") and s.attributes.get("accord.gid") == r.gid
        ]
        assert len(handlers) == 4
        assert {s.trace_id for s in handlers} == {client_span.trace_id}
    assert len({s.trace_id for s in spans}) == 3


async def test_a_refused_token_is_unauthenticated_every_time(cluster: Cluster) -> None:
    """A session whose token is refused ends UNAUTHENTICATED, not with the client's local
    "INTERNAL: Internal error from Core" that a stream ended while the client's first
    write was on its way gave about 1 time in 20 (8 of 150 before the coordinator took
    that message first)."""
    services = await two_banks(cluster)
    tokens = cluster.root / "tokens"
    tokens.write_text(f"{A} client shop-a\n")
    coord = cluster.coordinator(services, extra=["--auth-tokens", str(tokens)])
    seen: dict[str, int] = {}
    for _ in range(100):
        async with AccordClient(coord.address, token="", session="session", timeout_s=10) as c:
            kind, message = await outcome(c.execute(transfer()))
            seen[f"{kind}: {message[:40]}"] = seen.get(f"{kind}: {message[:40]}", 0) + 1
    assert all(k.startswith("UnauthenticatedError") for k in seen), seen
