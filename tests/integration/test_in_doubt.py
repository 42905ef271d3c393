"""Presumed abort across real processes: the coordinator dies after the votes and the
unsynced tail of its log is lost (as after a power cut: the branch list rode the group
commit and was never forced). The participants hold their branches prepared, ask the
restarted coordinator for the outcome (QueryOutcome), hear "unknown gid, so aborted",
and release the funds by themselves."""

from __future__ import annotations

import contextlib
import shutil

from accord.client import AccordClient, AccordClientError, Branch
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts


async def test_participants_resolve_a_lost_transaction_by_asking(cluster: Cluster) -> None:
    a = cluster.bank("bank-a", in_doubt_after_s=1.0)
    b = cluster.bank("bank-b", in_doubt_after_s=1.0)
    await open_accounts(a.address, {"x": 100})
    await open_accounts(b.address, {"y": 100})
    services = {"bank-a": a.address, "bank-b": b.address}
    coord = cluster.coordinator(services, env={"ACCORD_FAILPOINTS": "after_prepare_votes=crash"})
    port = int(coord.address.rsplit(":", 1)[1])
    async with AccordClient(coord.address, timeout_s=15) as client:
        with contextlib.suppress(AccordClientError):
            await client.execute(
                [
                    Branch(
                        service="bank-a", operation="debit", payload={"account": "x", "amount": 40}
                    ),
                    Branch(
                        service="bank-b", operation="credit", payload={"account": "y", "amount": 40}
                    ),
                ]
            )
    coord.wait(15)
    held = await balances(a.address)
    assert held.prepared_branches == 1 and held.total_held == 40
    shutil.rmtree(cluster.root / "wal")  # the log's unsynced tail is gone
    cluster.coordinator(services, port=port)
    ra = await assert_eventually(
        lambda: balances(a.address), lambda r: r.prepared_branches == 0, what="bank-a resolved"
    )
    rb = await assert_eventually(
        lambda: balances(b.address), lambda r: r.prepared_branches == 0, what="bank-b resolved"
    )
    assert (ra.total, ra.total_held, rb.total) == (100, 0, 100)
