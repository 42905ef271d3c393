"""The benchmark rows: a registry of named topologies.

A row is an async context manager factory ``(RowEnv) -> Target``: it starts its processes
through :meth:`RowEnv.start` (so the runner stops every one of them by PID, whatever
happens), prepares them (accounts ...), and yields a :class:`Target` whose ``factory``
makes one transaction function per load-generator worker. The runner drives the same
target at every concurrency, then leaves the context and stops the processes.

Adding a row (DESIGN names ``baseline-saga``, ``saga``, ``2pc-etcd``, ``2pc-static``,
``2pc-traced``, ``2pc-stream``, ``2pc-2coord``) is one decorated function::

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import accord.bank.v1 as bankpb
from bench.load import TxnFactory, TxnFn
from clients._client import AccordClient, Branch
from clients._procs import ManagedProcess
from registry.transport import make_channel

REPO_ROOT = Path(__file__).resolve().parent.parent
BANKS = ("bank-a", "bank-b")
LISTEN = "127.0.0.1:0"


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
    procs: list[ManagedProcess] = field(default_factory=list)

    def process(self, name: str, argv: Sequence[str]) -> ManagedProcess:
        """A process of this row, logging to ``data_dir/NAME.log``, with the repository
        on its import path (so ``python -m bench.baseline`` works from anywhere)."""
        path = os.environ.get("PYTHONPATH", "")
        env = {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)}
        return ManagedProcess(name, argv, env=env, log_path=self.data_dir / f"{name}.log")

    def accord(self, name: str, args: Sequence[str]) -> ManagedProcess:
        """An ``accord`` subcommand (``python -m clients.cli ...``)."""
        return self.process(name, [sys.executable, "-m", "clients.cli", *args])

    async def start(self, *procs: ManagedProcess) -> None:
        """Starts the processes in parallel and waits until each serves. They are
        registered first, so the runner stops them even if starting fails."""
        self.procs.extend(procs)
        await asyncio.gather(*(asyncio.to_thread(p.start, self.start_timeout_s) for p in procs))


@dataclass(frozen=True, kw_only=True)
class Target:
    """A topology ready to be driven."""

    factory: TxnFactory
    #: The processes whose CPU is reported and which must stay alive.
    processes: Mapping[str, ManagedProcess]
    #: Run once, after the last concurrency: warnings (empty when all is well).
    check: Callable[[], Awaitable[list[str]]] | None = None

    def assert_alive(self) -> None:
        for name, p in self.processes.items():
            if not p.alive():
                code = p.proc.returncode if p.proc is not None else None
                tail = "\n".join(p.output().splitlines()[-20:])
                raise RowFailed(f"{name} (pid {p.pid}) exited with {code}:\n{tail}")


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


@asynccontextmanager
async def accord_client(env: RowEnv, address: str) -> AsyncIterator[AccordClient]:
    """One client, one channel, for the whole row."""
    client = AccordClient(address, timeout_s=env.call_timeout_s)
    try:
        await client.wait_ready(timeout_s=env.start_timeout_s)
        yield client
    finally:
        await client.close()


async def open_accounts(env: RowEnv, addresses: Mapping[str, str]) -> None:
    """Opens the accounts through the Bank admin API."""
    for name, address in addresses.items():
        channel = make_channel(address)
        try:
            req = bankpb.OpenAccountsRequest(
                accounts=[
                    bankpb.OpenAccount(id=f"{name}-{i}", balance=env.initial_balance)
                    for i in range(env.accounts)
                ]
            )
            await bankpb.BankStub(channel).OpenAccounts(req, timeout=60)
        finally:
            await channel.close()


async def bank_state(addresses: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """(total balance, branches held prepared) of each bank."""
    out: dict[str, tuple[int, int]] = {}
    for name, address in addresses.items():
        channel = make_channel(address)
        try:
            resp = await bankpb.BankStub(channel).GetBalances(
                bankpb.GetBalancesRequest(), timeout=60
            )
        finally:
            await channel.close()
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


# --------------------------------------------------------------------- rows


@row(
    "baseline-2pc",
    "bare grpc.aio, same processes and calls as a two-branch 2PC, no logic",
)
@asynccontextmanager
async def baseline_2pc(env: RowEnv) -> AsyncIterator[Target]:
    bare = [sys.executable, "-m", "bench.baseline"]
    banks = {name: env.process(name, [*bare, "participant", "--listen", LISTEN]) for name in BANKS}
    await env.start(*banks.values())
    services = [f"--service={name}={p.address}" for name, p in banks.items()]
    coord = env.process("coordinator", [*bare, "coordinator", "--listen", LISTEN, *services])
    await env.start(coord)
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
    banks = {
        name: env.accord(
            name,
            [
                "participant",
                "bank",
                "--listen",
                LISTEN,
                "--db",
                str(env.data_dir / f"{name}.db"),
                "--service",
                name,
                "--log-level",
                "warning",
            ],
        )
        for name in BANKS
    }
    await env.start(*banks.values())
    addresses = {name: p.address for name, p in banks.items()}
    coord = env.accord(
        "coordinator",
        [
            "coordinator",
            "--listen",
            LISTEN,
            "--wal-dir",
            str(env.data_dir / "wal"),
            *(f"--service={name}={address}" for name, address in addresses.items()),
            "--log-level",
            "warning",
        ],
    )
    await env.start(coord)
    await open_accounts(env, addresses)
    before = sum(t for t, _ in (await bank_state(addresses)).values())
    async with accord_client(env, coord.address) as client:
        yield Target(
            factory=transfer_factory(client, transfer_plan(env)),
            processes={"coordinator": coord, **banks},
            check=conservation_check(addresses, before),
        )
