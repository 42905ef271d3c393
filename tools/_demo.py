"""``accord demo``: the whole topology on this machine and a workload.

Starts etcd, two bank participants (``bank-a``, ``bank-b``, each its own SQLite file, or
with ``--postgres`` each its own database on a PostgreSQL server the demo starts itself)
that register there, and a coordinator that finds them there (or, with ``--static``, a
coordinator given a static service map), all on free 127.0.0.1 ports; the client finds
the coordinator through etcd too;
opens accounts; runs concurrent transfers from an account in one bank to an account in
the other (each a two-branch 2PC: debit + credit), some of them larger than the balance
so they abort; then compares the money in the system before and after, and stops every
process it started.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

from accord.client._client import AccordClient, Branch, SagaStep
from accord.client._errors import AccordClientError
from accord.common import runner
from accord.common.transport import configured
from accord.tools._certs import CertDir
from accord.tools.topology import Topology, balances, numbered_accounts, open_accounts, workdir

BANKS = ("bank-a", "bank-b")


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    transfers: int = 400
    concurrency: int = 32
    accounts: int = 20
    initial_balance: int = 1000
    seed: int = 7
    data_dir: Path | None = None
    #: Also book trips with sagas over the flight, hotel and car services.
    saga: bool = False
    #: Find every process through etcd (False: a static service map).
    etcd: bool = True
    #: The banks on PostgreSQL (a server started under the data directory, one database
    #: per bank) instead of SQLite files.
    postgres: bool = False
    #: Every link over mutual TLS: a development CA and a certificate per process made
    #: (as ``accord certs`` does) in ``DATA/certs``; etcd over https with client
    #: certificates; the banks accept branch calls only from ``coordinator``.
    tls: bool = False


#: Trips booked by ``accord demo --saga``; the car service refuses Paris, so those
#: sagas compensate the flight and hotel already booked.
TRIPS = (
    ("trip-1", "Lisbon"),
    ("trip-2", "Paris"),
    ("trip-3", "Oslo"),
    ("trip-4", "Paris"),
    ("trip-5", "Rome"),
)
FAIL_CITY = "Paris"


def _trip_steps(trip: str, city: str) -> list[SagaStep]:
    payload = {"trip": trip, "city": city}
    return [
        SagaStep(
            name="flight", service="flight", action="book", compensation="cancel", payload=payload
        ),
        SagaStep(
            name="hotel", service="hotel", action="book", compensation="cancel", payload=payload
        ),
        SagaStep(
            name="car",
            service="car",
            action="book",
            compensation="cancel",
            payload=payload,
            depends_on=("flight", "hotel"),
            max_attempts=3,
            initial_interval_ms=50,
        ),
    ]


async def _client(coordinator: str, etcd: str) -> AccordClient:
    return await AccordClient.from_etcd(etcd) if etcd else AccordClient(coordinator)


async def _book_trips(coordinator: str, etcd: str, data: Path) -> list[dict[str, Any]]:
    from accord.participants.trip._service import bookings

    out: list[dict[str, Any]] = []
    async with await _client(coordinator, etcd) as client:
        results = await asyncio.gather(
            *(client.start_saga(_trip_steps(t, c), idempotency_key=f"demo-{t}") for t, c in TRIPS)
        )
    books = {k: bookings(data / f"{k}.db") for k in ("flight", "hotel", "car")}
    for (trip, city), r in zip(TRIPS, results, strict=True):
        held = {k: books[k].get(trip, "NONE") for k in books}
        if r.completed:
            consistent = all(v == "CONFIRMED" for v in held.values())
        else:
            consistent = r.compensated and all(v in ("CANCELLED", "NONE") for v in held.values())
        out.append(
            {
                "trip": trip,
                "city": city,
                "gid": r.gid,
                "state": r.state,
                "reason": r.reason,
                "steps": {st.name: st.state for st in r.steps},
                "bookings": held,
                "consistent": consistent,
            }
        )
    return out


async def bank_totals(addresses: dict[str, str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, addr in addresses.items():
        resp = await balances(addr)
        out[name] = {
            "total": resp.total,
            "held": resp.total_held,
            "accounts": resp.count,
            "prepared_branches": resp.prepared_branches,
        }
    return out


async def _workload(
    coordinator: str, etcd: str, settings: DemoSettings
) -> tuple[dict[str, int], Counter[str], HdrHistogram, list[str], float]:
    rng = random.Random(settings.seed)
    outcomes = {"committed": 0, "aborted": 0}
    reasons: Counter[str] = Counter()
    errors: list[str] = []
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    plan = []
    for i in range(settings.transfers):
        src, dst = rng.sample(BANKS, 2)
        # One transfer in ten asks for more than any account holds: it must abort.
        big = rng.random() < 0.1
        amount = (
            settings.initial_balance * 10 if big else rng.randint(1, settings.initial_balance // 10)
        )
        plan.append(
            (
                f"demo-{settings.seed}-{i}",
                Branch(
                    service=src,
                    operation="debit",
                    payload={
                        "account": f"{src}-{rng.randrange(settings.accounts)}",
                        "amount": amount,
                    },
                ),
                Branch(
                    service=dst,
                    operation="credit",
                    payload={
                        "account": f"{dst}-{rng.randrange(settings.accounts)}",
                        "amount": amount,
                    },
                ),
            )
        )
    queue: asyncio.Queue[tuple[str, Branch, Branch]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async with await _client(coordinator, etcd) as client:
        await client.wait_ready()

        async def worker() -> None:
            while not queue.empty():
                key, debit, credit = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    result = await client.execute([debit, credit], idempotency_key=key)
                except AccordClientError as e:
                    errors.append(f"{key}: {e}")
                    continue
                hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
                outcomes["committed" if result.committed else "aborted"] += 1
                if not result.committed:
                    reasons[_abort_reason(result.reason)] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
        elapsed = time.perf_counter() - t0
    return outcomes, reasons, hist, errors, elapsed


def _abort_reason(reason: str) -> str:
    """Why a transfer aborted, in a word: the bank refused it for want of funds, or (on
    PostgreSQL) it waited for a row lock past ``lock_timeout`` and the vote was no."""
    text = reason.lower()
    if "insufficient funds" in text:
        return "insufficient funds"
    if "lock" in text or "deadlock" in text:
        return "lock conflict"
    return "other"


async def _settled(addresses: dict[str, str], timeout_s: float = 30.0) -> dict[str, dict[str, int]]:
    """Balances once no branch is held prepared any more (phase two may trail answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        totals = await bank_totals(addresses)
        if all(t["prepared_branches"] == 0 for t in totals.values()) or time.monotonic() > deadline:
            return totals
        await asyncio.sleep(0.1)


def _certs(data: Path) -> CertDir:
    """The demo's CA and certificates, in ``DATA/certs`` (the CA kept if there)."""
    from accord.tools._certs import DEFAULT_NAMES, make_certs

    make_certs(data / "certs", [*DEFAULT_NAMES, "etcd", "flight", "hotel", "car"])
    return CertDir(data / "certs")


def run_demo(settings: DemoSettings, *, console: Console | None) -> dict[str, Any]:
    say = console.print if console else (lambda *a, **k: None)
    with (
        workdir(settings.data_dir, prefix="accord-demo-") as data,
        Topology(data, certs=_certs(data) if settings.tls else None) as topo,
        configured(topo.transport() if settings.tls else None),
    ):
        if settings.tls:
            say(f"[green]made[/green] a development CA and certificates in {data / 'certs'}")
        etcd_url = ""
        if settings.etcd:
            etcd = topo.etcd()
            etcd_url = etcd.url
            say(f"[green]started[/green] etcd on {etcd_url} (pid {etcd.pid})")
        databases: dict[str, Path | str] = {name: data / f"{name}.db" for name in BANKS}
        backend = "SQLite"
        if settings.postgres:
            pg = topo.postgres()
            backend = f"PostgreSQL on 127.0.0.1:{pg.port}"
            say(f"[green]started[/green] PostgreSQL on 127.0.0.1:{pg.port} (pid {pg.pid})")
            for name in BANKS:
                database = name.replace("-", "_")
                pg.create_database(database)
                databases[name] = pg.url(database)
        addresses: dict[str, str] = {}
        for name in BANKS:
            p = topo.bank(name, etcd=etcd_url, db=databases[name])
            addresses[name] = p.address
            say(
                f"[green]started[/green] participant {name} on {p.address} (pid {p.pid},"
                f" {backend if settings.postgres else databases[name]})"
            )
        trip_addresses: dict[str, str] = {}
        if settings.saga:
            for kind in ("flight", "hotel", "car"):
                extra = ["--fail-city", FAIL_CITY] if kind == "car" else []
                p = topo.participant(kind, etcd=etcd_url, extra=extra)
                trip_addresses[kind] = p.address
                say(f"[green]started[/green] participant {kind} on {p.address} (pid {p.pid})")
        coord = topo.coordinator(
            etcd=etcd_url, services=None if etcd_url else {**addresses, **trip_addresses}
        )
        say(f"[green]started[/green] coordinator on {coord.address} (pid {coord.pid})")

        async def go() -> dict[str, Any]:
            for name, address in addresses.items():
                accounts = numbered_accounts(name, settings.accounts, settings.initial_balance)
                await open_accounts(address, accounts)
            before = await bank_totals(addresses)
            say(f"running {settings.transfers} transfers, {settings.concurrency} at a time ...")
            outcomes, reasons, hist, errors, elapsed = await _workload(
                coord.address, etcd_url, settings
            )
            after = await _settled(addresses)
            sagas = await _book_trips(coord.address, etcd_url, data) if settings.saga else []
            return {
                "registry": f"etcd at {etcd_url}" if etcd_url else "static service map",
                "tls": settings.tls,
                "backend": "postgresql" if settings.postgres else "sqlite",
                "databases": {k: str(v) for k, v in databases.items()},
                "sagas": sagas,
                "committed": outcomes["committed"],
                "aborted": outcomes["aborted"],
                "abort_reasons": dict(reasons),
                "errors": errors,
                "transfers": settings.transfers,
                "elapsed_s": round(elapsed, 3),
                "tps": round((outcomes["committed"] + outcomes["aborted"]) / elapsed, 1),
                "p50_ms": round(hist.get_value_at_percentile(50) / 1000, 2),
                "p99_ms": round(hist.get_value_at_percentile(99) / 1000, 2),
                "total_before": sum(t["total"] for t in before.values()),
                "total_after": sum(t["total"] for t in after.values()),
                "banks": after,
                "data_dir": str(data) if settings.data_dir else None,
            }

        summary = runner.run(go())
    if console is not None:
        _print_summary(console, summary)
    return summary


def _print_summary(console: Console, s: dict[str, Any]) -> None:
    table = Table(title="Accord demo: two-bank transfers over 2PC", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("registry", s["registry"])
    table.add_row("bank databases", "PostgreSQL" if s["backend"] == "postgresql" else "SQLite")
    table.add_row("transfers", str(s["transfers"]))
    table.add_row("committed", str(s["committed"]))
    reasons = s["abort_reasons"]
    if set(reasons) <= {"insufficient funds"}:
        table.add_row("aborted (insufficient funds)", str(s["aborted"]))
    else:
        table.add_row("aborted", str(s["aborted"]))
        for reason, count in sorted(reasons.items()):
            table.add_row(f"  {reason}", str(count))
    table.add_row("errors", str(len(s["errors"])))
    table.add_row("throughput", f"{s['tps']} tx/s")
    table.add_row("latency p50 / p99", f"{s['p50_ms']} ms / {s['p99_ms']} ms")
    table.add_row("total balance before", str(s["total_before"]))
    table.add_row("total balance after", str(s["total_after"]))
    for name, t in s["banks"].items():
        table.add_row(
            f"  {name}", f"{t['total']} (held {t['held']}, prepared {t['prepared_branches']})"
        )
    console.print(table)
    if s["sagas"]:
        trips = Table(title=f"Trip bookings over sagas (the car service refuses {FAIL_CITY})")
        for col in ("trip", "city", "saga", "flight", "hotel", "car", "bookings"):
            trips.add_column(col)
        for t in s["sagas"]:
            trips.add_row(
                t["trip"],
                t["city"],
                t["state"],
                t["steps"]["flight"],
                t["steps"]["hotel"],
                t["steps"]["car"],
                "ok" if t["consistent"] else "[red]MISMATCH[/red]",
            )
        console.print(trips)
    ok = s["total_before"] == s["total_after"] and not s["errors"]
    console.print(
        "[bold green]balances conserved[/bold green]" if ok else "[bold red]MISMATCH[/bold red]"
    )
    for e in s["errors"][:5]:
        console.print(f"[red]{e}[/red]")
