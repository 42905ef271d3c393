"""The bank's admin gRPC service (accord.bank.v1.Bank), served on the participant's
port: opens accounts and reads balances. It never moves money; only 2PC branches and saga
steps do."""

from __future__ import annotations

import sqlite3
from typing import Any

import grpc
from grpc import aio

import accord.bank.v1 as bankpb
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

        rows, prepared = await self._service.store.read(balances)
        return bankpb.GetBalancesResponse(
            accounts=[bankpb.Account(id=i, balance=b, held=h) for i, b, h in rows],
            total=sum(b for _, b, _ in rows),
            total_held=sum(h for _, _, h in rows),
            count=len(rows),
            prepared_branches=prepared,
        )


def install_admin(server: aio.Server, service: ParticipantService) -> str:
    """A :data:`participants.ServiceInstaller` for the bank's admin API."""
    bankpb.add_BankServicer_to_server(BankAdmin(service), server)
    return BANK_SERVICE_NAME
