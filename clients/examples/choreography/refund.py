"""The refund service: a failed shipment is refunded with a 2PC of its own.

It follows ``shop.shipment.failed`` (a durable consumer) and gives the money back: the
shop's account debited, the customer's credited, idempotency key ``refund-<order>`` so
a redelivered event refunds once. Acknowledged only once the refund has committed.
Run: python -m accord.client.examples.choreography.refund --nats URL --coordinator ADDR"""

from __future__ import annotations

import argparse
import asyncio
import json

from nats.aio.msg import Msg

from accord.client import AccordClient, Branch
from accord.client.examples.choreography._common import (
    SHOP_STREAM,
    connect,
    consume,
    stop_on_signals,
)
from accord.client.examples.choreography.shop import BANK, SHOP_ACCOUNT


class Refunds:
    def __init__(self, accord: AccordClient) -> None:
        self.accord = accord

    async def handle(self, msg: Msg) -> None:
        shipment = json.loads(msg.data)
        order_id, customer = shipment["order"], shipment["customer"]
        amount = shipment["amount"]
        result = await self.accord.execute(
            [
                Branch(
                    service=BANK,
                    operation="debit",
                    payload={"account": SHOP_ACCOUNT, "amount": amount},
                ),
                Branch(
                    service=BANK,
                    operation="credit",
                    payload={"account": customer, "amount": amount},
                ),
            ],
            idempotency_key=f"refund-{order_id}",
        )
        if not result.committed:  # not acknowledged: delivered again, tried again
            raise RuntimeError(f"refund of order {order_id}: {result.state} {result.reason}")
        print(f"order {order_id}: refunded {amount} to {customer}", flush=True)


async def main(nats_url: str, coordinator: str) -> None:
    nc, js = await connect(nats_url)
    stop = stop_on_signals()
    print("refund ready", flush=True)
    try:
        async with AccordClient(coordinator) as accord:
            await consume(
                js,
                stream=SHOP_STREAM,
                subject="shop.shipment.failed",
                durable="refund",
                handle=Refunds(accord).handle,
                stop=stop,
            )
    finally:
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", required=True)
    parser.add_argument("--coordinator", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.nats, args.coordinator))
