"""A table of malformed requests against a real coordinator: each gets its status code,
and nothing is kept (no transaction appears, the WAL does not grow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

import accord.v1 as pb
from tests.integration.conftest import Cluster

BIG = b"x" * (256 * 1024 + 1)
OK_BRANCH = pb.Branch(service="bank-a", operation="debit", payload=b"{}")

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
                await getattr(stub, method)(request, timeout=10)
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
