"""Running the bank: the :func:`serve_bank` coroutine (what ``accord participant bank``
runs) and ``python -m accord.participants.bank``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from accord.common import runner
from accord.common.exits import ExitCode
from accord.common.telemetry import Telemetry
from accord.common.transport import TransportSettings
from accord.participants import Announce, ParticipantServer, serve
from accord.participants.bank._admin import install_admin
from accord.participants.bank._logic import bank_app

log = logging.getLogger("accord.participant.bank")


def account_id(service: str, index: int) -> str:
    """The name of the ``index``-th seeded account of a bank service: ``<service>-<index>``
    (``bank-0``, ``bank-1``, ...), so accounts of different bank services never clash."""
    return f"{service}-{index}"


def seed_accounts(service: str, count: int, balance: int) -> list[tuple[str, int]]:
    return [(account_id(service, i), balance) for i in range(count)]


async def serve_bank(
    listen: str,
    db: Path,
    *,
    service: str = "bank",
    accounts: int = 0,
    initial_balance: int = 0,
    in_doubt_after_s: float = 10.0,
    grace_s: float = 5.0,
    transport: TransportSettings | None = None,
    out: TextIO | None = None,
    announce: Announce | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Serves the bank on ``listen`` with its SQLite file ``db`` (created if missing)
    until SIGTERM/SIGINT, then stops gracefully.

    Seeds ``accounts`` accounts named ``<service>-0`` .. ``<service>-<accounts-1>`` with
    ``initial_balance`` each when they do not exist yet (a restart never resets a
    balance). Once serving, prints one line ``listening on HOST:PORT`` to ``out`` (stdout
    by default), flushed, so a parent process can read the port when listening on port 0.
    """
    if accounts < 0 or initial_balance < 0:
        raise ValueError("accounts and initial_balance must be >= 0")
    app = bank_app(service, seed=seed_accounts(service, accounts, initial_balance))

    def ready(server: ParticipantServer) -> None:
        print(f"listening on {server.address}", file=out or sys.stdout, flush=True)

    await serve(
        app,
        db=db,
        listen=listen,
        in_doubt_after_s=in_doubt_after_s,
        grace_s=grace_s,
        transport=transport,
        services=[install_admin],
        ready=ready,
        announce=announce,
        telemetry=telemetry,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m accord.participants.bank",
        description=(
            "The Accord example bank participant (2PC debit/credit/balance;"
            " saga debit/refund, credit/uncredit)."
        ),
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    parser.add_argument("--db", type=Path, required=True, help="SQLite file (created if missing)")
    parser.add_argument("--service", default="bank", help="service name (default: bank)")
    parser.add_argument(
        "--accounts", type=int, default=0, help="seed accounts <service>-0..N-1 when missing"
    )
    parser.add_argument("--initial-balance", type=int, default=0, help="balance of seeds")
    parser.add_argument(
        "--in-doubt-after-s",
        "--in-doubt-after",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="ask the coordinator about branches prepared for longer than this",
    )
    parser.add_argument("--grace", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--log-level", default=os.environ.get("ACCORD_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    coro = serve_bank(
        args.listen,
        args.db,
        service=args.service,
        accounts=args.accounts,
        initial_balance=args.initial_balance,
        in_doubt_after_s=args.in_doubt_after_s,
        grace_s=args.grace,
    )
    try:
        runner.run(coro)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as err:
        log.debug("bank failed", exc_info=True)
        print(f"bank: {err}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK
