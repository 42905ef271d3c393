"""A checkout: one 2PC at the bank (the customer pays the shop), the order in the
debit's payload (the bank reads only ``account`` and ``amount``).
Run: python -m accord.client.examples.choreography.shop COORDINATOR ORDER_ID ITEM AMOUNT"""

from __future__ import annotations

import asyncio
import sys

from accord.client import AccordClient, Branch

BANK = "bank"
SHOP_ACCOUNT = "shop"


async def checkout(
    coordinator: str, order_id: str, item: str, amount: int, customer: str = "alice"
) -> bool:
    order = {"order": order_id, "item": item, "customer": customer}
    async with AccordClient(coordinator) as accord:
        result = await accord.execute(
            [
                Branch(
                    service=BANK,
                    operation="debit",
                    payload={"account": customer, "amount": amount, **order},
                ),
                Branch(
                    service=BANK,
                    operation="credit",
                    payload={"account": SHOP_ACCOUNT, "amount": amount},
                ),
            ],
            idempotency_key=f"order-{order_id}",
        )
        print(f"order {order_id}: {result.state} {result.reason}", flush=True)
        return result.committed


if __name__ == "__main__":
    coordinator, order_id, item, amount = sys.argv[1:5]
    sys.exit(0 if asyncio.run(checkout(coordinator, order_id, item, int(amount))) else 1)
