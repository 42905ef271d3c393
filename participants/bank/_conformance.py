"""The conformance kit's two operations (``accord conformance``), on the bank's SQLite
and PostgreSQL logic, in a table of their own (``conformance``: key -> value), apart from
the money.

- ``conformance.add``, payload ``{"key": K, "amount": N, "vote": "yes"|"no"|"read-only"}``
  (vote default ``"yes"``). 2PC: Prepare stages +N on counter K (held until phase two;
  ``"no"`` refuses, ABORTED; ``"read-only"`` votes read-only and changes nothing),
  Commit applies it, Abort drops it; a one-phase Commit applies it at once. Saga:
  Execute applies +N (``"no"`` refuses), Compensate applies -N.
- ``conformance.get``, payload ``{"key": K}``: Execute answers the result bytes
  ``{"key": K, "value": V}`` (the committed value, 0 when none) and changes nothing;
  Compensate is a no-op.

A payload that does not decode is refused (ABORTED: a handler of the SDK can only say
no), which the kit accepts for a malformed payload as well as INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from accord.participants import BranchCall, ParticipantApp, Refuse, Vote

ADD = "conformance.add"
GET = "conformance.get"
#: Counter values stay far from a 64-bit integer's limit.
MAX_AMOUNT = 2**53

SCHEMA = """
CREATE TABLE IF NOT EXISTS conformance (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
SCHEMA_PG = """
CREATE TABLE IF NOT EXISTS conformance (
    key   text PRIMARY KEY,
    value bigint NOT NULL
);
"""

_VOTES = ("yes", "no", "read-only")


@dataclass(frozen=True, slots=True)
class Add:
    key: str
    amount: int
    vote: str


def _object(call: BranchCall) -> dict[str, Any]:
    try:
        data = call.json()
    except ValueError as err:
        raise Refuse(f"bad payload for {call.operation}: not JSON ({err})") from err
    if not isinstance(data, dict):
        raise Refuse(f"bad payload for {call.operation}: expected a JSON object")
    return data


def _key(call: BranchCall, data: dict[str, Any]) -> str:
    key = data.get("key")
    if not isinstance(key, str) or not key:
        raise Refuse(f"bad payload for {call.operation}: 'key' must be a non-empty string")
    return key


def parse_add(call: BranchCall) -> Add:
    data = _object(call)
    key = _key(call, data)
    amount = data.get("amount")
    if type(amount) is not int or not -MAX_AMOUNT <= amount <= MAX_AMOUNT:
        raise Refuse(
            f"bad payload for {call.operation}: 'amount' must be an integer in"
            f" -{MAX_AMOUNT}..{MAX_AMOUNT}"
        )
    vote = data.get("vote", "yes")
    if vote not in _VOTES:
        raise Refuse(f"bad payload for {call.operation}: 'vote' must be one of {_VOTES}")
    return Add(key, amount, vote)


def parse_get(call: BranchCall) -> str:
    return _key(call, _object(call))


def _vote(call: BranchCall, m: Add) -> Vote | None:
    """The vote a payload asks for: None to go on (yes), READ_ONLY, or a refusal."""
    if m.vote == "no":
        raise Refuse(f"{call.operation}: vote no, as the payload asks")
    if m.vote == "read-only":
        return Vote.READ_ONLY
    return None


def _answer(key: str, value: int) -> bytes:
    return json.dumps({"key": key, "value": value}).encode()


# -- SQLite ----------------------------------------------------------------------------

_SQL_ADD = (
    "INSERT INTO conformance (key, value) VALUES (?1, ?2)"
    " ON CONFLICT (key) DO UPDATE SET value = value + ?2"
)


def install(app: ParticipantApp) -> None:
    """Adds the two operations to a SQLite participant (its table at setup)."""

    @app.setup
    def conformance_schema(conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)

    @app.prepare(ADD)
    def prepare_add(conn: sqlite3.Connection, call: BranchCall) -> Vote:
        return _vote(call, parse_add(call)) or Vote.YES  # staged: the payload is kept

    @app.commit(ADD)
    def commit_add(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse_add(call)
        conn.execute(_SQL_ADD, (m.key, m.amount))

    # Abort: nothing was applied at Prepare, so nothing to drop (no handler).

    @app.execute(ADD)
    def execute_add(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse_add(call)
        if m.vote == "no":
            raise Refuse(f"{call.operation}: refused, as the payload asks")
        conn.execute(_SQL_ADD, (m.key, m.amount))

    @app.compensate(ADD)
    def compensate_add(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse_add(call)
        conn.execute(_SQL_ADD, (m.key, -m.amount))

    @app.execute(GET)
    def execute_get(conn: sqlite3.Connection, call: BranchCall) -> bytes:
        key = parse_get(call)
        row = conn.execute("SELECT value FROM conformance WHERE key = ?", (key,)).fetchone()
        return _answer(key, int(row[0]) if row else 0)

    @app.compensate(GET)
    def compensate_get(conn: sqlite3.Connection, call: BranchCall) -> None:
        return None


# -- PostgreSQL ------------------------------------------------------------------------

if TYPE_CHECKING:
    import psycopg

    Conn = psycopg.AsyncConnection[Any]

_SQL_ADD_PG = (
    "INSERT INTO conformance (key, value) VALUES (%(key)s, %(amount)s)"
    " ON CONFLICT (key) DO UPDATE SET value = conformance.value + %(amount)s"
)


def install_pg(app: ParticipantApp) -> None:
    """Adds the two operations to a PostgreSQL participant: Prepare applies the change
    in the branch's prepared transaction (invisible until COMMIT PREPARED, undone by
    ROLLBACK PREPARED), so Commit and Abort need no handler."""

    @app.setup
    async def conformance_schema(conn: Conn) -> None:
        await conn.execute(SCHEMA_PG)

    @app.prepare(ADD)
    async def prepare_add(conn: Conn, call: BranchCall) -> Vote:
        m = parse_add(call)
        vote = _vote(call, m)
        if vote is not None:
            return vote
        await conn.execute(_SQL_ADD_PG, {"key": m.key, "amount": m.amount})
        return Vote.YES

    @app.execute(ADD)
    async def execute_add(conn: Conn, call: BranchCall) -> None:
        m = parse_add(call)
        if m.vote == "no":
            raise Refuse(f"{call.operation}: refused, as the payload asks")
        await conn.execute(_SQL_ADD_PG, {"key": m.key, "amount": m.amount})

    @app.compensate(ADD)
    async def compensate_add(conn: Conn, call: BranchCall) -> None:
        m = parse_add(call)
        await conn.execute(_SQL_ADD_PG, {"key": m.key, "amount": -m.amount})

    @app.execute(GET)
    async def execute_get(conn: Conn, call: BranchCall) -> bytes:
        key = parse_get(call)
        cur = await conn.execute("SELECT value FROM conformance WHERE key = %s", (key,))
        row = await cur.fetchone()
        return _answer(key, int(row[0]) if row else 0)

    @app.compensate(GET)
    async def compensate_get(conn: Conn, call: BranchCall) -> None:
        return None
