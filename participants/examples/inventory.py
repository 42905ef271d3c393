"""An inventory participant written with the SDK: reserve an item in phase one, ship it
on commit, put it back on abort. Run: python -m accord.participants.examples.inventory HOST:PORT DB"""

from __future__ import annotations

import asyncio
import sqlite3
import sys

from accord.participants import BranchCall, ParticipantApp, ParticipantServer, Refuse, Vote, serve

app = ParticipantApp("inventory")


@app.setup
def schema(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS stock (item TEXT PRIMARY KEY,"
        " free INTEGER NOT NULL CHECK (free >= 0), held INTEGER NOT NULL DEFAULT 0)"
    )
    conn.execute("INSERT OR IGNORE INTO stock (item, free) VALUES ('widget', 3)")


@app.prepare("reserve")
def reserve(conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
    item = call.json()["item"]
    cur = conn.execute(
        "UPDATE stock SET free = free - 1, held = held + 1 WHERE item = ? AND free > 0", (item,)
    )
    if cur.rowcount == 0:
        raise Refuse(f"{item} is out of stock")  # a "no" vote: the transaction aborts
    return Vote.YES


@app.commit("reserve")
def ship(conn: sqlite3.Connection, call: BranchCall) -> None:
    conn.execute("UPDATE stock SET held = held - 1 WHERE item = ?", (call.json()["item"],))


@app.abort("reserve")
def put_back(conn: sqlite3.Connection, call: BranchCall) -> None:
    item = call.json()["item"]
    conn.execute("UPDATE stock SET free = free + 1, held = held - 1 WHERE item = ?", (item,))


def _ready(server: ParticipantServer) -> None:
    print(f"listening on {server.address}", flush=True)


if __name__ == "__main__":
    asyncio.run(serve(app, listen=sys.argv[1], db=sys.argv[2], ready=_ready))
