"""Fuzzing a live coordinator and a live participant (real processes) with hypothesis:
requests built from the protos with hostile strings, bytes and integers within and
beyond the documented limits, and raw bytes sent to every method.

Properties:

* no answer is INTERNAL or UNKNOWN, and no process logs a traceback;
* a refused request leaves the coordinator's WAL byte-for-byte unchanged (checked when
  no transaction was in flight before it: an accepted one writes, later too);
* afterwards both processes are healthy (SERVING) and a good transaction commits.

``make test`` runs ``ACCORD_FUZZ_N`` (default 100) examples per test, derandomized (the
same examples every run); ``make fuzz FUZZ_N=...`` runs more. Strategies keep accepted
transactions short (timeouts of at most 300 ms, or beyond the limit; no pivot) so the WAL check
runs often; the exact limits themselves are in test_bad_input.py."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import accord.v1 as pb
from accord.tools.topology import ManagedProcess, Topology, open_accounts

N = int(os.environ.get("ACCORD_FUZZ_N", "100"))
FUZZ = settings(
    max_examples=N,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

#: Answers that refuse a request: nothing may have been written for it.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
NEVER = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
IN_FLIGHT = [
    pb.TXN_STATE_ACTIVE,
    pb.TXN_STATE_PREPARING,
    pb.TXN_STATE_COMMITTING,
    pb.TXN_STATE_ABORTING,
    pb.TXN_STATE_RUNNING,
    pb.TXN_STATE_COMPENSATING,
]


@dataclass
class Live:
    root: Path
    coordinator: ManagedProcess
    bank: ManagedProcess
    coord_ch: grpc.Channel
    bank_ch: grpc.Channel
    stats: Counter[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    import asyncio

    root = tmp_path_factory.mktemp("fuzz")
    with Topology(root) as t:
        bank = t.bank("bank-a", log_level="info")
        coord = t.coordinator(
            services={"bank-a": bank.address},
            retry_max_s=0.1,
            default_timeout_ms=500,
            log_level="info",
            # Small segments: the WAL is hashed around every request.
            extra=["--segment-bytes", str(1 << 20), "--call-timeout-s", "0.5"],
        )
        asyncio.run(open_accounts(bank.address, {"a": 1_000_000, "b": 0}))
        with grpc.insecure_channel(coord.address) as cc, grpc.insecure_channel(bank.address) as bc:
            yield Live(root, coord, bank, cc, bc, Counter())
        for proc in (coord, bank):
            out = proc.output()
            assert "Traceback" not in out, out[-3000:]
            assert proc.alive()


def wal_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((root / "wal").glob("*.wal")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def idle(ch: grpc.Channel) -> bool:
    listed = pb.CoordinatorStub(ch).ListTransactions(
        pb.ListTransactionsRequest(states=IN_FLIGHT, limit=1), timeout=10
    )
    return not listed.transactions


def call(
    ch: grpc.Channel, method: str, request: bytes, *, streaming: bool = False
) -> grpc.StatusCode:
    """Sends raw request bytes; the status of the answer (a stream: its first message)."""
    try:
        if streaming:
            stream = ch.unary_stream(method)(request, timeout=0.5)
            next(stream, None)
            stream.cancel()
            code = stream.code()
            return grpc.StatusCode.OK if code == grpc.StatusCode.CANCELLED else code
        ch.unary_unary(method)(request, timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        assert isinstance(code, grpc.StatusCode)
        return code


# ----------------------------------------------------------------------- strategies

TEXT = st.text(max_size=140)
NAMES = st.one_of(
    st.sampled_from(["bank-a", "nobody", "", "debit", "credit", "refund", "x.y-z_1", "n" * 129]),
    TEXT,
)
ADDRESSES = st.one_of(
    st.just(""),
    st.just(""),
    st.sampled_from(["127.0.0.1:1", "host", "[::1]:70000", "a:0", "256.0.0.1:80"]),
    st.text(max_size=30),
)
PAYLOADS = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"{}", b'{"account":"a","amount":1}', b'{"account":"zz","amount":-5}']),
    st.sampled_from([b"p" * (256 * 1024), b"p" * (256 * 1024 + 1)]),
)
#: Short or beyond the limit (10 min): accepted transactions end quickly.
TIMEOUTS = st.one_of(st.just(0), st.integers(1, 300), st.integers(600_001, 2**32 - 1))
KEYS = st.one_of(st.just(""), TEXT)
GIDS = st.one_of(st.just(""), st.sampled_from(["accord-1:00", "other:ff", "g" * 129]), TEXT)
U32 = st.integers(0, 2**32 - 1)

BRANCHES = st.builds(
    pb.Branch,
    service=NAMES,
    address=ADDRESSES,
    operation=NAMES,
    payload=PAYLOADS,
    branch_id=st.one_of(st.just(""), st.text(max_size=70)),
)
RETRY = st.builds(
    pb.RetryPolicy,
    initial_interval_ms=st.one_of(st.integers(0, 50), U32),
    multiplier=st.floats(allow_nan=True, allow_infinity=True),
    max_interval_ms=st.one_of(st.integers(0, 50), U32),
    max_attempts=st.one_of(st.integers(0, 3), U32),
    final_codes=st.lists(st.one_of(st.sampled_from(["ABORTED", "NOT_FOUND"]), TEXT), max_size=20),
)
STEPS = st.builds(
    pb.SagaStep,
    name=NAMES,
    service=NAMES,
    address=ADDRESSES,
    action=NAMES,
    compensation=NAMES,
    payload=PAYLOADS,
    compensation_payload=PAYLOADS,
    depends_on=st.lists(NAMES, max_size=3),
    retry=RETRY,
    timeout_ms=TIMEOUTS,
    # No pivot: a step after it is retried without end, and an unreachable target (a
    # valid but closed address) would keep its saga running for the rest of the run.
    pivot=st.just(False),
)
REQUESTS: st.SearchStrategy[tuple[str, Any]] = st.one_of(
    st.tuples(
        st.just("Begin"), st.builds(pb.BeginRequest, idempotency_key=KEYS, timeout_ms=TIMEOUTS)
    ),
    st.tuples(st.just("Enlist"), st.builds(pb.EnlistRequest, gid=GIDS, branch=BRANCHES)),
    st.tuples(
        st.just("Execute"),
        st.builds(
            pb.ExecuteRequest,
            idempotency_key=KEYS,
            timeout_ms=TIMEOUTS,
            branches=st.one_of(st.lists(BRANCHES, max_size=4), BRANCHES.map(lambda b: [b] * 65)),
        ),
    ),
    st.tuples(
        st.just("StartSaga"),
        st.builds(
            pb.StartSagaRequest,
            idempotency_key=KEYS,
            timeout_ms=TIMEOUTS,
            definition=st.builds(
                pb.SagaDefinition,
                steps=st.one_of(st.lists(STEPS, max_size=4), STEPS.map(lambda s: [s] * 65)),
            ),
        ),
    ),
    st.tuples(st.just("Commit"), st.builds(pb.CommitRequest, gid=GIDS)),
    st.tuples(
        st.just("Abort"), st.builds(pb.AbortRequest, gid=GIDS, reason=st.text(max_size=1100))
    ),
    st.tuples(
        st.just("CancelSaga"),
        st.builds(pb.CancelSagaRequest, gid=GIDS, reason=st.text(max_size=1100)),
    ),
    st.tuples(st.just("RetryTransaction"), st.builds(pb.RetryTransactionRequest, gid=GIDS)),
    st.tuples(st.just("GetTransaction"), st.builds(pb.GetTransactionRequest, gid=GIDS)),
    st.tuples(st.just("QueryOutcome"), st.builds(pb.QueryOutcomeRequest, gid=GIDS)),
    st.tuples(
        st.just("ListTransactions"),
        st.builds(
            pb.ListTransactionsRequest,
            states=st.lists(st.integers(0, 40), max_size=4),
            limit=U32,
            page_token=st.text(max_size=60),
        ),
    ),
)
BRANCH_REQUESTS = st.builds(
    pb.BranchRequest,
    gid=GIDS,
    branch_id=st.one_of(st.just("b1"), st.text(max_size=80)),
    operation=NAMES,
    payload=PAYLOADS,
    shard=st.one_of(st.just("accord-1"), TEXT),
    epoch=st.integers(0, 2**64 - 1),
    coordinator_address=ADDRESSES,
    one_phase=st.booleans(),
    trace_context=st.dictionaries(TEXT, TEXT, max_size=3),
)


def _methods(descriptor: Any) -> list[tuple[str, bool, bool]]:
    return [
        (f"/{descriptor.full_name}/{m.name}", m.client_streaming, m.server_streaming)
        for m in descriptor.methods
    ]


COORDINATOR_METHODS = _methods(pb.coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"])
PARTICIPANT_METHODS = [
    m for m in _methods(pb.participant_pb2.DESCRIPTOR.services_by_name["Participant"]) if not m[1]
]


# ----------------------------------------------------------------------- properties


def _check(live: Live, send: Callable[[], grpc.StatusCode], what: str) -> None:
    was_idle = idle(live.coord_ch)
    before = wal_digest(live.root) if was_idle else ""
    code = send()
    live.stats[code.name] += 1
    assert code not in NEVER, f"{what}: {code}"
    if was_idle and code in REFUSALS:
        live.stats["wal-checked"] += 1
        assert wal_digest(live.root) == before, f"{what}: refused with {code} but the WAL changed"
    _abort_active(live.coord_ch)


def _abort_active(ch: grpc.Channel) -> None:
    """Ends transactions a fuzzed Begin left open, so the next WAL check can run."""
    stub = pb.CoordinatorStub(ch)
    listed = stub.ListTransactions(
        pb.ListTransactionsRequest(states=[pb.TXN_STATE_ACTIVE], limit=100), timeout=10
    )
    for txn in listed.transactions:
        try:
            stub.Abort(pb.AbortRequest(gid=txn.gid, reason="fuzz cleanup"), timeout=10)
        except grpc.RpcError as e:
            assert e.code() not in NEVER, e


@FUZZ
@given(REQUESTS)
def test_fuzz_coordinator_structured(live: Live, case: tuple[str, Any]) -> None:
    method, request = case
    _check(
        live,
        lambda: call(
            live.coord_ch, f"/accord.v1.Coordinator/{method}", request.SerializeToString()
        ),
        f"{method}({request!r:.300})",
    )


@FUZZ
@given(st.sampled_from(COORDINATOR_METHODS), st.binary(max_size=300))
def test_fuzz_coordinator_raw(live: Live, method: tuple[str, bool, bool], data: bytes) -> None:
    name, _client_streaming, server_streaming = method
    _check(
        live,
        lambda: call(live.coord_ch, name, data, streaming=server_streaming),
        f"{name} {data!r}",
    )


@FUZZ
@given(
    st.sampled_from(PARTICIPANT_METHODS),
    st.one_of(BRANCH_REQUESTS.map(lambda r: r.SerializeToString()), st.binary(max_size=300)),
)
def test_fuzz_participant(live: Live, method: tuple[str, bool, bool], data: bytes) -> None:
    name = method[0]
    code = call(live.bank_ch, name, data)
    live.stats[f"participant-{code.name}"] += 1
    assert code not in NEVER, f"{name} {data!r}: {code}"


def test_fuzz_after(live: Live) -> None:
    """Runs last: both processes healthy, a good transaction commits, and the WAL check
    ran on a fair share of the refusals."""
    for ch in (live.coord_ch, live.bank_ch):
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    t = pb.CoordinatorStub(live.coord_ch).Execute(
        pb.ExecuteRequest(
            timeout_ms=10_000,
            branches=[
                pb.Branch(
                    service="bank-a", operation="debit", payload=b'{"account":"a","amount":1}'
                ),
                pb.Branch(
                    service="bank-a", operation="credit", payload=b'{"account":"b","amount":1}'
                ),
            ],
        ),
        timeout=30,
    )
    assert t.transaction.state == pb.TXN_STATE_COMMITTED, t
    print(f"fuzz: {N} examples per test; answers {dict(live.stats)}")
    assert live.stats["wal-checked"] >= N // 4, live.stats
