"""Running the bank: the :func:`serve_bank` coroutine, which ``accord participant bank``
(and ``python -m accord.participants.bank``, the same command) runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from accord.common.telemetry import Telemetry
from accord.common.transport import TransportSettings
from accord.participants import Announce, ParticipantServer, serve
from accord.participants._backend import is_postgres_url
from accord.participants.bank._admin import install_admin
from accord.participants.bank._logic import bank_app


def account_id(service: str, index: int) -> str:
    """The name of the ``index``-th seeded account of a bank service: ``<service>-<index>``
    (``bank-0``, ``bank-1``, ...), so accounts of different bank services never clash."""
    return f"{service}-{index}"


def seed_accounts(service: str, count: int, balance: int) -> list[tuple[str, int]]:
    return [(account_id(service, i), balance) for i in range(count)]


async def serve_bank(
    listen: str,
    db: Path | str,
    *,
    service: str = "bank",
    accounts: int = 0,
    initial_balance: int = 0,
    in_doubt_after_s: float = 10.0,
    grace_s: float = 5.0,
    lock_timeout_s: float | None = None,
    transport: TransportSettings | None = None,
    out: TextIO | None = None,
    announce: Announce | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Serves the bank on ``listen`` with its SQLite file ``db`` (created if missing), or
    in the PostgreSQL database ``db`` names (a ``postgresql://`` URL: the tables are
    created there; ``lock_timeout_s`` bounds a branch's lock waits), until SIGTERM/SIGINT,
    then stops gracefully.

    Seeds ``accounts`` accounts named ``<service>-0`` .. ``<service>-<accounts-1>`` with
    ``initial_balance`` each when they do not exist yet (a restart never resets a
    balance). Once serving, prints one line ``listening on HOST:PORT`` to ``out`` (stdout
    by default), flushed, so a parent process can read the port when listening on port 0.
    """
    if accounts < 0 or initial_balance < 0:
        raise ValueError("accounts and initial_balance must be >= 0")
    seed = seed_accounts(service, accounts, initial_balance)
    if is_postgres_url(db):
        from accord.participants.bank._logic_pg import bank_app_pg

        app = bank_app_pg(service, seed=seed)
    else:
        app = bank_app(service, seed=seed)

    def ready(server: ParticipantServer) -> None:
        print(f"listening on {server.address}", file=out or sys.stdout, flush=True)

    await serve(
        app,
        db=db,
        listen=listen,
        in_doubt_after_s=in_doubt_after_s,
        grace_s=grace_s,
        lock_timeout_s=lock_timeout_s,
        transport=transport,
        services=[install_admin],
        ready=ready,
        announce=announce,
        telemetry=telemetry,
    )
