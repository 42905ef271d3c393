"""The bank participant's admin API as the tools use it: opening accounts and reading
balances."""

from __future__ import annotations

from collections.abc import Mapping

import accord.bank.v1 as bankpb
from accord.common.transport import make_channel
from accord.participants.bank import account_id


def numbered_accounts(service: str, count: int, balance: int) -> dict[str, int]:
    """``count`` accounts ``<service>-0`` ... of ``balance`` each (the names the bank
    gives its seeded accounts)."""
    return {account_id(service, i): balance for i in range(count)}


async def open_accounts(
    address: str, accounts: Mapping[str, int], *, timeout_s: float = 10.0
) -> None:
    """Opens ``accounts`` (id -> balance) at the bank serving on ``address``."""
    async with make_channel(address) as channel:
        await bankpb.BankStub(channel).OpenAccounts(
            bankpb.OpenAccountsRequest(
                accounts=[bankpb.OpenAccount(id=k, balance=v) for k, v in accounts.items()]
            ),
            timeout=timeout_s,
        )


async def balances(address: str, *, timeout_s: float = 10.0) -> bankpb.GetBalancesResponse:
    """The bank's accounts and totals (money held, branches held prepared ...)."""
    async with make_channel(address) as channel:
        resp: bankpb.GetBalancesResponse = await bankpb.BankStub(channel).GetBalances(
            bankpb.GetBalancesRequest(), timeout=timeout_s
        )
        return resp
