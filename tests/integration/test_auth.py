"""Callers and roles across real processes: a coordinator with static tokens (and one with
a JWT key) and real banks. A call without a valid token, or with a role that does not
allow it, is refused and changes nothing (the WAL directory byte for byte); a client
sees only its own transactions; idempotency keys are per caller; the in-flight limit per
caller; participants still ask the coordinator for outcomes (QueryOutcome takes no
token); the command line sends ACCORD_TOKEN."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import jwt
import pytest

import accord.v1 as pb
from accord.client import (
    AccordClient,
    Branch,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SagaStep,
    UnauthenticatedError,
)
from accord.common.transport import make_channel
from tests.integration._bank_helpers import branch
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

pytestmark = pytest.mark.integration

A = "tok-client-a-" + "a" * 20
B = "tok-client-b-" + "b" * 20
ADMIN = "tok-admin-" + "c" * 20
READER = "tok-reader-" + "d" * 20
SECRET = b"a-jwt-hmac-secret-for-the-tests-" + b"e" * 32


def wal_digest(wal: Path) -> dict[str, str]:
    return {
        str(p.relative_to(wal)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(wal.rglob("*"))
        if p.is_file()
    }


def transfer(amount: int = 1) -> list[Branch]:
    return [
        Branch(service="bank-a", operation="debit", payload={"account": "x", "amount": amount}),
        Branch(service="bank-b", operation="credit", payload={"account": "y", "amount": amount}),
    ]


def accord(*args: str, token: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ACCORD_TOKEN"}
    if token:
        env["ACCORD_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "accord.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


async def test_static_tokens_roles_callers_and_limits(cluster: Cluster) -> None:
    a = cluster.bank("bank-a", in_doubt_after_s=0.5)
    b = cluster.bank("bank-b")
    await open_accounts(a.address, {"x": 100})
    await open_accounts(b.address, {"y": 0})
    tokens = cluster.root / "tokens"
    tokens.write_text(
        f"{A} client shop-a\n{B} client shop-b\n{ADMIN} admin ops\n{READER} reader dash\n"
    )
    coord = cluster.coordinator(
        {"bank-a": a.address, "bank-b": b.address},
        extra=["--auth-tokens", str(tokens), "--max-inflight-per-caller", "3"],
    )
    addr = coord.address
    wal = cluster.root / "wal"
    step = SagaStep(name="s", service="bank-a", action="debit", compensation="credit")

    # Refused calls change nothing: no token, a wrong one, a role that does not allow it.
    before = wal_digest(wal)
    async with (
        AccordClient(addr, timeout_s=10) as anon,
        AccordClient(addr, token="tok-wrong-" + "z" * 20, timeout_s=10) as wrong,
        AccordClient(addr, token=READER, timeout_s=10) as reader,
    ):
        for c in (anon, wrong):
            for call in (
                c.begin(),
                c.execute(transfer(), idempotency_key="k"),
                c.start_saga([step]),
                c.retry("0-x"),
                c.list(),
            ):
                with pytest.raises(UnauthenticatedError):
                    await call
        with pytest.raises(PermissionDeniedError, match="lacks the client role"):
            await reader.execute(transfer())
        with pytest.raises(PermissionDeniedError):
            await reader.retry("0-x")
    assert wal_digest(wal) == before
    assert (await balances(a.address)).total == 100

    async with (
        AccordClient(addr, token=A, timeout_s=10) as ca,
        AccordClient(addr, token=B, timeout_s=10) as cb,
        AccordClient(addr, token=ADMIN, timeout_s=10) as admin,
        AccordClient(addr, token=READER, timeout_s=10) as reader,
    ):
        # The same idempotency key from two callers: two transactions.
        ta = await ca.execute(transfer(), idempotency_key="order-1")
        tb = await cb.execute(transfer(), idempotency_key="order-1")
        assert ta.committed and tb.committed and ta.gid != tb.gid
        assert (await ca.execute(transfer(), idempotency_key="order-1")).gid == ta.gid
        # B cannot see or drive A's transaction: NOT_FOUND, as for an unknown gid.
        for call in (cb.get(ta.gid), cb.commit(ta.gid), cb.abort(ta.gid)):
            with pytest.raises(NotFoundError):
                await call
        with pytest.raises(NotFoundError):
            async for _ in cb.watch(ta.gid):
                pass
        assert [t.gid for t in (await cb.list())[0]] == [tb.gid]
        assert [t.gid for t in (await ca.list())[0]] == [ta.gid]
        assert {t.gid for t in (await admin.list())[0]} == {ta.gid, tb.gid}
        assert {t.gid for t in (await reader.list())[0]} == {ta.gid, tb.gid}
        assert (await reader.get(ta.gid)).committed
        # RetryTransaction is an admin's: a client is denied, an admin gets through
        # (to "not STUCK").
        with pytest.raises(PermissionDeniedError):
            await ca.retry(ta.gid)
        with pytest.raises(FailedPreconditionError, match="only a STUCK saga"):
            await admin.retry(ta.gid)

        # In flight per caller (limit 3): A's fourth is refused, B still begins.
        open_a = [await ca.begin(timeout_ms=60_000) for _ in range(3)]
        with pytest.raises(ResourceExhaustedError, match="limit 3 per caller"):
            await ca.begin()
        await cb.begin()

        # A participant asks QueryOutcome without a token: a branch prepared at bank-a
        # for A's ACTIVE transaction, which A then aborts; the bank's resolver asks the
        # coordinator and releases the hold.
        gid = open_a[0].gid
        async with make_channel(a.address) as channel:
            prepared = await pb.ParticipantStub(channel).Prepare(
                branch(gid, "b9", "debit", "x", 7, coordinator_address=addr), timeout=10
            )
        assert prepared is not None
        assert (await balances(a.address)).total_held == 7
        await ca.abort(gid)
        resolved = await assert_eventually(
            lambda: balances(a.address), lambda r: r.prepared_branches == 0, what="resolved"
        )
        assert resolved.total_held == 0

    # The command line sends ACCORD_TOKEN (and is refused without it).
    ok = accord("txn", "get", ta.gid, "--coordinator", addr, "--json", token=A)
    assert ok.returncode == 0, ok.stderr
    assert ta.gid in ok.stdout
    other = accord("txn", "get", ta.gid, "--coordinator", addr, token=B)
    assert other.returncode == 1 and "NOT_FOUND" in other.stderr
    anon_cli = accord("txn", "list", "--coordinator", addr)
    assert anon_cli.returncode == 1 and "UNAUTHENTICATED" in anon_cli.stderr
    remote = accord("txn", "list", "--coordinator", "192.0.2.1:7070", token=A)
    assert remote.returncode != 0 and "refusing to send a token" in remote.stderr

    # No token reached the log.
    log = coord.output()
    assert all(t not in log for t in (A, B, ADMIN, READER, "tok-wrong-"))


async def test_jwt_callers(cluster: Cluster) -> None:
    a = cluster.bank("bank-a")
    b = cluster.bank("bank-b")
    await open_accounts(a.address, {"x": 10})
    await open_accounts(b.address, {"y": 0})
    key = cluster.root / "jwt.secret"
    key.write_bytes(SECRET)
    coord = cluster.coordinator(
        {"bank-a": a.address, "bank-b": b.address},
        extra=["--auth-jwt-key", str(key), "--auth-jwt-audience", "accord"],
    )
    wal = cluster.root / "wal"
    now = int(time.time())

    def token(**over: object) -> str:
        claims: dict[str, object] = {"sub": "shop-j", "roles": ["client"], "aud": "accord"}
        claims["exp"] = now + 300
        claims.update(over)
        return jwt.encode(claims, SECRET, algorithm="HS256")

    async with AccordClient(coord.address, token=token(), timeout_s=10) as c:
        t = await c.execute(transfer())
        assert t.committed
        with pytest.raises(PermissionDeniedError):
            await c.retry(t.gid)
    before = wal_digest(wal)
    for bad in (
        token(exp=now - 60),
        token(aud="elsewhere"),
        jwt.encode({"sub": "x", "exp": now + 60, "aud": "accord"}, b"w" * 64, algorithm="HS256"),
    ):
        async with AccordClient(coord.address, token=bad, timeout_s=10) as c:
            with pytest.raises(UnauthenticatedError):
                await c.execute(transfer())
    assert wal_digest(wal) == before
    # A raw call with a malformed authorization value: UNAUTHENTICATED too.
    async with make_channel(coord.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb.CoordinatorStub(channel).Begin(
                pb.BeginRequest(), metadata=(("authorization", "Basic xyz"),), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
