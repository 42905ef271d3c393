"""A checkout as one 2PC: pay at the bank and reserve the item, or neither.
Run: python -m accord.client.examples.checkout COORDINATOR_HOST:PORT ORDER_ID"""

from __future__ import annotations

import asyncio
import sys

from accord.client import AccordClient, Branch, SyncAccordClient


async def checkout(coordinator: str, order_id: str) -> bool:
    async with AccordClient(coordinator) as accord:
        result = await accord.execute(
            [
                Branch(
                    service="bank", operation="debit", payload={"account": "alice", "amount": 25}
                ),
                Branch(service="inventory", operation="reserve", payload={"item": "widget"}),
            ],
            idempotency_key=f"checkout-{order_id}",  # a retry never pays twice
        )
        print(f"order {order_id}: {result.state} {result.reason}")
        return result.committed


def checkout_interactive(coordinator: str, order_id: str) -> bool:
    """The same, step by step, from code without an event loop."""
    with SyncAccordClient(coordinator) as accord:
        gid = accord.begin(timeout_ms=10_000, idempotency_key=f"checkout-{order_id}")
        accord.enlist(
            gid,
            Branch(service="bank", operation="debit", payload={"account": "alice", "amount": 25}),
        )
        accord.enlist(
            gid, Branch(service="inventory", operation="reserve", payload={"item": "widget"})
        )
        return accord.commit(gid).committed


if __name__ == "__main__":
    ok = asyncio.run(checkout(sys.argv[1], sys.argv[2]))
    sys.exit(0 if ok else 1)
