"""The coordinator SIGKILLs itself at each protocol step (a failpoint); restarted on the
same WAL directory it must finish the transfer: committed at both banks or aborted at
both, matching what the client was told, with the total balance conserved."""

from __future__ import annotations

import pytest

from accord.client import AccordClient, AccordClientError, Branch
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

# failpoint -> the outcome recovery must reach (None: either, but atomically)
FAILPOINTS = {
    "before_prepare": "aborted",
    "after_prepare_votes": "aborted",
    "before_decision": "aborted",
    "after_decision_fsync": "committed",
    "before_commit_send": "committed",
    "mid_commit": "committed",
    "before_end_record": "committed",
}


def transfer(amount: int) -> list[Branch]:
    return [
        Branch(service="bank-a", operation="debit", payload={"account": "a", "amount": amount}),
        Branch(service="bank-b", operation="credit", payload={"account": "b", "amount": amount}),
    ]


async def run_crash(cluster: Cluster, failpoint: str, branches: list[Branch]) -> tuple[str, str]:
    a = cluster.bank("bank-a")
    b = cluster.bank("bank-b")
    await open_accounts(a.address, {"a": 100})
    await open_accounts(b.address, {"b": 100})
    services = {"bank-a": a.address, "bank-b": b.address}
    coord = cluster.coordinator(services, env={"ACCORD_FAILPOINTS": f"{failpoint}=crash"})
    port = coord.address.rsplit(":", 1)[1]
    told = "unknown"
    async with AccordClient(coord.address, timeout_s=15) as client:
        try:
            result = await client.execute(branches, idempotency_key="t1")
            told = "committed" if result.committed else "aborted"
        except AccordClientError:
            told = "unknown"
    assert coord.wait(15) != 0, "the failpoint should have killed the coordinator"
    coord2 = cluster.coordinator(services, port=int(port))
    async with AccordClient(coord2.address, timeout_s=15) as client:
        # The retried request (same idempotency key) learns the outcome.
        result = await client.execute(branches, idempotency_key="t1")
        await assert_eventually(
            lambda: client.get(result.gid), lambda t: t.final, what="final state"
        )
        final = (await client.get(result.gid)).state.lower()
    ba = await assert_eventually(
        lambda: balances(a.address), lambda r: r.prepared_branches == 0, what="bank-a settled"
    )
    bb = await assert_eventually(
        lambda: balances(b.address), lambda r: r.prepared_branches == 0, what="bank-b settled"
    )
    assert ba.total + bb.total == 200, "money created or destroyed"
    outcomes = {(70, 130): "committed", (100, 100): "aborted"}
    outcome = outcomes.get((ba.total, bb.total))
    assert outcome is not None, f"not atomic: bank-a {ba.total}, bank-b {bb.total}"
    assert outcome == final
    if told != "unknown":
        assert told == outcome, f"client was told {told}, but the outcome is {outcome}"
    return told, outcome


@pytest.mark.parametrize("failpoint", list(FAILPOINTS))
async def test_coordinator_crash_at_each_step(cluster: Cluster, failpoint: str) -> None:
    _told, outcome = await run_crash(cluster, failpoint, transfer(30))
    assert outcome == FAILPOINTS[failpoint]


async def test_one_phase_commit_crash_is_resent(cluster: Cluster) -> None:
    # A single branch commits in one phase; a crash before it is sent must not lose it.
    a = cluster.bank("bank-a")
    await open_accounts(a.address, {"a": 100})
    services = {"bank-a": a.address}
    coord = cluster.coordinator(services, env={"ACCORD_FAILPOINTS": "before_prepare=crash"})
    port = int(coord.address.rsplit(":", 1)[1])
    branch = [Branch(service="bank-a", operation="debit", payload={"account": "a", "amount": 10})]
    async with AccordClient(coord.address, timeout_s=15) as client:
        with pytest.raises(AccordClientError):
            await client.execute(branch, idempotency_key="one")
    coord.wait(15)
    coord2 = cluster.coordinator(services, port=port)
    async with AccordClient(coord2.address) as client:
        result = await client.execute(branch, idempotency_key="one")
        assert result.state == "COMMITTED" and result.one_phase
    r = await balances(a.address)
    assert r.total == 90 and r.prepared_branches == 0


async def test_failed_fsync_stops_the_coordinator_and_acknowledges_nothing(
    cluster: Cluster,
) -> None:
    a = cluster.bank("bank-a")
    b = cluster.bank("bank-b")
    await open_accounts(a.address, {"a": 100})
    await open_accounts(b.address, {"b": 100})
    services = {"bank-a": a.address, "bank-b": b.address}
    coord = cluster.coordinator(services, env={"ACCORD_FAILPOINTS": "wal_fsync=error"})
    port = int(coord.address.rsplit(":", 1)[1])
    async with AccordClient(coord.address, timeout_s=15) as client:
        with pytest.raises(AccordClientError):
            await client.execute(transfer(30), idempotency_key="f1")
    assert coord.wait(15) == 70, coord.output()
    assert "fail-stop" in coord.output()
    coord2 = cluster.coordinator(services, port=port)
    async with AccordClient(coord2.address) as client:
        # The client was never told "committed". The COMMIT record reached the file
        # before fdatasync failed, so recovery may find it: either outcome is allowed,
        # but it must be one outcome, the same one the retry reports, applied once.
        result = await client.execute(transfer(30), idempotency_key="f1")
        assert result.final or result.committed
    ba = await assert_eventually(lambda: balances(a.address), lambda r: r.prepared_branches == 0)
    bb = await assert_eventually(lambda: balances(b.address), lambda r: r.prepared_branches == 0)
    expected = (70, 130) if result.committed else (100, 100)
    assert (ba.total, bb.total) == expected


async def test_participant_crash_after_voting_yes(cluster: Cluster) -> None:
    from tests.integration.conftest import free_port

    a = cluster.bank("bank-a")
    b_port = free_port()
    b = cluster.bank("bank-b", port=b_port)
    await open_accounts(a.address, {"a": 100})
    await open_accounts(b.address, {"b": 100})
    services = {"bank-a": a.address, "bank-b": b.address}
    # Hold the coordinator between the votes and the decision long enough to crash bank-b.
    coord = cluster.coordinator(
        services, env={"ACCORD_FAILPOINTS": "after_prepare_votes=sleep:1500"}
    )
    import asyncio

    async with AccordClient(coord.address, timeout_s=30) as client:
        task = asyncio.create_task(client.execute(transfer(30), idempotency_key="p1"))
        await assert_eventually(
            lambda: balances(b.address), lambda r: r.prepared_branches == 1, timeout_s=5
        )
        b.kill()  # SIGKILL after its yes vote
        b2 = cluster.bank("bank-b", port=b_port)
        result = await task
    assert result.committed
    rb = await assert_eventually(lambda: balances(b2.address), lambda r: r.prepared_branches == 0)
    ra = await balances(a.address)
    assert (ra.total, rb.total) == (70, 130)
