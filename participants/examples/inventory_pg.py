"""The inventory participant on PostgreSQL: reserving an item is a plain UPDATE inside
the branch's transaction, which Accord ends with PREPARE TRANSACTION; the row lock holds
the item until COMMIT PREPARED ships it or ROLLBACK PREPARED puts it back, so there is
no "held" column and no commit or abort handler.
Run: python -m accord.participants.examples.inventory_pg HOST:PORT postgresql://USER@HOST/DB"""

from __future__ import annotations

import asyncio
import sys

from psycopg import AsyncConnection

from accord.participants import BranchCall, ParticipantApp, ParticipantServer, Refuse, Vote, serve

app = ParticipantApp("inventory")


@app.setup
async def schema(conn: AsyncConnection) -> None:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS stock (item text PRIMARY KEY, free int NOT NULL CHECK (free >= 0))"
    )
    await conn.execute("INSERT INTO stock VALUES ('widget', 3) ON CONFLICT DO NOTHING")


@app.prepare("reserve")
async def reserve(conn: AsyncConnection, call: BranchCall) -> Vote | None:
    item = call.json()["item"]
    cur = await conn.execute(
        "UPDATE stock SET free = free - 1 WHERE item = %s AND free > 0", (item,)
    )
    if cur.rowcount == 0:
        raise Refuse(f"{item} is out of stock")  # a "no" vote: the transaction aborts
    return Vote.YES  # Accord now runs PREPARE TRANSACTION: durable before the yes is sent


def _ready(server: ParticipantServer) -> None:
    print(f"listening on {server.address}", flush=True)


if __name__ == "__main__":
    asyncio.run(serve(app, listen=sys.argv[1], db=sys.argv[2], ready=_ready))
