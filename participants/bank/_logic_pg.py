"""The bank's business logic on PostgreSQL (``bank_app_pg``): the same operations,
payloads and answers as :mod:`accord.participants.bank._logic`, written for a database
that holds a 2PC branch by itself.

A 2PC branch is a prepared transaction (:mod:`accord.participants._pg`): the prepare
handler applies the movement and writes the ledger entry, and PostgreSQL's row lock on
the account holds it until COMMIT PREPARED (which makes both visible) or ROLLBACK
PREPARED (which undoes both). So there is no ``held`` column: a concurrent transfer
from the same account waits on the row lock, or gives up after ``lock_timeout`` with a
no vote. Commit and abort need no handler.

- 2PC ``debit``: ``UPDATE accounts SET balance = balance - amount WHERE id = ... AND
  balance >= amount`` (refused with "insufficient funds" otherwise); ``credit``: adds
  (refused for an unknown account); ``balance``: a read, voting read-only.
- Saga ``debit``/``refund`` and ``credit``/``uncredit`` as on SQLite (a compensation's
  ledger entry is keyed ``<step>/<compensation>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from accord.participants import BranchCall, NotYet, ParticipantApp, Refuse, Vote
from accord.participants.bank._conformance import install_pg as install_conformance_pg
from accord.participants.bank._logic import parse

Conn = psycopg.AsyncConnection[Any]

SCHEMA_PG = """
CREATE TABLE IF NOT EXISTS accounts (
    id      text PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq           bigserial PRIMARY KEY,
    gid           text NOT NULL,
    branch_id     text NOT NULL,
    account       text NOT NULL REFERENCES accounts (id),
    delta         bigint NOT NULL,
    balance_after bigint NOT NULL,
    created_at    double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp()),
    UNIQUE (gid, branch_id)
);
"""

_SQL_TAKE = (
    "UPDATE accounts SET balance = balance - %(amount)s"
    " WHERE id = %(account)s AND balance >= %(amount)s RETURNING balance"
)
_SQL_GIVE = "UPDATE accounts SET balance = balance + %s WHERE id = %s RETURNING balance"
_SQL_LEDGER = (
    "INSERT INTO ledger (gid, branch_id, account, delta, balance_after) VALUES (%s, %s, %s, %s, %s)"
)


async def _balance(conn: Conn, account: str) -> int:
    row = await (
        await conn.execute("SELECT balance FROM accounts WHERE id = %s", (account,))
    ).fetchone()
    if row is None:
        raise Refuse(f"unknown account {account!r}")
    return int(row[0])


async def _ledger(
    conn: Conn, call: BranchCall, account: str, delta: int, after: int, *, undo: bool = False
) -> None:
    branch = f"{call.branch_id}/{call.operation}" if undo else call.branch_id
    await conn.execute(_SQL_LEDGER, (call.gid, branch, account, delta, after))


async def _take(conn: Conn, call: BranchCall) -> None:
    m = parse(call)
    row = await (
        await conn.execute(_SQL_TAKE, {"amount": m.amount, "account": m.account})
    ).fetchone()
    if row is None:
        balance = await _balance(conn, m.account)
        raise Refuse(
            f"insufficient funds: account {m.account!r} has {balance} available, needs {m.amount}"
        )
    await _ledger(conn, call, m.account, -m.amount, int(row[0]))


async def _give(conn: Conn, call: BranchCall) -> None:
    m = parse(call)
    row = await (await conn.execute(_SQL_GIVE, (m.amount, m.account))).fetchone()
    if row is None:
        raise Refuse(f"unknown account {m.account!r}")
    await _ledger(conn, call, m.account, m.amount, int(row[0]))


def bank_app_pg(service: str = "bank", *, seed: Sequence[tuple[str, int]] = ()) -> ParticipantApp:
    """The bank participant on PostgreSQL. ``seed`` accounts are created at start-up when
    missing (an existing account keeps its balance)."""
    app = ParticipantApp(service)

    @app.setup
    async def schema(conn: Conn) -> None:
        await conn.execute(SCHEMA_PG)
        if seed:
            async with conn.cursor() as cur:
                # A plain read sees an existing account without waiting for the row
                # locks of branches still prepared (ON CONFLICT would wait for them, and
                # only this bank, once it serves, can finish them).
                await cur.executemany(
                    "INSERT INTO accounts (id, balance) SELECT %s, %s"
                    " WHERE NOT EXISTS (SELECT 1 FROM accounts WHERE id = %s)",
                    [(account, balance, account) for account, balance in seed],
                )

    @app.prepare("debit")
    async def prepare_debit(conn: Conn, call: BranchCall) -> Vote:
        await _take(conn, call)  # the row lock holds it until COMMIT/ROLLBACK PREPARED
        return Vote.YES

    @app.prepare("credit")
    async def prepare_credit(conn: Conn, call: BranchCall) -> Vote:
        await _give(conn, call)
        return Vote.YES

    @app.prepare("balance")
    async def prepare_balance(conn: Conn, call: BranchCall) -> Vote:
        await _balance(conn, parse(call, amount=False).account)
        return Vote.READ_ONLY

    # -- saga steps (Execute / Compensate) ---------------------------------------------

    @app.execute("debit")
    async def execute_debit(conn: Conn, call: BranchCall) -> None:
        await _take(conn, call)

    @app.compensate("refund")
    async def refund(conn: Conn, call: BranchCall) -> None:
        m = parse(call)
        row = await (await conn.execute(_SQL_GIVE, (m.amount, m.account))).fetchone()
        if row is None:
            raise RuntimeError(f"bank: account {m.account!r} missing for refund")
        await _ledger(conn, call, m.account, m.amount, int(row[0]), undo=True)

    @app.execute("credit")
    async def execute_credit(conn: Conn, call: BranchCall) -> None:
        await _give(conn, call)

    @app.compensate("uncredit")
    async def uncredit(conn: Conn, call: BranchCall) -> None:
        m = parse(call)
        row = await (
            await conn.execute(_SQL_TAKE, {"amount": m.amount, "account": m.account})
        ).fetchone()
        if row is None:
            balance = await _balance(conn, m.account)
            raise NotYet(
                f"funds already spent: account {m.account!r} has {balance} available,"
                f" needs {m.amount} to take back the credit"
            )
        await _ledger(conn, call, m.account, -m.amount, int(row[0]), undo=True)

    # The conformance kit's operations (accord conformance), in a table of their own.
    install_conformance_pg(app)
    return app
