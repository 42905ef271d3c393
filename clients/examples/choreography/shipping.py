"""The shipping service: ships an order once its checkout has committed.

It follows ``accord.*.2pc.>`` (one durable consumer, so one shard's events come in LSN
order): a transaction's ``preparing`` event carries its branches, so an order's (key
``order-<id>``) is remembered from there; its ``committed`` event (the ENDED record)
names only the gid and each branch's outcome, and ships what was remembered. An
``aborted`` one forgets it. Shipments are kept in SQLite: a redelivered event ships
nothing twice. An item containing ``fragile`` cannot be shipped: the service publishes
``shop.shipment.failed`` for the refund service, else ``shop.shipment.shipped``.
Run: python -m accord.client.examples.choreography.shipping --nats URL --db FILE"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3

from nats.aio.msg import Msg
from nats.js import JetStreamContext

import accord.v1 as pb
from accord.client.examples.choreography._common import connect, consume, stop_on_signals
from accord.relay import CONTENT_TYPE, decode

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (gid TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shipments (
    order_id TEXT PRIMARY KEY, gid TEXT NOT NULL, status TEXT NOT NULL
);
"""


class Shipping:
    def __init__(self, js: JetStreamContext, db: sqlite3.Connection) -> None:
        self.js = js
        self.db = db

    async def handle(self, msg: Msg) -> None:
        event = decode(msg.data, (msg.headers or {}).get(CONTENT_TYPE, ""))
        if event.kind == pb.FEED_EVENT_KIND_PREPARING and event.idempotency_key.startswith(
            "order-"
        ):
            debit = next(b.branch for b in event.branches if b.branch.operation == "debit")
            with self.db:
                self.db.execute(
                    "INSERT OR IGNORE INTO orders VALUES (?, ?)",
                    (event.gid, debit.payload.decode()),
                )
        elif event.state == pb.TXN_STATE_COMMITTED:
            row = self.db.execute("SELECT body FROM orders WHERE gid = ?", (event.gid,)).fetchone()
            if row is not None:  # an order (a refund, say, is not)
                await self.ship(event.gid, json.loads(row[0]))
        elif event.state == pb.TXN_STATE_ABORTED:
            with self.db:
                self.db.execute("DELETE FROM orders WHERE gid = ?", (event.gid,))

    async def ship(self, gid: str, order: dict[str, object]) -> None:
        order_id = str(order["order"])
        done = self.db.execute("SELECT 1 FROM shipments WHERE order_id = ?", (order_id,)).fetchone()
        if done:
            return
        status = "failed" if "fragile" in str(order["item"]) else "shipped"
        body = {**order, "gid": gid, "status": status}
        # The id makes a publication repeated after a crash a duplicate JetStream drops.
        await self.js.publish(
            f"shop.shipment.{status}",
            json.dumps(body).encode(),
            headers={"Nats-Msg-Id": f"shipment-{order_id}"},
        )
        with self.db:
            self.db.execute("INSERT INTO shipments VALUES (?, ?, ?)", (order_id, gid, status))
        print(f"order {order_id}: {status}", flush=True)


async def main(nats_url: str, db_path: str, stream: str) -> None:
    db = sqlite3.connect(db_path)
    db.executescript(SCHEMA)
    nc, js = await connect(nats_url)
    stop = stop_on_signals()
    print("shipping ready", flush=True)
    try:
        await consume(
            js,
            stream=stream,
            subject="accord.*.2pc.>",
            durable="shipping",
            handle=Shipping(js, db).handle,
            stop=stop,
        )
    finally:
        await nc.close()
        db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--stream", default="ACCORD")
    args = parser.parse_args()
    asyncio.run(main(args.nats, args.db, args.stream))
