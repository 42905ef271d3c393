"""The final state the checker compares the history with: each bank participant's
database (accounts, ledger, branch rows, barrier rows, audit), the initial balances and
the coordinators' final transaction lists. Loaded read-only from saved files."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accord.client import FINAL_STATES, TxnState
from accord.participants import AuditRow, read_audit

#: Final transaction states, and STUCK (a saga waiting for an operator: reported).
SETTLED_STATES = FINAL_STATES | {TxnState.STUCK}


class StateError(ValueError):
    """chaos: a final-state file is missing or malformed."""


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    seq: int
    gid: str
    #: The branch id (2PC), step name (saga action) or ``<step>/<compensation>``.
    branch_id: str
    account: str
    delta: int
    balance_after: int
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "gid": self.gid,
            "branch_id": self.branch_id,
            "account": self.account,
            "delta": self.delta,
            "balance_after": self.balance_after,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, kw_only=True)
class BranchRow:
    """A row of ``accord_branches`` (2PC branches only)."""

    gid: str
    branch_id: str
    operation: str
    state: str
    prepared_at: float
    updated_at: float


@dataclass(frozen=True, kw_only=True)
class BarrierRow:
    gid: str
    branch_id: str
    op: str
    status: str
    message: str
    created_at: float


@dataclass(frozen=True, kw_only=True)
class Account:
    id: str
    balance: int
    held: int


@dataclass(frozen=True, kw_only=True)
class ParticipantState:
    """What one bank participant's database holds."""

    name: str
    path: str
    accounts: Mapping[str, Account]
    ledger: tuple[LedgerEntry, ...]
    branches: tuple[BranchRow, ...]
    barrier: tuple[BarrierRow, ...]
    audit: tuple[AuditRow, ...]
    #: False for a database written before the audit existed (audit checks skipped).
    has_audit: bool = True


def load_participant(name: str, path: Path | str) -> ParticipantState:
    """Reads a bank participant's database (read-only; the file may be a copy)."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"chaos: participant {name!r}: no database file at {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        with closing(conn):
            return _load(conn, name, str(path))
    except sqlite3.Error as err:
        raise StateError(f"chaos: cannot read participant {name!r} at {path}: {err}") from err


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


#: Runs one SELECT and returns its rows: ``conn.execute`` of a sqlite3 or a psycopg
#: connection alike.
Query = Callable[[str], Iterable[Sequence[Any]]]


@dataclass(frozen=True, kw_only=True)
class BankRows:
    """What the checker reads of a bank's own tables, whatever its database."""

    accounts: dict[str, Account]
    ledger: tuple[LedgerEntry, ...]
    branches: tuple[BranchRow, ...]
    barrier: tuple[BarrierRow, ...]


def read_bank_rows(query: Query, *, held: str = "held") -> BankRows:
    """A bank's accounts, ledger, branch rows and barrier rows; ``held`` is the SQL for
    an account's held amount (``"0"`` where the bank keeps none)."""
    accounts = {
        str(i): Account(id=str(i), balance=int(b), held=int(h))
        for i, b, h in query(f"SELECT id, balance, {held} FROM accounts ORDER BY id")
    }
    ledger = tuple(
        LedgerEntry(
            seq=int(seq),
            gid=str(gid),
            branch_id=str(bid),
            account=str(account),
            delta=int(delta),
            balance_after=int(after),
            created_at=float(at),
        )
        for seq, gid, bid, account, delta, after, at in query(
            "SELECT seq, gid, branch_id, account, delta, balance_after, created_at"
            " FROM ledger ORDER BY seq"
        )
    )
    branches = tuple(
        BranchRow(
            gid=str(gid),
            branch_id=str(bid),
            operation=str(op),
            state=str(state),
            prepared_at=float(p),
            updated_at=float(u),
        )
        for gid, bid, op, state, p, u in query(
            "SELECT gid, branch_id, operation, state, prepared_at, updated_at"
            " FROM accord_branches ORDER BY prepared_at"
        )
    )
    barrier = tuple(
        BarrierRow(
            gid=str(gid),
            branch_id=str(bid),
            op=str(op),
            status=str(status),
            message=str(message),
            created_at=float(at),
        )
        for gid, bid, op, status, message, at in query(
            "SELECT gid, branch_id, op, status, message, created_at FROM accord_barrier"
            " ORDER BY created_at"
        )
    )
    return BankRows(accounts=accounts, ledger=ledger, branches=branches, barrier=barrier)


def _load(conn: sqlite3.Connection, name: str, path: str) -> ParticipantState:
    for table in ("accounts", "ledger", "accord_branches", "accord_barrier"):
        if not _has_table(conn, table):
            raise StateError(f"chaos: {path} ({name}) has no table {table!r}: not a bank database")
    rows = read_bank_rows(conn.execute)
    return ParticipantState(
        name=name,
        path=path,
        accounts=rows.accounts,
        ledger=rows.ledger,
        branches=rows.branches,
        barrier=rows.barrier,
        audit=tuple(read_audit(conn)),
        has_audit=_has_table(conn, "accord_audit"),
    )


@dataclass(frozen=True, kw_only=True)
class CoordinatorBranch:
    """A branch (2PC) or step (saga) as a coordinator reports it."""

    branch_id: str
    service: str
    operation: str
    state: str


@dataclass(frozen=True, kw_only=True)
class CoordinatorTxn:
    """A transaction in a coordinator's final list (``TxnResult.to_dict()``)."""

    gid: str
    state: str
    protocol: str
    idempotency_key: str = ""
    reason: str = ""
    branches: tuple[CoordinatorBranch, ...] = field(default=())
    steps: tuple[CoordinatorBranch, ...] = field(default=())

    @property
    def saga(self) -> bool:
        return self.protocol == "SAGA"

    @property
    def settled(self) -> bool:
        return self.state in SETTLED_STATES

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoordinatorTxn:
        try:
            return cls(
                gid=str(d["gid"]),
                state=str(d["state"]),
                protocol=str(d.get("protocol") or "TWO_PHASE_COMMIT"),
                idempotency_key=str(d.get("idempotency_key") or ""),
                reason=str(d.get("reason") or ""),
                branches=tuple(
                    CoordinatorBranch(
                        branch_id=str(b["branch_id"]),
                        service=str(b.get("service", "")),
                        operation=str(b.get("operation", "")),
                        state=str(b.get("state", "")),
                    )
                    for b in d.get("branches") or ()
                ),
                steps=tuple(
                    CoordinatorBranch(
                        branch_id=str(s["name"]),
                        service=str(s.get("service", "")),
                        operation=str(s.get("action", "")),
                        state=str(s.get("state", "")),
                    )
                    for s in d.get("steps") or ()
                ),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise StateError(f"chaos: bad coordinator transaction {dict(d)!r}: {err!r}") from err

    def to_dict(self) -> dict[str, Any]:
        return {
            "gid": self.gid,
            "state": self.state,
            "protocol": self.protocol,
            "idempotency_key": self.idempotency_key,
            "reason": self.reason,
        }


def merge_coordinator_lists(lists: Iterable[Sequence[Mapping[str, Any]]]) -> list[CoordinatorTxn]:
    """One list from several coordinators' lists: a gid reported twice (a shard taken
    over) keeps a settled state over an unsettled one, else the first seen."""
    by_gid: dict[str, CoordinatorTxn] = {}
    for items in lists:
        for item in items:
            txn = CoordinatorTxn.from_dict(item)
            old = by_gid.get(txn.gid)
            if old is None or (not old.settled and txn.settled):
                by_gid[txn.gid] = txn
    return list(by_gid.values())


def load_coordinator_state(path: Path | str) -> list[dict[str, Any]]:
    """A coordinator state file: a JSON list of ``TxnResult.to_dict()`` objects (or an
    object with a ``transactions`` list)."""
    data = _load_json(path)
    if isinstance(data, dict):
        data = data.get("transactions")
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise StateError(f"chaos: {path}: expected a JSON list of transactions")
    return data


def load_initial(path: Path | str) -> dict[str, int]:
    """Initial balances: a JSON object ``{"account": balance, ...}``."""
    data = _load_json(path)
    if not isinstance(data, dict) or not all(type(v) is int for v in data.values()):
        raise StateError(f"chaos: {path}: expected a JSON object of account -> integer balance")
    return {str(k): int(v) for k, v in data.items()}


def _load_json(path: Path | str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise StateError(f"chaos: no such file {path}") from err
    except ValueError as err:
        raise StateError(f"chaos: {path}: not JSON ({err})") from err
