from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from accord.common.telemetry import Telemetry
from accord.participants import (
    Announce,
    BranchCall,
    ParticipantApp,
    ParticipantServer,
    Refuse,
    serve,
)

KINDS = ("flight", "hotel", "car")


def trip_app(kind: str, *, fail_cities: Iterable[str] = ()) -> ParticipantApp:
    """A booking service for one kind: ``book`` (saga action) and ``cancel`` (its
    compensation), payload ``{"trip": ID, "city": NAME, ...}``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    refuse = frozenset(c.lower() for c in fail_cities)
    app = ParticipantApp(kind)

    @app.setup
    def schema(conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bookings (trip TEXT PRIMARY KEY, city TEXT NOT NULL,"
            " status TEXT NOT NULL CHECK (status IN ('CONFIRMED', 'CANCELLED')),"
            " detail TEXT NOT NULL DEFAULT '')"
        )

    @app.execute("book")
    def book(conn: sqlite3.Connection, call: BranchCall) -> bytes:
        req = call.json()
        trip, city = str(req["trip"]), str(req.get("city", ""))
        if city.lower() in refuse:
            raise Refuse(f"no {kind} available in {city}")
        if conn.execute("SELECT 1 FROM bookings WHERE trip = ?", (trip,)).fetchone():
            # A business "no": the trip id names another saga's booking (a compensation
            # of this refused step is a recorded no-op, so that booking stays).
            raise Refuse(f"trip {trip} already has a {kind} booking: use a new trip id")
        conn.execute(
            "INSERT INTO bookings (trip, city, status, detail) VALUES (?, ?, 'CONFIRMED', ?)",
            (trip, city, json.dumps(req)),
        )
        return json.dumps(
            {"kind": kind, "trip": trip, "confirmation": f"{kind[:2].upper()}-{call.gid[-6:]}"}
        ).encode()

    @app.compensate("cancel")
    def cancel(conn: sqlite3.Connection, call: BranchCall) -> None:
        conn.execute(
            "UPDATE bookings SET status = 'CANCELLED' WHERE trip = ?", (str(call.json()["trip"]),)
        )

    return app


def bookings(db: Path) -> dict[str, str]:
    """trip -> status, read straight from a service's database (for demos and tests)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {str(t): str(s) for t, s in conn.execute("SELECT trip, status FROM bookings")}


async def serve_trip(
    kind: str,
    listen: str,
    db: Path,
    *,
    fail_cities: Iterable[str] = (),
    in_doubt_after_s: float = 10.0,
    out: TextIO | None = None,
    announce: Announce | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Serves one booking service until SIGTERM/SIGINT; prints ``listening on HOST:PORT``."""
    stream = out or sys.stdout

    def ready(server: ParticipantServer) -> None:
        print(f"listening on {server.address}", file=stream, flush=True)

    await serve(
        trip_app(kind, fail_cities=fail_cities),
        db=db,
        listen=listen,
        in_doubt_after_s=in_doubt_after_s,
        ready=ready,
        announce=announce,
        telemetry=telemetry,
    )
