"""A table of malformed requests against a real coordinator: each gets its status code,
and nothing is kept (no transaction appears, the WAL does not grow)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

import accord.v1 as pb
from tests.integration.conftest import Cluster, open_accounts

BIG = b"x" * (256 * 1024 + 1)
OK_BRANCH = pb.Branch(service="bank-a", operation="debit", payload=b"{}")


def _step(name: str, **kw: Any) -> pb.SagaStep:
    return pb.SagaStep(name=name, service="bank-a", action="debit", compensation="credit", **kw)


CASES: list[tuple[str, str, Any, grpc.StatusCode]] = [
    ("execute-empty", "Execute", pb.ExecuteRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "execute-no-target",
        "Execute",
        pb.ExecuteRequest(branches=[pb.Branch(operation="x")]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-both-targets",
        "Execute",
        pb.ExecuteRequest(
            branches=[pb.Branch(service="bank-a", address="127.0.0.1:1", operation="x")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-no-operation",
        "Execute",
        pb.ExecuteRequest(branches=[pb.Branch(service="bank-a")]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-bad-address",
        "Execute",
        pb.ExecuteRequest(branches=[pb.Branch(address="not an address", operation="x")]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-payload-too-big",
        "Execute",
        pb.ExecuteRequest(branches=[pb.Branch(service="bank-a", operation="x", payload=BIG)]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-too-many-branches",
        "Execute",
        pb.ExecuteRequest(branches=[OK_BRANCH] * 65),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-duplicate-branch-ids",
        "Execute",
        pb.ExecuteRequest(branches=[pb.Branch(service="bank-a", operation="x", branch_id="b")] * 2),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-timeout-too-long",
        "Execute",
        pb.ExecuteRequest(timeout_ms=4_000_000_000, branches=[OK_BRANCH]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-key-too-long",
        "Execute",
        pb.ExecuteRequest(idempotency_key="k" * 200, branches=[OK_BRANCH]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-unknown-service",
        "Execute",
        pb.ExecuteRequest(branches=[pb.Branch(service="nobody", operation="x")]),
        grpc.StatusCode.UNAVAILABLE,
    ),
    (
        "begin-timeout-too-long",
        "Begin",
        pb.BeginRequest(timeout_ms=4_000_000_000),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "enlist-no-gid",
        "Enlist",
        pb.EnlistRequest(branch=OK_BRANCH),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "enlist-unknown-gid",
        "Enlist",
        pb.EnlistRequest(gid="nope", branch=OK_BRANCH),
        grpc.StatusCode.NOT_FOUND,
    ),
    ("commit-no-gid", "Commit", pb.CommitRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    ("commit-unknown-gid", "Commit", pb.CommitRequest(gid="nope"), grpc.StatusCode.NOT_FOUND),
    ("abort-unknown-gid", "Abort", pb.AbortRequest(gid="nope"), grpc.StatusCode.NOT_FOUND),
    (
        "get-unknown-gid",
        "GetTransaction",
        pb.GetTransactionRequest(gid="nope"),
        grpc.StatusCode.NOT_FOUND,
    ),
    ("get-no-gid", "GetTransaction", pb.GetTransactionRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "list-limit-too-big",
        "ListTransactions",
        pb.ListTransactionsRequest(limit=5000),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "list-bad-state",
        "ListTransactions",
        pb.ListTransactionsRequest(states=[99]),  # type: ignore[list-item]
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("query-no-gid", "QueryOutcome", pb.QueryOutcomeRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    # String lengths (README: Limits and hostile input).
    (
        "execute-service-too-long",
        "Execute",
        pb.ExecuteRequest(branches=[pb.Branch(service="s" * 129, operation="x")]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-operation-too-long",
        "Execute",
        pb.ExecuteRequest(branches=[pb.Branch(service="bank-a", operation="o" * 129)]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "execute-branch-id-too-long",
        "Execute",
        pb.ExecuteRequest(
            branches=[pb.Branch(service="bank-a", operation="x", branch_id="b" * 65)]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "get-gid-too-long",
        "GetTransaction",
        pb.GetTransactionRequest(gid="g" * 129),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "abort-reason-too-long",
        "Abort",
        pb.AbortRequest(gid="nope", reason="r" * 1025),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "cancel-reason-too-long",
        "CancelSaga",
        pb.CancelSagaRequest(gid="nope", reason="r" * 1025),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "begin-key-not-printable",
        "Begin",
        pb.BeginRequest(idempotency_key="a\x00b"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    # Sagas.
    (
        "saga-no-steps",
        "StartSaga",
        pb.StartSagaRequest(definition=pb.SagaDefinition()),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "saga-too-many-steps",
        "StartSaga",
        pb.StartSagaRequest(
            definition=pb.SagaDefinition(steps=[_step(f"s{i}") for i in range(65)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "saga-step-timeout-too-long",
        "StartSaga",
        pb.StartSagaRequest(definition=pb.SagaDefinition(steps=[_step("s", timeout_ms=600_001)])),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "saga-timeout-too-long",
        "StartSaga",
        pb.StartSagaRequest(timeout_ms=600_001, definition=pb.SagaDefinition(steps=[_step("s")])),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "saga-too-many-final-codes",
        "StartSaga",
        pb.StartSagaRequest(
            definition=pb.SagaDefinition(
                steps=[_step("s", retry=pb.RetryPolicy(final_codes=["ABORTED"] * 17))]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "saga-duplicate-dependency",
        "StartSaga",
        pb.StartSagaRequest(
            definition=pb.SagaDefinition(steps=[_step("a"), _step("b", depends_on=["a", "a"])])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "saga-step-payload-too-big",
        "StartSaga",
        pb.StartSagaRequest(definition=pb.SagaDefinition(steps=[_step("s", payload=BIG)])),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "subscribe-batch-too-big",
        "Subscribe",
        pb.SubscribeRequest(max_batch=4097),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    # Over the 4 MiB message limit: refused by gRPC before any handler runs.
    (
        "execute-message-too-big",
        "Execute",
        pb.ExecuteRequest(
            branches=[pb.Branch(service="bank-a", operation="x", payload=b"x" * (5 << 20))]
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
]


def wal_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((root / "wal").glob("*.wal")))


async def test_malformed_requests(cluster: Cluster) -> None:
    # The service map names bank-a, but nothing needs to listen there: no request in the
    # table may reach a participant.
    coord = cluster.coordinator({"bank-a": "127.0.0.1:9"})
    before = wal_bytes(cluster.root)
    async with grpc.aio.insecure_channel(coord.address) as ch:
        stub = pb.CoordinatorStub(ch)
        for name, method, request, code in CASES:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                call = getattr(stub, method)(request, timeout=10)
                if method == "Subscribe":
                    async for _ in call:
                        pass
                else:
                    await call
            assert info.value.code() == code, f"{name}: {info.value.code()} {info.value.details()}"
            assert info.value.details(), f"{name}: no message"
        listed = await stub.ListTransactions(pb.ListTransactionsRequest(), timeout=10)
        assert list(listed.transactions) == []
    assert wal_bytes(cluster.root) == before, "a refused request wrote to the WAL"


async def test_state_and_key_errors(cluster: Cluster) -> None:
    coord = cluster.coordinator({"bank-a": "127.0.0.1:9"})
    async with grpc.aio.insecure_channel(coord.address) as ch:
        stub = pb.CoordinatorStub(ch)
        gid = (await stub.Begin(pb.BeginRequest(idempotency_key="k1", timeout_ms=60_000))).gid
        # Same key, same request: same gid. Same key, other request: ALREADY_EXISTS.
        assert (
            await stub.Begin(pb.BeginRequest(idempotency_key="k1", timeout_ms=60_000))
        ).gid == gid
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Begin(pb.BeginRequest(idempotency_key="k1", timeout_ms=1000))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        await stub.Abort(pb.AbortRequest(gid=gid, reason="test"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Enlist(pb.EnlistRequest(gid=gid, branch=OK_BRANCH))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        t = await stub.GetTransaction(pb.GetTransactionRequest(gid=gid))
        assert t.state == pb.TXN_STATE_ABORTED and t.reason == "test"


#: Bytes that are not a valid message of any request type: a truncated varint, a field
#: with wire type 7, a length past the end, a string field with invalid UTF-8.
GARBAGE = [b"\xff\xff\xff", b"\x0f", b"\x0a\x05ab", b"\x0a\x01\xff"]


def _methods(descriptor: Any) -> list[tuple[str, bool, bool, Any]]:
    return [
        (
            f"/{descriptor.full_name}/{m.name}",
            m.client_streaming,
            m.server_streaming,
            message_factory.GetMessageClass(m.input_type),
        )
        for m in descriptor.methods
    ]


def _decodes(cls: Any, data: bytes) -> bool:
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


async def _send_raw(
    ch: grpc.aio.Channel, method: str, streams: tuple[bool, bool], data: bytes
) -> grpc.StatusCode:
    """Sends ``data`` as the request bytes (no serializer) and returns the status."""
    client_streaming, server_streaming = streams
    try:
        if client_streaming:

            async def requests() -> Any:
                yield data

            call: Any = ch.stream_stream(method)(requests(), timeout=10)
            async for _ in call:
                pass
            return await call.code()
        if server_streaming:
            call = ch.unary_stream(method)(data, timeout=10)
            async for _ in call:
                pass
            return await call.code()
        await ch.unary_unary(method)(data, timeout=10)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


async def test_undecodable_requests(cluster: Cluster) -> None:
    """Bytes that do not decode, to every method of every service: INVALID_ARGUMENT, at
    most one log line (rate-limited), no traceback, nothing in the WAL."""
    from grpc_health.v1 import health_pb2

    import accord.bank.v1 as bankpb

    bank = cluster.bank("bank-a", extra=["--log-level", "info"])
    coord = cluster.coordinator({"bank-a": bank.address})
    before = wal_bytes(cluster.root)
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    targets = [
        (coord, _methods(pb.coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"])),
        (coord, _methods(health)),
        (bank, _methods(pb.participant_pb2.DESCRIPTOR.services_by_name["Participant"])),
        (bank, _methods(bankpb.bank_pb2.DESCRIPTOR.services_by_name["Bank"])),
        (bank, _methods(health)),
    ]
    sent = 0
    for proc, methods in targets:
        async with grpc.aio.insecure_channel(proc.address) as ch:
            for method, cs, ss, cls in methods:
                if method.endswith("/Health/List"):
                    continue  # not implemented by grpcio's health servicer
                for data in GARBAGE:
                    if _decodes(cls, data):
                        continue  # e.g. invalid UTF-8 where field 1 is not a string
                    code = await _send_raw(ch, method, (cs, ss), data)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method} {data!r}: {code}"
                    sent += 1
    assert sent > 50
    assert wal_bytes(cluster.root) == before, "an undecodable request wrote to the WAL"
    for proc in (coord, bank):
        out = proc.output()
        assert "Traceback" not in out, out[-2000:]
        lines = [ln for ln in out.splitlines() if "event=undecodable_request" in ln]
        assert len(lines) == 1, lines  # all within 10 s: the first one only
    # Found by the fuzzer: an epoch over 2**63 - 1 (the proto field is uint64) was an
    # INTERNAL error with a traceback in the participant.
    async with grpc.aio.insecure_channel(bank.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb.ParticipantStub(ch).Prepare(
                pb.BranchRequest(gid="accord-1:00", branch_id="b1", operation="debit", epoch=2**63),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Still serving, and a good transaction still commits.
    async with grpc.aio.insecure_channel(coord.address) as ch:
        await open_accounts(bank.address, {"a": 100})
        t = await pb.CoordinatorStub(ch).Execute(
            pb.ExecuteRequest(
                branches=[
                    pb.Branch(
                        service="bank-a", operation="debit", payload=b'{"account":"a","amount":1}'
                    )
                ]
            ),
            timeout=10,
        )
        assert t.transaction.state == pb.TXN_STATE_COMMITTED, t


async def test_resource_limits(cluster: Cluster) -> None:
    """RESOURCE_EXHAUSTED at each global limit, nothing written by the refusals, and a
    released watcher or subscriber makes room again."""
    coord = cluster.coordinator(
        {"bank-a": "127.0.0.1:9"},
        extra=[
            "--max-inflight",
            "1",
            "--max-branches",
            "2",
            "--max-watchers",
            "2",
            "--max-subscribers",
            "1",
        ],
    )
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    async with grpc.aio.insecure_channel(coord.address) as ch:
        stub = pb.CoordinatorStub(ch)
        gid = (await stub.Begin(pb.BeginRequest(timeout_ms=60_000), timeout=10)).gid
        for i in range(2):
            await stub.Enlist(
                pb.EnlistRequest(
                    gid=gid, branch=pb.Branch(service="bank-a", operation="x", branch_id=f"b{i}")
                ),
                timeout=10,
            )
        # Watchers: two open (each has had its first event), the third refused.
        watchers = [
            stub.WatchTransaction(pb.WatchTransactionRequest(gid=gid), timeout=30) for _ in range(2)
        ]
        for w in watchers:
            assert (await w.read()).gid == gid
        subscriber = stub.Subscribe(pb.SubscribeRequest(from_lsn=0), timeout=30)
        hello = await subscriber.read()  # the handshake: the shard, no events
        assert hello.shard and not hello.events
        assert (await subscriber.read()).events  # the BEGIN record
        before = wal_bytes(cluster.root)
        refusals: list[tuple[str, Any]] = [
            ("begin", stub.Begin(pb.BeginRequest(), timeout=10)),
            ("execute", stub.Execute(pb.ExecuteRequest(branches=[OK_BRANCH]), timeout=10)),
            (
                "enlist",
                stub.Enlist(
                    pb.EnlistRequest(
                        gid=gid, branch=pb.Branch(service="bank-a", operation="x", branch_id="b2")
                    ),
                    timeout=10,
                ),
            ),
        ]
        for name, call in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == exhausted, f"{name}: {info.value.details()}"
        for name, request, method in [
            ("watch", pb.WatchTransactionRequest(gid=gid), stub.WatchTransaction),
            ("subscribe", pb.SubscribeRequest(from_lsn=0), stub.Subscribe),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await method(request, timeout=10).read()
            assert info.value.code() == exhausted, f"{name}: {info.value.details()}"
            assert "limit" in (info.value.details() or "")
        assert wal_bytes(cluster.root) == before, "a refused request wrote to the WAL"
        # Room again once one leaves (the server notices the cancel: a bounded retry).
        watchers[0].cancel()
        subscriber.cancel()
        again: list[tuple[Any, Any]] = [
            (stub.WatchTransaction, pb.WatchTransactionRequest(gid=gid)),
            (stub.Subscribe, pb.SubscribeRequest(from_lsn=0)),
        ]
        for method, request in again:
            for attempt in range(50):
                call = method(request, timeout=10)
                try:
                    await call.read()
                    break
                except grpc.aio.AioRpcError as e:
                    assert e.code() == exhausted and attempt < 49, e
                    await asyncio.sleep(0.1)
                finally:
                    call.cancel()
        watchers[1].cancel()
        await stub.Abort(pb.AbortRequest(gid=gid), timeout=10)
