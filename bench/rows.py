"""The benchmark rows: a registry of named topologies.

A row is an async context manager factory ``(RowEnv) -> Target``: it starts its processes
through the row's :class:`~accord.tools.topology.Topology` (so the runner stops every one
of them by PID, whatever happens), prepares them (accounts ...), and yields a :class:`Target` whose ``factory``
makes one transaction function per load-generator worker. The runner starts every row
first and keeps them all up, drives each target at every concurrency in rounds, then
leaves the contexts and stops the processes; so a row must not change this process's
global state for its lifetime (``configured(...)`` only around its own set-up calls, as
``2pc-tls`` does). Its ratios: its ``baseline=`` and the lines of ``bench/ratios.py``.

Adding a row (DESIGN also names ``2pc-2coord``) is one
decorated function::

    @row("2pc-traced", "Accord 2PC with tracing on", baseline="baseline-2pc")
    @asynccontextmanager
    async def accord_2pc_traced(env: RowEnv) -> AsyncIterator[Target]: ...
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.trace import TracerProvider

from accord.client._client import AccordClient, Branch, SagaStep
from accord.common.telemetry import Telemetry
from accord.common.transport import TransportSettings, configured
from accord.registry import EtcdRegistry, find_coordinators
from accord.tools._certs import CertDir
from accord.tools.topology import (
    EtcdServer,
    ManagedProcess,
    Topology,
    balances,
    numbered_accounts,
    open_accounts,
)
from bench.load import TxnFactory, TxnFn

REPO_ROOT = Path(__file__).resolve().parent.parent
BANKS = ("bank-a", "bank-b")
#: The saga rows' participants: debit on the first, credits on the other two.
SAGA_BANKS = ("bank-a", "bank-b", "bank-c")
#: Saga states other than COMPLETED (a saga of the saga rows should never end in one).
SAGA_NOT_COMPLETED = ("RUNNING", "COMPENSATING", "COMPENSATED", "STUCK")
LISTEN = "127.0.0.1:0"
#: The baseline's bare coordinator and participants (``bench/baseline.py``).
BARE = (sys.executable, "-m", "bench.baseline")


class RowFailed(RuntimeError):
    """A row could not run (a process died, a set-up step failed ...)."""


@dataclass(kw_only=True)
class RowEnv:
    """What a row gets from the runner."""

    name: str
    data_dir: Path
    seed: int = 1
    #: Accounts per bank (many, so transfers rarely touch the same row).
    accounts: int = 1000
    #: Opening balance: large, so no transfer is refused for want of funds.
    initial_balance: int = 10**12
    #: Client-side deadline of one transaction.
    call_timeout_s: float = 10.0
    start_timeout_s: float = 60.0
    #: The row's processes, under ``data_dir`` (``NAME.log`` each), with the repository
    #: on their import path (so ``python -m bench.baseline`` works from anywhere).
    topology: Topology = field(init=False)

    def __post_init__(self) -> None:
        path = os.environ.get("PYTHONPATH", "")
        self.topology = Topology(
            self.data_dir,
            env={"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)},
            start_timeout_s=self.start_timeout_s,
        )

    async def etcd(self) -> EtcdServer:
        """A single-member etcd of this row (reserved loopback ports, data in
        ``data_dir/etcd``, log in ``data_dir/etcd.log``), stopped by PID by the runner
        like the other processes (last, being started first: the participants deregister
        before it goes)."""
        server = self.topology.etcd(start=False)
        await self.topology.start_together(server)
        return server


@dataclass(frozen=True, kw_only=True)
class Target:
    """A topology ready to be driven."""

    factory: TxnFactory
    #: The processes whose CPU is reported and which must stay alive.
    processes: Mapping[str, ManagedProcess]
    #: Run once, after the last concurrency: warnings (empty when all is well).
    check: Callable[[], Awaitable[list[str]]] | None = None
    #: Servers that fork a process per connection (PostgreSQL): name -> root PID; the
    #: CPU of the whole process tree is reported as that server's, and the root must stay
    #: alive.
    process_trees: Mapping[str, int] = field(default_factory=dict)

    def assert_alive(self) -> None:
        for name, p in self.processes.items():
            if not p.alive():
                tail = "\n".join(p.output().splitlines()[-20:])
                raise RowFailed(f"{name} (pid {p.pid}) exited with {p.returncode}:\n{tail}")
        for name, pid in self.process_trees.items():
            if not Path(f"/proc/{pid}").exists():
                raise RowFailed(f"{name} (pid {pid}) is gone")


RowFactory = Callable[[RowEnv], AbstractAsyncContextManager[Target]]


@dataclass(frozen=True, kw_only=True)
class RowSpec:
    name: str
    description: str
    factory: RowFactory
    #: The row this one is compared with (the ratio ``name/baseline`` is reported).
    baseline: str | None = None


ROWS: dict[str, RowSpec] = {}


def row(
    name: str, description: str, *, baseline: str | None = None
) -> Callable[[RowFactory], RowFactory]:
    """Registers a row factory under ``name`` (rows run in registration order)."""

    def register(factory: RowFactory) -> RowFactory:
        if name in ROWS:
            raise ValueError(f"duplicate benchmark row {name!r}")
        ROWS[name] = RowSpec(name=name, description=description, factory=factory, baseline=baseline)
        return factory

    return register


# --------------------------------------------------------------------- workloads


def transfer_plan(env: RowEnv, size: int = 4096) -> list[tuple[Branch, Branch]]:
    """Pre-built transfers (debit on bank-a, credit on bank-b) between random accounts,
    small random amounts; payloads are JSON bytes already, so the generator does not
    encode per transaction."""
    rng = random.Random(env.seed)
    src, dst = BANKS
    plan = []
    for _ in range(size):
        amount = rng.randint(1, 100)
        debit = {"account": f"{src}-{rng.randrange(env.accounts)}", "amount": amount}
        credit = {"account": f"{dst}-{rng.randrange(env.accounts)}", "amount": amount}
        plan.append(
            (
                Branch(service=src, operation="debit", payload=_json(debit)),
                Branch(service=dst, operation="credit", payload=_json(credit)),
            )
        )
    return plan


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def transfer_factory(client: AccordClient, plan: Sequence[tuple[Branch, Branch]]) -> TxnFactory:
    """Worker ``i`` walks the plan from its own offset: one ``execute`` per transfer."""

    def make(i: int) -> TxnFn:
        n = len(plan)
        pos = (i * 7919) % n

        async def txn() -> bool:
            nonlocal pos
            debit, credit = plan[pos]
            pos = (pos + 1) % n
            result = await client.execute([debit, credit])
            return result.committed

        return txn

    return make


def saga_plan(env: RowEnv, size: int = 4096) -> list[tuple[SagaStep, ...]]:
    """Pre-built three-step sagas over SAGA_BANKS between random accounts: debit 2 on
    bank-a, then credit 1 on bank-b, then credit 1 on bank-c (a chain: each step depends
    on the one before), each with its compensation; payloads are JSON bytes already."""
    rng = random.Random(env.seed)
    a, b, c = SAGA_BANKS
    plan: list[tuple[SagaStep, ...]] = []
    for _ in range(size):
        plan.append(
            (
                SagaStep(
                    name="debit",
                    service=a,
                    action="debit",
                    compensation="refund",
                    payload=_json({"account": f"{a}-{rng.randrange(env.accounts)}", "amount": 2}),
                ),
                SagaStep(
                    name="credit-b",
                    service=b,
                    action="credit",
                    compensation="uncredit",
                    payload=_json({"account": f"{b}-{rng.randrange(env.accounts)}", "amount": 1}),
                    depends_on=("debit",),
                ),
                SagaStep(
                    name="credit-c",
                    service=c,
                    action="credit",
                    compensation="uncredit",
                    payload=_json({"account": f"{c}-{rng.randrange(env.accounts)}", "amount": 1}),
                    depends_on=("credit-b",),
                ),
            )
        )
    return plan


@dataclass
class SagaTally:
    """What the saga workers saw over the whole row (warmups included)."""

    #: Sagas that returned in a state other than COMPLETED, by state.
    not_completed: Counter[str] = field(default_factory=Counter)
    #: StartSaga calls that raised (an RPC error, the client-side deadline ...).
    failed_calls: int = 0

    def warnings(self) -> list[str]:
        out = []
        if self.not_completed:
            n = sum(self.not_completed.values())
            out.append(f"{n} sagas ended other than COMPLETED: {dict(self.not_completed)}")
        if self.failed_calls:
            out.append(f"{self.failed_calls} StartSaga calls failed (warmups included)")
        return out


def saga_factory(
    client: AccordClient, plan: Sequence[tuple[SagaStep, ...]], tally: SagaTally, timeout_s: float
) -> TxnFactory:
    """Worker ``i`` walks the plan from its own offset: one ``start_saga(wait=True)`` per
    saga, ok when it COMPLETED. ``start_saga`` waits without a deadline, so one is put
    around it here: a saga that does not end cannot stall a worker for ever."""

    def make(i: int) -> TxnFn:
        n = len(plan)
        pos = (i * 7919) % n

        async def txn() -> bool:
            nonlocal pos
            steps = plan[pos]
            pos = (pos + 1) % n
            try:
                async with asyncio.timeout(timeout_s):
                    result = await client.start_saga(steps, wait=True)
            except TimeoutError:
                tally.failed_calls += 1
                raise TimeoutError(f"saga not ended after {timeout_s}s") from None
            except Exception:
                tally.failed_calls += 1
                raise
            if not result.completed:
                tally.not_completed[result.state] += 1
            return result.completed

        return txn

    return make


@asynccontextmanager
async def accord_client(
    env: RowEnv,
    address: str,
    tracer_provider: TracerProvider | None = None,
    *,
    transport: TransportSettings | None = None,
    session: str = "unary",
) -> AsyncIterator[AccordClient]:
    """One client, one channel, for the whole row. ``session``: the client's
    ``session`` mode; unary unless a row says otherwise, so the rows that measured the
    unary client before ``Coordinator/Session`` existed still do."""
    client = AccordClient(
        address,
        timeout_s=env.call_timeout_s,
        tracer_provider=tracer_provider,
        transport=transport,
        session=session,
    )
    try:
        await client.wait_ready(timeout_s=env.start_timeout_s)
        yield client
    finally:
        await client.close()


async def open_bank_accounts(env: RowEnv, addresses: Mapping[str, str]) -> None:
    """Opens each bank's ``env.accounts`` accounts through the Bank admin API."""
    for name, address in addresses.items():
        accounts = numbered_accounts(name, env.accounts, env.initial_balance)
        await open_accounts(address, accounts, timeout_s=60)


async def bank_state(addresses: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """(total balance, branches held prepared) of each bank."""
    out: dict[str, tuple[int, int]] = {}
    for name, address in addresses.items():
        resp = await balances(address, timeout_s=60)
        out[name] = (resp.total, resp.prepared_branches)
    return out


def conservation_check(
    addresses: Mapping[str, str], before: int, settle_s: float = 30.0
) -> Callable[[], Awaitable[list[str]]]:
    """Once no branch is held prepared, the money in the banks is what it was."""

    async def check() -> list[str]:
        deadline = time.monotonic() + settle_s
        while True:
            state = await bank_state(addresses)
            prepared = sum(p for _, p in state.values())
            if prepared == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        after = sum(t for t, _ in state.values())
        warnings = []
        if prepared:
            warnings.append(f"{prepared} branches still held prepared after {settle_s}s")
        if after != before:
            warnings.append(f"bank totals changed: {before} before, {after} after")
        return warnings

    return check


async def count_states(client: AccordClient, states: Sequence[str]) -> Counter[str]:
    """How many transactions the coordinator holds in each of ``states``."""
    out: Counter[str] = Counter()
    token = ""
    while True:
        page, token = await client.list(states=states, limit=1000, page_token=token)
        out.update(t.state for t in page)
        if not token:
            return out


def saga_check(
    client: AccordClient,
    addresses: Mapping[str, str],
    before: int,
    tally: SagaTally,
    settle_s: float = 30.0,
) -> Callable[[], Awaitable[list[str]]]:
    """Once the coordinator runs no saga any more: no saga ended other than COMPLETED
    (as the workers saw them and as the coordinator lists them), and the money in the
    banks is what it was."""

    async def check() -> list[str]:
        warnings = tally.warnings()
        deadline = time.monotonic() + settle_s
        while True:
            active = await count_states(client, ("RUNNING", "COMPENSATING"))
            if not active or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if active:
            warnings.append(f"sagas still running after {settle_s}s: {dict(active)}")
        ended = await count_states(client, ("COMPENSATED", "STUCK"))
        if ended:
            warnings.append(
                f"the coordinator holds sagas ended other than COMPLETED: {dict(ended)}"
            )
        return warnings + await conservation_check(addresses, before, settle_s)()

    return check


async def bank_participants(
    env: RowEnv,
    names: Sequence[str],
    extra_env: Mapping[str, str] | None = None,
    *,
    etcd: str = "",
) -> dict[str, ManagedProcess]:
    """Starts Accord's bank participant (SQLite, ``synchronous=FULL``) once per name;
    with ``etcd`` (a URL), each registers itself there under its name."""
    banks = {name: env.topology.bank(name, etcd=etcd, env=extra_env, start=False) for name in names}
    await env.topology.start_together(*banks.values())
    return banks


async def accord_coordinator(
    env: RowEnv,
    addresses: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    *,
    etcd: str = "",
    transport: str = "unary",
) -> ManagedProcess:
    """Starts Accord's coordinator (WAL in ``data_dir/wal``) with a static service map
    (``addresses``) or, with ``etcd`` (a URL), resolving every service from its watched
    cache of etcd (and registering itself there). ``transport`` is its
    ``--participant-transport``: unary unless a row says otherwise, so the rows that
    measured the unary path before the stream transport existed still do."""
    if (addresses is None) == (not etcd):
        raise ValueError("give the coordinator either a static service map or an etcd URL")
    coord = env.topology.coordinator(
        services=addresses, etcd=etcd, transport=transport, env=extra_env, start=False
    )
    await env.topology.start_together(coord)
    return coord


async def wait_registered(
    env: RowEnv, url: str, services: Sequence[str], coordinator: str = ""
) -> None:
    """Until etcd at ``url`` lists a live instance of every one of ``services`` (read
    through the same watched cache the coordinator uses) and, if given, the coordinator
    at address ``coordinator``. Raises :class:`RowFailed` after ``env.start_timeout_s``."""
    deadline = time.monotonic() + env.start_timeout_s
    registry = EtcdRegistry.from_url(url)
    await registry.start()
    try:
        while missing := [s for s in services if not registry.instances(s)]:
            if time.monotonic() > deadline:
                raise RowFailed(f"services {missing} not registered in etcd at {url}")
            await asyncio.sleep(0.05)
    finally:
        await registry.close()
    while coordinator and coordinator not in {c.address for c in await find_coordinators(url)}:
        if time.monotonic() > deadline:
            raise RowFailed(f"coordinator {coordinator} not registered in etcd at {url}")
        await asyncio.sleep(0.05)


async def first_commit(client: AccordClient, branches: Sequence[Branch], timeout_s: float) -> None:
    """Retries one transaction until it commits: proof that the coordinator resolves
    every service of ``branches`` (a transfer: the banks' total does not change)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = await client.execute(list(branches))
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
        else:
            if result.committed:
                return
            why = f"{result.state}: {result.reason}"
        if time.monotonic() > deadline:
            raise RowFailed(f"no transaction committed within {timeout_s}s; last: {why}")
        await asyncio.sleep(0.1)


async def bare_topology(
    env: RowEnv, names: Sequence[str]
) -> tuple[ManagedProcess, dict[str, ManagedProcess]]:
    """The baseline's bare participants (one per name), then its bare coordinator."""
    banks = bare_participants(env, names)
    await env.topology.start_together(*banks.values())
    services = [f"--service={name}={p.address}" for name, p in banks.items()]
    coord = env.topology.process(
        "coordinator", [*BARE, "coordinator", "--listen", LISTEN, *services]
    )
    await env.topology.start_together(coord)
    return coord, banks


def bare_participants(env: RowEnv, names: Sequence[str]) -> dict[str, ManagedProcess]:
    """The baseline's bare participants, one per name (not started)."""
    return {
        name: env.topology.process(name, [*BARE, "participant", "--listen", LISTEN])
        for name in names
    }


# --------------------------------------------------------------------- rows


@row(
    "baseline-2pc",
    "bare grpc.aio, same processes and calls as a two-branch 2PC, no logic",
)
@asynccontextmanager
async def baseline_2pc(env: RowEnv) -> AsyncIterator[Target]:
    coord, banks = await bare_topology(env, BANKS)
    async with accord_client(env, coord.address) as client:
        yield Target(
            factory=transfer_factory(client, transfer_plan(env)),
            processes={"coordinator": coord, **banks},
        )


@row(
    "2pc",
    "Accord 2PC: coordinator (WAL, fsync) + two SQLite bank participants",
    baseline="baseline-2pc",
)
@asynccontextmanager
async def accord_2pc(env: RowEnv) -> AsyncIterator[Target]:
    async with static_2pc(env, transport="unary") as target:
        yield target


@row(
    "2pc-tls",
    "Accord 2PC as 2pc, every link over mutual TLS (a development CA, a certificate per "
    "process; the banks accept branch calls only from the coordinator's certificate name)",
    baseline="2pc",
)
@asynccontextmanager
async def accord_2pc_tls(env: RowEnv) -> AsyncIterator[Target]:
    env.topology.certs = CertDir(env.data_dir / "certs")
    tls = env.topology.transport("client")
    # The process-wide transport is TLS only around this row's own admin calls: the
    # other rows of the run stay up beside this one and make their channels meanwhile.
    with configured(tls):
        banks = await bank_participants(env, BANKS)
        addresses = {name: p.address for name, p in banks.items()}
        coord = await accord_coordinator(env, addresses)
        await open_bank_accounts(env, addresses)
        before = sum(t for t, _ in (await bank_state(addresses)).values())
    conserved = conservation_check(addresses, before)

    async def check() -> list[str]:
        with configured(tls):
            return await conserved()

    async with accord_client(env, coord.address, transport=tls) as client:
        yield Target(
            factory=transfer_factory(client, transfer_plan(env)),
            processes={"coordinator": coord, **banks},
            check=check,
        )


@row(
    "2pc-pg",
    "Accord 2PC as 2pc, but both banks on PostgreSQL (one server, a database per bank): "
    "PREPARE TRANSACTION / COMMIT PREPARED; the server's CPU is its whole process tree",
    baseline="2pc",
)
@asynccontextmanager
async def accord_2pc_pg(env: RowEnv) -> AsyncIterator[Target]:
    pg = env.topology.postgres(start=False)
    await env.topology.start_together(pg)
    urls = {
        name: await asyncio.to_thread(pg.create_database, name.replace("-", "_")) for name in BANKS
    }
    banks = {name: env.topology.bank(name, db=urls[name], start=False) for name in BANKS}
    await env.topology.start_together(*banks.values())
    addresses = {name: p.address for name, p in banks.items()}
    coord = await accord_coordinator(env, addresses)
    await open_bank_accounts(env, addresses)
    before = sum(t for t, _ in (await bank_state(addresses)).values())
    async with accord_client(env, coord.address) as client:
        yield Target(
            factory=transfer_factory(client, transfer_plan(env)),
            processes={"coordinator": coord, **banks},
            # postgres forks a backend per connection: the postmaster and every backend.
            process_trees={"postgres": pg.pid},
            check=conservation_check(addresses, before),
        )


@row(
    "2pc-stream",
    "Accord 2PC as 2pc, but participant calls travel batched over one bidirectional "
    "stream per bank (--participant-transport stream)",
    baseline="baseline-2pc",
)
@asynccontextmanager
async def accord_2pc_stream(env: RowEnv) -> AsyncIterator[Target]:
    async with static_2pc(env, transport="stream") as target:
        yield target


@asynccontextmanager
async def static_2pc(
    env: RowEnv, *, transport: str, session: str = "unary"
) -> AsyncIterator[Target]:
    """A coordinator with a static service map and two bank participants; ``session``:
    the client's session mode."""
    banks = await bank_participants(env, BANKS)
    addresses = {name: p.address for name, p in banks.items()}
    coord = await accord_coordinator(env, addresses, transport=transport)
    await open_bank_accounts(env, addresses)
    before = sum(t for t, _ in (await bank_state(addresses)).values())
    async with accord_client(env, coord.address, session=session) as client:
        yield Target(
            factory=transfer_factory(client, transfer_plan(env)),
            processes={"coordinator": coord, **banks},
            check=conservation_check(addresses, before),
        )


@row(
    "2pc-subscribed",
    "Accord 2PC as 2pc, with two event-feed subscribers (Coordinator/Subscribe, each its "
    "own process: bench/feed_sink.py) attached for the whole row",
    baseline="2pc",
)
@asynccontextmanager
async def accord_2pc_subscribed(env: RowEnv) -> AsyncIterator[Target]:
    async with static_2pc(env, transport="unary") as target:
        coord = target.processes["coordinator"]
        sinks = {
            f"feed-sink-{i}": env.topology.process(
                f"feed-sink-{i}",
                [sys.executable, "-m", "bench.feed_sink", "--coordinator", coord.address],
                ready="subscribed to ",
            )
            for i in (1, 2)
        }
        await env.topology.start_together(*sinks.values())
        check = target.check

        async def check_feed() -> list[str]:
            warnings = await check() if check is not None else []
            # What each sink saw of the feed: everything, in LSN order, nothing twice.
            await asyncio.sleep(1.5)  # a progress line after the last transaction
            for name, sink in sinks.items():
                lines = [ln for ln in sink.output().splitlines() if ln.startswith("events ")]
                if not lines:
                    warnings.append(f"{name} reported no events")
                    continue
                fields = lines[-1].split()
                stats = dict(zip(fields[::2], (int(v) for v in fields[1::2]), strict=True))
                if stats["events"] == 0 or stats["out_of_order"]:
                    warnings.append(f"{name}: {lines[-1]}")
            return warnings

        yield Target(
            factory=target.factory,
            processes={**target.processes, **sinks},
            check=check_feed,
        )


@row(
    "2pc-nodb",
    "Accord's coordinator (WAL, fsync) with the baseline's bare participants: what the "
    "coordinator alone adds to the baseline's call pattern",
    baseline="baseline-2pc",
)
@asynccontextmanager
async def accord_2pc_nodb(env: RowEnv) -> AsyncIterator[Target]:
    banks = bare_participants(env, BANKS)
    await env.topology.start_together(*banks.values())
    coord = await accord_coordinator(env, {name: p.address for name, p in banks.items()})
    async with accord_client(env, coord.address) as client:
        yield Target(
            factory=transfer_factory(client, transfer_plan(env)),
            processes={"coordinator": coord, **banks},
        )


# The static side of the resolution-cost pair: the same code as ``2pc``, measured as its
# own row next to ``2pc-etcd`` (a ratio is only quoted between rows of the same run).
row(
    "2pc-static",
    "Accord 2PC as 2pc (static service map), the reference for 2pc-etcd",
    baseline="baseline-2pc",
)(accord_2pc)


@row(
    "2pc-etcd",
    "Accord 2PC as 2pc-static, but every service is resolved from the coordinator's watched "
    "cache of etcd (banks register there with leases)",
    baseline="2pc-static",
)
@asynccontextmanager
async def accord_2pc_etcd(env: RowEnv) -> AsyncIterator[Target]:
    etcd = await env.etcd()
    banks = await bank_participants(env, BANKS, etcd=etcd.url)
    addresses = {name: p.address for name, p in banks.items()}
    # The coordinator loads its cache at start: with both banks registered first, it
    # starts knowing them; first_commit proves it before any load.
    await wait_registered(env, etcd.url, BANKS)
    coord = await accord_coordinator(env, etcd=etcd.url)
    await wait_registered(env, etcd.url, BANKS, coordinator=coord.address)
    await open_bank_accounts(env, addresses)
    plan = transfer_plan(env)
    async with accord_client(env, coord.address) as client:
        await first_commit(client, plan[0], env.start_timeout_s)
        before = sum(t for t, _ in (await bank_state(addresses)).values())
        yield Target(
            factory=transfer_factory(client, plan),
            processes={"coordinator": coord, **banks, "etcd": etcd},
            check=conservation_check(addresses, before),
        )


@row(
    "2pc-2coord",
    "Accord 2PC as 2pc-etcd, but with two coordinator processes (shards s1 and s2, each its "
    "own WAL) and the sharded client spreading transactions over both",
    baseline="2pc-etcd",
)
def accord_2pc_2coord(env: RowEnv) -> AbstractAsyncContextManager[Target]:
    return two_coordinators(env, transport="unary")


@row(
    "2pc-2coord-stream",
    "as 2pc-2coord, but each coordinator streams its participant calls "
    "(--participant-transport stream)",
    baseline="2pc-stream",
)
def accord_2pc_2coord_stream(env: RowEnv) -> AbstractAsyncContextManager[Target]:
    return two_coordinators(env, transport="stream")


@asynccontextmanager
async def two_coordinators(env: RowEnv, *, transport: str) -> AsyncIterator[Target]:
    """etcd, the two banks registered there, two coordinators (shards s1 and s2, each
    its own WAL, ``--participant-transport transport``) and the sharded client."""
    etcd = await env.etcd()
    banks = await bank_participants(env, BANKS, etcd=etcd.url)
    addresses = {name: p.address for name, p in banks.items()}
    await wait_registered(env, etcd.url, BANKS)
    coords = {
        f"coordinator-{i}": env.topology.coordinator(
            f"coordinator-{i}",
            cid=f"c{i}",
            shard=f"s{i}",
            wal=f"wal-s{i}",
            etcd=etcd.url,
            transport=transport,
            start=False,
        )
        for i in (1, 2)
    }
    await env.topology.start_together(*coords.values())
    for coord in coords.values():
        await wait_registered(env, etcd.url, BANKS, coordinator=coord.address)
    await open_bank_accounts(env, addresses)
    plan = transfer_plan(env)
    for coord in coords.values():  # each one resolves both banks before any load
        async with accord_client(env, coord.address) as one:
            await first_commit(one, plan[0], env.start_timeout_s)
    client = await AccordClient.from_etcd(etcd.url, timeout_s=env.call_timeout_s, session="unary")
    try:
        if len(client.shards) != len(coords):
            raise RowFailed(f"the sharded client sees shards {client.shards}, expected 2")
        await client.wait_ready(timeout_s=env.start_timeout_s)
        before = sum(t for t, _ in (await bank_state(addresses)).values())
        yield Target(
            factory=transfer_factory(client, plan),
            processes={**coords, **banks, "etcd": etcd},
            check=conservation_check(addresses, before),
        )
    finally:
        await client.close()


@row(
    "2pc-traced",
    "Accord 2PC as row 2pc with tracing on everywhere: client, coordinator and banks export "
    "every span (Accord's lean tracer, OTLP/gRPC) to a local sink",
    baseline="2pc",
)
def accord_2pc_traced(env: RowEnv) -> AbstractAsyncContextManager[Target]:
    return traced_2pc(env, ratio=1.0)


# The sampled variant: what tracing costs when a deployment samples, as most do.
@row(
    "2pc-traced-sampled",
    "as 2pc-traced, but the client samples 1% of transactions (parentbased_traceidratio); "
    "the coordinator and banks follow the sampled flag they are sent, so an unsampled "
    "transaction makes no span anywhere",
    baseline="2pc",
)
def accord_2pc_traced_sampled(env: RowEnv) -> AbstractAsyncContextManager[Target]:
    return traced_2pc(env, ratio=0.01)


@asynccontextmanager
async def traced_2pc(env: RowEnv, *, ratio: float) -> AsyncIterator[Target]:
    sink = env.topology.process(
        "otlp-sink", [sys.executable, "-m", "bench.otlp_sink", "--listen", LISTEN]
    )
    await env.topology.start_together(sink)
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink.address}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        # Servers follow the caller's decision (the SDK's default, made explicit).
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    banks = await bank_participants(env, BANKS, otel)
    addresses = {name: p.address for name, p in banks.items()}
    coord = await accord_coordinator(env, addresses, otel)
    await open_bank_accounts(env, addresses)
    before = sum(t for t, _ in (await bank_state(addresses)).values())
    telemetry = client_telemetry(sink.address, ratio)
    try:
        async with accord_client(env, coord.address, telemetry.tracer_provider()) as client:
            yield Target(
                factory=transfer_factory(client, transfer_plan(env)),
                processes={"coordinator": coord, **banks, "otlp-sink": sink},
                check=conservation_check(addresses, before),
            )
    finally:
        telemetry.shutdown()


def client_telemetry(sink: str, ratio: float = 1.0) -> Telemetry:
    """The load generator's tracing, as ``accord txn`` sets it up (Accord's lean tracer):
    one client span per transaction, the root of its trace, sampled at ``ratio``,
    batched to the sink like the servers' spans."""
    return Telemetry.setup(
        "accord-bench",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink}",
            # Every transaction: the default sampler, decided inline by the lean tracer.
            **(
                {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}
                if ratio >= 1
                else {
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": str(ratio),
                }
            ),
        },
    )


@row(
    "baseline-saga",
    "bare grpc.aio, same processes and calls as a three-step chained saga, no logic",
)
@asynccontextmanager
async def baseline_saga(env: RowEnv) -> AsyncIterator[Target]:
    coord, banks = await bare_topology(env, SAGA_BANKS)
    tally = SagaTally()

    async def check() -> list[str]:
        return tally.warnings()

    async with accord_client(env, coord.address) as client:
        yield Target(
            factory=saga_factory(client, saga_plan(env), tally, env.call_timeout_s),
            processes={"coordinator": coord, **banks},
            check=check,
        )


@row(
    "saga",
    "Accord saga: coordinator (WAL, fsync) + three SQLite bank participants, 3 chained steps",
    baseline="baseline-saga",
)
def accord_saga(env: RowEnv) -> AbstractAsyncContextManager[Target]:
    return static_saga(env, transport="unary")


@row(
    "saga-stream",
    "Accord saga as saga, but step calls travel batched over one bidirectional stream per "
    "bank (--participant-transport stream)",
    baseline="baseline-saga",
)
def accord_saga_stream(env: RowEnv) -> AbstractAsyncContextManager[Target]:
    return static_saga(env, transport="stream")


@asynccontextmanager
async def static_saga(env: RowEnv, *, transport: str) -> AsyncIterator[Target]:
    """A coordinator with a static service map and the three saga banks."""
    banks = await bank_participants(env, SAGA_BANKS)
    addresses = {name: p.address for name, p in banks.items()}
    coord = await accord_coordinator(env, addresses, transport=transport)
    await open_bank_accounts(env, addresses)
    before = sum(t for t, _ in (await bank_state(addresses)).values())
    tally = SagaTally()
    async with accord_client(env, coord.address) as client:
        yield Target(
            factory=saga_factory(client, saga_plan(env), tally, env.call_timeout_s),
            processes={"coordinator": coord, **banks},
            check=saga_check(client, addresses, before, tally),
        )


# --------------------------------------------------------------------- streaming client
# (its own block: the row, and its ratio against baseline-2pc, are s-session's)


@row(
    "2pc-stream-client",
    "Accord 2PC as 2pc-stream (participant calls batched on one stream per bank), and the "
    "client's Execute calls on one Coordinator/Session stream (AccordClient's automatic "
    "session: on from 8 calls in flight, so concurrency 1 stays unary)",
    baseline="baseline-2pc",
)
@asynccontextmanager
async def accord_2pc_stream_client(env: RowEnv) -> AsyncIterator[Target]:
    async with static_2pc(env, transport="stream", session="auto") as target:
        yield target
