"""64 concurrent transfers over a few hot accounts on PostgreSQL banks (issue 13): the
row locks of prepared transactions serialise them, no account is ever overdrawn, and no
transfer waits for ever: transfers in opposite directions between the same two accounts
lock rows in two databases in opposite orders (a deadlock no single PostgreSQL can
see), and ``lock_timeout`` turns the wait into a no vote, so the transaction aborts and
the client retries it (a new idempotency key per attempt, bounded in attempts and
time)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg
import pytest

from accord.client import AccordClient, AccordClientError, Branch, TxnResult
from accord.tools.topology import PostgresServer
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

pytestmark = pytest.mark.integration

TRANSFERS = 64
HOT = 4  # accounts per bank
OPENING = 100
AMOUNT = 15
MAX_ATTEMPTS = 12
DEADLINE_S = 90.0
#: A wait for a row lock longer than this is a no vote.
LOCK_TIMEOUT_S = 0.5


@dataclass
class Tally:
    attempts: Counter[str] = field(default_factory=Counter)
    #: Committed movements: account -> net change.
    net: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)


def _plan(i: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """Transfer ``i``: from one hot account to another bank's, half of them each way
    (so pairs run opposite ways over the same two rows)."""
    a, b = f"a{i % HOT}", f"b{(i // 2) % HOT}"
    return (("bank-a", a), ("bank-b", b)) if i % 2 == 0 else (("bank-b", b), ("bank-a", a))


async def _transfer(client: AccordClient, i: int, tally: Tally, deadline: float) -> str:
    (src_bank, src), (dst_bank, dst) = _plan(i)
    branches = [
        Branch(service=src_bank, operation="debit", payload={"account": src, "amount": AMOUNT}),
        Branch(service=dst_bank, operation="credit", payload={"account": dst, "amount": AMOUNT}),
    ]
    rng = random.Random(i)
    for attempt in range(MAX_ATTEMPTS):
        tally.attempts[f"t{i}"] += 1
        result: TxnResult | None = None
        try:
            result = await client.execute(branches, idempotency_key=f"hot-{i}-{attempt}")
        except AccordClientError as e:
            tally.reasons[f"error {e.code.name}"] += 1
        if result is not None and result.committed:
            tally.net[src] -= AMOUNT
            tally.net[dst] += AMOUNT
            return "committed"
        if result is not None:
            reason = result.reason.lower()
            if "insufficient funds" in reason:
                return "refused"  # a business no: not retried
            tally.reasons["lock timeout" if "lock" in reason else reason[:60]] += 1
        if time.monotonic() > deadline:
            return "gave up"
        await asyncio.sleep(rng.uniform(0.02, 0.2) * (attempt + 1))
    return "gave up"


def _prepared(url: str) -> int:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_hot_accounts_never_overdraw_nor_deadlock(
    cluster: Cluster, postgres_server: PostgresServer
) -> None:
    urls = {
        name: postgres_server.create_database(f"hot_{name[-1]}_{time.monotonic_ns()}")
        for name in ("bank-a", "bank-b")
    }
    banks = {
        name: cluster.topology.bank(
            name,
            db=url,
            in_doubt_after_s=30.0,
            log_level="info",
            extra=["--lock-timeout-s", str(LOCK_TIMEOUT_S)],
        )
        for name, url in urls.items()
    }
    await open_accounts(banks["bank-a"].address, {f"a{k}": OPENING for k in range(HOT)})
    await open_accounts(banks["bank-b"].address, {f"b{k}": OPENING for k in range(HOT)})
    coord = cluster.coordinator({name: p.address for name, p in banks.items()})
    tally = Tally()
    t0 = time.monotonic()
    async with AccordClient(coord.address, timeout_s=30) as client:
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(_transfer(client, i, tally, t0 + DEADLINE_S) for i in range(TRANSFERS))
            ),
            timeout=DEADLINE_S + 60,  # every transfer ends: no deadlock lasts for ever
        )
    elapsed = time.monotonic() - t0
    tally.outcomes.update(outcomes)
    print(
        f"{TRANSFERS} transfers in {elapsed:.1f}s: {dict(tally.outcomes)};"
        f" attempts {sum(tally.attempts.values())}; retried because: {dict(tally.reasons)}"
    )
    assert tally.outcomes["committed"] > 0
    # The opposite-order pairs did wait on each other's locks, and were let go.
    assert tally.reasons["lock timeout"] > 0, tally
    # Giving up is the client's bound, not an error; but the locks must let most through.
    assert tally.outcomes["gave up"] <= TRANSFERS // 8, tally

    for name, proc in banks.items():
        resp = await assert_eventually(
            lambda proc=proc: balances(proc.address),  # type: ignore[misc]
            lambda r: r.prepared_branches == 0,
            what=f"{name}: nothing held prepared",
        )
        assert await asyncio.to_thread(_prepared, urls[name]) == 0
        for acc in resp.accounts:
            # Never overdrawn, and exactly the committed movements applied.
            assert acc.balance >= 0, acc
            assert acc.balance == OPENING + tally.net[acc.id], (acc, tally.net)
    totals = [(await balances(p.address)).total for p in banks.values()]
    assert sum(totals) == 2 * HOT * OPENING
