"""Under sustained load the coordinator checkpoints and deletes old WAL segments, so its
disk use stays bounded; a restart from a checkpointed log still knows every recent
transaction and its idempotency key."""

from __future__ import annotations

import asyncio

from accord.client import AccordClient, Branch
from tests.integration.conftest import Cluster, balances, open_accounts


def wal_usage(cluster: Cluster) -> tuple[int, int]:
    count = size = 0
    for p in (cluster.root / "wal").iterdir():
        try:  # the coordinator may delete a segment while we look
            st = p.stat()
        except FileNotFoundError:
            continue
        if p.is_file():
            count, size = count + 1, size + st.st_size
    return count, size


async def test_disk_use_stays_bounded_and_restart_works(cluster: Cluster) -> None:
    a, b = cluster.bank("bank-a"), cluster.bank("bank-b")
    await open_accounts(a.address, {"x": 100_000})
    await open_accounts(b.address, {"y": 0})
    services = {"bank-a": a.address, "bank-b": b.address}
    seg = 64 * 1024
    extra = ["--segment-bytes", str(seg), "--checkpoint-every", "200"]
    coord = cluster.coordinator(services, extra=extra)
    port = int(coord.address.rsplit(":", 1)[1])
    usage = []
    gids: dict[int, str] = {}
    transfer = [
        Branch(service="bank-a", operation="debit", payload={"account": "x", "amount": 1}),
        Branch(service="bank-b", operation="credit", payload={"account": "y", "amount": 1}),
    ]
    async with AccordClient(coord.address) as client:

        async def one(i: int) -> None:
            r = await client.execute(transfer, idempotency_key=f"k{i}")
            assert r.committed
            gids[i] = r.gid

        for burst in range(6):
            await asyncio.gather(*(one(burst * 100 + i) for i in range(100)))
            usage.append(wal_usage(cluster))
        last = await client.execute(
            [Branch(service="bank-a", operation="balance", payload={"account": "x"})],
            idempotency_key="final",
        )
    # 600 transfers write ~1800 records, several segments' worth: old ones must be gone.
    # A checkpoint runs in the background and deletes segments when it is durable, so on
    # a loaded machine the last one may still be on its way: a bounded wait for it.
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        files, size = wal_usage(cluster)
        if (size <= 8 * seg and files <= 12) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    usage.append((files, size))
    assert size <= 8 * seg, usage
    assert files <= 12, usage
    assert list((cluster.root / "wal").glob("checkpoint-*.ckpt")), "no checkpoint was taken"
    coord.stop()
    coord2 = cluster.coordinator(services, port=port, extra=extra)
    async with AccordClient(coord2.address) as client:
        again = await client.execute(
            [Branch(service="bank-a", operation="balance", payload={"account": "x"})],
            idempotency_key="final",
        )
        assert again.gid == last.gid
        # Keys from before the checkpoint (in its image) and after it still answer.
        for i in (0, 250, 599):
            r = await client.execute(transfer, idempotency_key=f"k{i}")
            assert r.gid == gids[i] and r.state == "COMMITTED"
    assert (await balances(a.address)).total == 100_000 - 600
    assert (await balances(b.address)).total == 600
