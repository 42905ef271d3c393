"""The bank's business logic, written in the SDK's decorator style.

2PC: money is never created or destroyed outside a committed branch: a prepared debit
holds the amount (``held``), so two concurrent transfers can never both spend the same
funds; commit applies it and writes the ledger, abort releases it.

Sagas: a step applies at once and writes the ledger; its compensation applies the
opposite movement and writes its own ledger entry (keyed ``<step>/<compensation>``, so the
ledger's ``UNIQUE (gid, branch_id)`` still allows exactly one entry per effect; step
names never contain ``/``). Only available funds (``balance - held``) are ever taken, so a
saga never spends what a prepared 2PC branch holds.

- Execute ``debit`` / Compensate ``refund``: take the amount (refused with "insufficient
  funds") / give it back.
- Execute ``credit`` / Compensate ``uncredit``: add the amount / take it back, or "not
  yet" when it has been spent meanwhile (the coordinator retries, then reports the saga
  STUCK to an operator).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from accord.participants import BranchCall, NotYet, ParticipantApp, Refuse, Vote
from accord.participants.bank._conformance import install as install_conformance

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id      TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    held    INTEGER NOT NULL DEFAULT 0,
    CHECK (held >= 0 AND held <= balance)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq           INTEGER PRIMARY KEY,
    gid           TEXT NOT NULL,
    branch_id     TEXT NOT NULL,
    account       TEXT NOT NULL REFERENCES accounts (id),
    delta         INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    created_at    REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    UNIQUE (gid, branch_id)
);
"""

#: Amounts and balances stay far from SQLite's 64-bit integer limit.
MAX_AMOUNT = 2**53


@dataclass(frozen=True, slots=True)
class Movement:
    """A decoded payload: ``{"account": "bank-0", "amount": 10}``."""

    account: str
    amount: int


def parse(call: BranchCall, *, amount: bool = True) -> Movement:
    """Decodes and checks the payload; a bad one is a business no (ABORTED)."""
    try:
        data: Any = call.json()
    except ValueError as err:
        raise Refuse(f"bad payload for {call.operation}: not JSON ({err})") from err
    if not isinstance(data, dict):
        raise Refuse(f"bad payload for {call.operation}: expected a JSON object")
    account = data.get("account")
    if not isinstance(account, str) or not account:
        raise Refuse(f"bad payload for {call.operation}: 'account' must be a non-empty string")
    if not amount:
        return Movement(account, 0)
    value = data.get("amount")
    if type(value) is not int or not 0 < value <= MAX_AMOUNT:
        raise Refuse(
            f"bad payload for {call.operation}: 'amount' must be an integer in 1..{MAX_AMOUNT}"
        )
    return Movement(account, value)


def _account(conn: sqlite3.Connection, account: str) -> tuple[int, int]:
    row = conn.execute("SELECT balance, held FROM accounts WHERE id = ?", (account,)).fetchone()
    if row is None:
        raise Refuse(f"unknown account {account!r}")
    return int(row[0]), int(row[1])


def _ledger(
    conn: sqlite3.Connection, call: BranchCall, account: str, delta: int, *, undo: bool = False
) -> None:
    # A compensation's entry is keyed apart from its action's: "<step>/<compensation>".
    branch = f"{call.branch_id}/{call.operation}" if undo else call.branch_id
    conn.execute(
        "INSERT INTO ledger (gid, branch_id, account, delta, balance_after)"
        " VALUES (?, ?, ?, ?, (SELECT balance FROM accounts WHERE id = ?))",
        (call.gid, branch, account, delta, account),
    )


#: Takes an amount from the available funds (never what a prepared branch holds).
_SQL_TAKE = "UPDATE accounts SET balance = balance - ?1 WHERE id = ?2 AND balance - held >= ?1"
_SQL_GIVE = "UPDATE accounts SET balance = balance + ? WHERE id = ?"


def _update(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> None:
    # Commit and abort act on what prepare checked and held: a missing row is a bug.
    if conn.execute(sql, params).rowcount != 1:
        raise RuntimeError(f"bank: account row missing for {params!r}")


def bank_app(service: str = "bank", *, seed: Sequence[tuple[str, int]] = ()) -> ParticipantApp:
    """The bank participant. ``seed`` accounts are created at start-up when missing
    (an existing account keeps its balance)."""
    app = ParticipantApp(service)

    @app.setup
    def schema(conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        if seed:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR IGNORE INTO accounts (id, balance) VALUES (?, ?)", seed)
            conn.execute("COMMIT")

    @app.prepare("debit")
    def prepare_debit(conn: sqlite3.Connection, call: BranchCall) -> Vote:
        m = parse(call)
        # Check and hold in one statement; only a refusal looks at the row again.
        held = conn.execute(
            "UPDATE accounts SET held = held + ?1 WHERE id = ?2 AND balance - held >= ?1",
            (m.amount, m.account),
        ).rowcount
        if held != 1:
            balance, held = _account(conn, m.account)
            raise Refuse(
                f"insufficient funds: account {m.account!r} has {balance - held} available,"
                f" needs {m.amount}"
            )
        return Vote.YES

    @app.commit("debit")
    def commit_debit(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse(call)
        _update(
            conn,
            "UPDATE accounts SET balance = balance - ?, held = held - ? WHERE id = ?",
            (m.amount, m.amount, m.account),
        )
        _ledger(conn, call, m.account, -m.amount)

    @app.abort("debit")
    def abort_debit(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse(call)
        _update(conn, "UPDATE accounts SET held = held - ? WHERE id = ?", (m.amount, m.account))

    @app.prepare("credit")
    def prepare_credit(conn: sqlite3.Connection, call: BranchCall) -> Vote:
        m = parse(call)
        _account(conn, m.account)
        return Vote.YES

    @app.commit("credit")
    def commit_credit(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse(call)
        _update(
            conn, "UPDATE accounts SET balance = balance + ? WHERE id = ?", (m.amount, m.account)
        )
        _ledger(conn, call, m.account, m.amount)

    # A credit holds nothing at prepare, so its abort has nothing to undo (no handler).

    # -- saga steps (Execute / Compensate) ---------------------------------------------

    @app.execute("debit")
    def execute_debit(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse(call)
        if conn.execute(_SQL_TAKE, (m.amount, m.account)).rowcount != 1:
            balance, held = _account(conn, m.account)
            raise Refuse(
                f"insufficient funds: account {m.account!r} has {balance - held} available,"
                f" needs {m.amount}"
            )
        _ledger(conn, call, m.account, -m.amount)

    @app.compensate("refund")
    def refund(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse(call)
        _update(conn, _SQL_GIVE, (m.amount, m.account))
        _ledger(conn, call, m.account, m.amount, undo=True)

    @app.execute("credit")
    def execute_credit(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse(call)
        if conn.execute(_SQL_GIVE, (m.amount, m.account)).rowcount != 1:
            raise Refuse(f"unknown account {m.account!r}")
        _ledger(conn, call, m.account, m.amount)

    @app.compensate("uncredit")
    def uncredit(conn: sqlite3.Connection, call: BranchCall) -> None:
        m = parse(call)
        if conn.execute(_SQL_TAKE, (m.amount, m.account)).rowcount != 1:
            row = conn.execute(
                "SELECT balance - held FROM accounts WHERE id = ?", (m.account,)
            ).fetchone()
            if row is None:
                raise RuntimeError(f"bank: account {m.account!r} missing for uncredit")
            raise NotYet(
                f"funds already spent: account {m.account!r} has {row[0]} available,"
                f" needs {m.amount} to take back the credit"
            )
        _ledger(conn, call, m.account, -m.amount, undo=True)

    @app.prepare("balance")
    def prepare_balance(conn: sqlite3.Connection, call: BranchCall) -> Vote:
        _account(conn, parse(call, amount=False).account)
        return Vote.READ_ONLY

    # The conformance kit's operations (accord conformance), in a table of their own.
    install_conformance(app)
    return app
