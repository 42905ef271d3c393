"""The bank's admin gRPC service (accord.bank.v1.Bank), served on the participant's
port: opens accounts and reads balances, on SQLite or PostgreSQL. It never moves money;
only 2PC branches and saga steps do. On PostgreSQL ``held`` is always 0 (a prepared
debit is held by its row lock, and its amount is still in the committed balance) and
``prepared_branches`` counts the database's prepared transactions."""

from __future__ import annotations

import sqlite3
from typing import Any

import grpc
from grpc import aio

import accord.bank.v1 as bankpb
from accord.common.grpc_safe import add_servicer
from accord.participants import ParticipantService

BANK_SERVICE_NAME: str = bankpb.bank_pb2.DESCRIPTOR.services_by_name["Bank"].full_name


class BankAdmin(bankpb.BankServicer):
    def __init__(self, service: ParticipantService) -> None:
        self._service = service

    async def OpenAccounts(
        self, request: bankpb.OpenAccountsRequest, context: Any
    ) -> bankpb.OpenAccountsResponse:
        rows = [(a.id, a.balance) for a in request.accounts]
        for account_id, balance in rows:
            if not account_id or balance < 0:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"account {account_id!r}: id must be non-empty and balance >= 0",
                )
        if len({account_id for account_id, _ in rows}) != len(rows):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "duplicate account id")

        def open_accounts(conn: sqlite3.Connection) -> int:
            created = 0
            for row in rows:
                created += conn.execute(
                    "INSERT OR IGNORE INTO accounts (id, balance) VALUES (?, ?)", row
                ).rowcount
            return created

        if self._service.backend.kind == "postgresql":
            created = await _open_accounts_pg(self._service, rows)
        else:
            created = await self._service.store.write(open_accounts)
        return bankpb.OpenAccountsResponse(created=created, existing=len(rows) - created)

    async def GetBalances(
        self, request: bankpb.GetBalancesRequest, context: Any
    ) -> bankpb.GetBalancesResponse:
        ids = list(request.ids)

        def balances(conn: sqlite3.Connection) -> tuple[list[tuple[str, int, int]], int]:
            if ids:
                marks = ",".join("?" * len(ids))
                sql = f"SELECT id, balance, held FROM accounts WHERE id IN ({marks}) ORDER BY id"
                rows = conn.execute(sql, ids).fetchall()
            else:
                rows = conn.execute("SELECT id, balance, held FROM accounts ORDER BY id").fetchall()
            prepared = conn.execute(
                "SELECT COUNT(*) FROM accord_branches WHERE state = 'PREPARED'"
            ).fetchone()[0]
            return [(str(i), int(b), int(h)) for i, b, h in rows], int(prepared)

        if self._service.backend.kind == "postgresql":
            rows, prepared = await _balances_pg(self._service, ids)
        else:
            rows, prepared = await self._service.store.read(balances)
        return bankpb.GetBalancesResponse(
            accounts=[bankpb.Account(id=i, balance=b, held=h) for i, b, h in rows],
            total=sum(b for _, b, _ in rows),
            total_held=sum(h for _, _, h in rows),
            count=len(rows),
            prepared_branches=prepared,
        )


async def _open_accounts_pg(service: ParticipantService, rows: list[tuple[str, int]]) -> int:
    from accord.participants._pg import PostgresBackend

    backend = service.backend
    assert isinstance(backend, PostgresBackend)
    created = 0
    async with backend.pool.connection() as conn, conn.transaction():
        for row in rows:
            cur = await conn.execute(
                "INSERT INTO accounts (id, balance) VALUES (%s, %s) ON CONFLICT DO NOTHING", row
            )
            created += cur.rowcount
    return created


async def _balances_pg(
    service: ParticipantService, ids: list[str]
) -> tuple[list[tuple[str, int, int]], int]:
    from accord.participants._pg import PostgresBackend

    backend = service.backend
    assert isinstance(backend, PostgresBackend)
    # Prepared branches first: a branch finished between the two reads is then already
    # in the balances read next (never counted as neither held nor applied).
    prepared = (await service.branch_counts())["PREPARED"]
    async with backend.pool.connection() as conn:
        if ids:
            cur = await conn.execute(
                "SELECT id, balance FROM accounts WHERE id = ANY(%s) ORDER BY id", (ids,)
            )
        else:
            cur = await conn.execute("SELECT id, balance FROM accounts ORDER BY id")
        rows = [(str(i), int(b), 0) for i, b in await cur.fetchall()]
    return rows, prepared


def install_admin(server: aio.Server, service: ParticipantService) -> str:
    """A :data:`participants.ServiceInstaller` for the bank's admin API."""
    # Shares the participant's rate-limited log of requests that do not decode.
    add_servicer(bankpb.add_BankServicer_to_server, BankAdmin(service), server)
    return BANK_SERVICE_NAME
