"""``accord chaos``: the whole topology on this machine, a bank workload of 2PC transfers
and sagas, faults on a seeded schedule, then healing, quiescence and the checker.

Topology: one etcd; ``participants`` bank services (``bank-1`` ...) registered in etcd
on fixed loopback ports, so a restarted one comes back at the address coordinators know
(each on its own SQLite file, or with ``participant_db="postgres"`` on its own database of
one PostgreSQL server the harness starts);
for each of ``coordinators`` WAL shards (``s1`` ...) an owner and a standby sharing the
shard's WAL directory (the stand-in for a shared volume). Workers are bound to a shard;
each finds the shard's owner in etcd and, on ``UNAVAILABLE``, finds it again and retries
with the same idempotency key. Every client operation and every fault goes to the
history (JSONL), which the checker reads with the participants' databases afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import accord.bank.v1 as bankpb
from accord.client._client import AccordClient, Branch, SagaStep, TxnResult
from accord.client._errors import AccordClientError, UnavailableError
from accord.coordinator.wal import drop_unsynced
from accord.participants import copy_database
from accord.tools._certs import CertDir
from accord.tools._choices import Fault, ParticipantDb
from accord.tools.chaos._history import HistoryWriter
from accord.tools.topology import (
    EtcdServer,
    ManagedProcess,
    PostgresServer,
    ProcessFailed,
    Topology,
    balances,
    free_port,
)

INJECTABLE_FAULTS = tuple(f.value for f in Fault)
#: Where the bank participants keep their data.
PARTICIPANT_DBS = tuple(d.value for d in ParticipantDb)
#: Nothing more will happen to these without an operator (STUCK is reported, not in doubt).
TERMINAL = frozenset({"COMMITTED", "ABORTED", "COMPLETED", "COMPENSATED", "STUCK"})


@dataclass(frozen=True, kw_only=True)
class ChaosSettings:
    duration_s: float = 120.0
    coordinators: int = 2
    participants: int = 4
    seed: int = 1
    workers: int = 8
    #: Share of operations that are sagas (the rest are 2PC transfers).
    saga_share: float = 0.3
    accounts: int = 10
    initial_balance: int = 1000
    #: Mean seconds between faults.
    fault_every_s: float = 6.0
    faults: tuple[str, ...] = ("kill-coordinator", "kill-participant")
    ttl_s: int = 2
    #: How long after healing everything must be decided.
    recovery_bound_s: float = 60.0
    out_dir: Path | None = None
    #: Environment for the coordinators (a test swaps a broken piece in here).
    coordinator_env: dict[str, str] = field(default_factory=dict)
    #: ``sqlite`` (a file per bank) or ``postgres`` (one PostgreSQL server, a database
    #: per bank).
    participant_db: str = "sqlite"
    #: Also run a query service and compare its read model with the coordinators' view
    #: at quiescence (a difference is a ``read-model`` violation).
    query: bool = False
    #: Every link over mutual TLS: a development CA in ``ROOT/certs`` and a certificate
    #: per process (see :class:`accord.tools.topology.Topology`).
    tls: bool = False


def tls_certs(root: Path) -> CertDir:
    """The CA and certificates of a run over TLS (``ROOT/certs``)."""
    return CertDir(root / "certs")


@dataclass
class Node:
    name: str
    proc: ManagedProcess
    kind: str  # "coordinator" | "participant"
    shard: str = ""


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    in_doubt_at_kill: list[int] = field(default_factory=list)
    restart_to_ready_s: list[float] = field(default_factory=list)
    kill_to_commit_s: list[float] = field(default_factory=list)


class Chaos:
    def __init__(self, s: ChaosSettings, root: Path, on_progress: Callable[[Chaos], None]):
        self.s = s
        self.root = root
        self.rng = random.Random(s.seed)
        self.history = HistoryWriter(root / "history.jsonl")
        self.stats = Stats()
        self.topology = Topology(root, certs=tls_certs(root) if s.tls else None)
        self.nodes: dict[str, Node] = {}
        self.etcd: EtcdServer | None = None
        #: With ``participant_db="postgres"``: the server and each bank's database URL.
        self.postgres: PostgresServer | None = None
        self.db_urls: dict[str, str] = {}
        self.banks = [f"bank-{i + 1}" for i in range(s.participants)]
        self.shards = [f"s{i + 1}" for i in range(s.coordinators)]
        self._on_progress = on_progress
        self._stop = asyncio.Event()
        #: Per shard: operations in flight (for "in doubt at kill time").
        self._inflight: Counter[str] = Counter()
        #: Per shard: monotonic time of a kill of its owner not yet followed by a commit.
        self._killed_at: dict[str, float] = {}
        #: Nodes being started again: no fault touches them until they serve (a second
        #: restart of the same process would orphan the first).
        self._restarting: set[str] = set()
        self.started = time.monotonic()

    # ------------------------------------------------------------ processes

    def _bank(self, name: str) -> ManagedProcess:
        """A bank registered in etcd, on a port kept across its restarts (so it comes
        back at the address the coordinators know)."""
        assert self.etcd is not None
        return self.topology.bank(
            name,
            port=free_port(),
            etcd=self.etcd.url,
            instance_id=name,
            ttl_s=self.s.ttl_s,
            accounts=self.s.accounts,
            initial_balance=self.s.initial_balance,
            in_doubt_after_s=5,
            db=self.db_urls.get(name),
        )

    def _coordinator(self, name: str, shard: str) -> ManagedProcess:
        """The owner or a standby of ``shard``, whichever it finds itself to be."""
        assert self.etcd is not None
        return self.topology.coordinator(
            name,
            port=free_port(),
            wal=f"wal-{shard}",
            cid=name,
            shard=shard,
            etcd=self.etcd.url,
            role="any",
            ttl_s=self.s.ttl_s,
            retry_max_s=0.5,
            default_timeout_ms=15000,
            # The SYNCED marker lets a power loss be simulated on the coordinator's WAL.
            env={"ACCORD_WAL_SYNC_MARKER": "1", **self.s.coordinator_env},
        )

    def start_topology(self) -> None:
        if self.s.participant_db not in PARTICIPANT_DBS:
            raise ValueError(f"participant_db must be one of {PARTICIPANT_DBS}")
        self.etcd = self.topology.etcd()
        if self.s.participant_db == "postgres":
            self.postgres = self.topology.postgres()
            for name in self.banks:
                self.db_urls[name] = self.postgres.create_database(name.replace("-", "_"))
        for name in self.banks:
            self.nodes[name] = Node(name, self._bank(name), "participant")
        for shard in self.shards:
            for role in ("a", "b"):
                name = f"coordinator-{shard}{role}"
                self.nodes[name] = Node(name, self._coordinator(name, shard), "coordinator", shard)

    def stop_all(self) -> None:
        self.topology.stop()

    # ------------------------------------------------------------ workload

    def _transfer(self, rng: random.Random) -> tuple[str, dict[str, Any], list[Branch]]:
        a, b = rng.sample(self.banks, 2)
        # One in ten asks for more than an account can hold: refused, so it aborts.
        amount = self.s.initial_balance * 5 if rng.random() < 0.1 else rng.randint(1, 10)
        legs = [
            {"service": a, "branch_id": "b1", "operation": "debit",
             "account": f"{a}-{rng.randrange(self.s.accounts)}", "amount": amount},
            {"service": b, "branch_id": "b2", "operation": "credit",
             "account": f"{b}-{rng.randrange(self.s.accounts)}", "amount": amount},
        ]  # fmt: skip
        branches = [
            Branch(
                service=str(leg["service"]),
                branch_id=str(leg["branch_id"]),
                operation=str(leg["operation"]),
                payload={"account": leg["account"], "amount": leg["amount"]},
            )
            for leg in legs
        ]
        return "transfer", {"branches": legs}, branches

    def _saga(self, rng: random.Random) -> tuple[str, dict[str, Any], list[SagaStep]]:
        a, b = rng.sample(self.banks, 2)
        amount = self.s.initial_balance * 5 if rng.random() < 0.1 else rng.randint(1, 10)
        steps = [
            {"name": "debit", "service": a, "action": "debit", "compensation": "refund",
             "account": f"{a}-{rng.randrange(self.s.accounts)}", "amount": amount,
             "depends_on": [], "pivot": False},
            {"name": "credit", "service": b, "action": "credit", "compensation": "uncredit",
             "account": f"{b}-{rng.randrange(self.s.accounts)}", "amount": amount,
             "depends_on": ["debit"], "pivot": False},
        ]  # fmt: skip
        saga = [
            SagaStep(
                name=str(st["name"]),
                service=str(st["service"]),
                action=str(st["action"]),
                compensation=str(st["compensation"]),
                payload={"account": st["account"], "amount": st["amount"]},
                depends_on=tuple(st["depends_on"]),  # type: ignore[arg-type]
                # Outlasts a participant's restart: a step should not give up (and a
                # saga compensate) only because its bank was down for a few seconds.
                max_attempts=40,
                initial_interval_ms=50,
                max_interval_ms=500,
            )
            for st in steps
        ]
        return "saga", {"steps": steps}, saga

    async def _worker(self, w: int, shard: str) -> None:
        assert self.etcd is not None
        rng = random.Random(self.s.seed * 1000 + w)
        client: AccordClient | None = None
        i = 0
        while not self._stop.is_set():
            if client is None:
                try:
                    client = await AccordClient.from_etcd(self.etcd.url, shard=shard, timeout_s=30)
                except UnavailableError:
                    await asyncio.sleep(0.3)
                    continue
            i += 1
            key = f"w{w}-{i}"
            saga = rng.random() < self.s.saga_share
            op, request, work = self._saga(rng) if saga else self._transfer(rng)
            self.history.invoke(process=w, op=op, key=key, request=request)
            self._inflight[shard] += 1
            try:
                result, error = await self._run_op(client, op, work, key)
            finally:
                self._inflight[shard] -= 1
            self._record(w, op, key, shard, result, error)
        if client is not None:
            await client.close()

    async def _run_op(
        self, client: AccordClient, op: str, work: Any, key: str
    ) -> tuple[TxnResult | None, str]:
        deadline = time.monotonic() + 30
        while True:
            try:
                if op == "saga":
                    return await client.start_saga(work, idempotency_key=key, wait=True), ""
                return await client.execute(work, idempotency_key=key), ""
            except UnavailableError as e:
                if time.monotonic() > deadline or self._stop.is_set():
                    return None, f"UNAVAILABLE: {e}"
                await asyncio.sleep(0.2)
                with contextlib.suppress(UnavailableError):
                    await client.reconnect()
            except AccordClientError as e:
                return None, f"{e.code.name}: {e}"

    def _record(
        self, w: int, op: str, key: str, shard: str, result: TxnResult | None, error: str
    ) -> None:
        if result is None:
            outcome = "info"
        elif result.state in ("COMMITTED", "COMPLETED"):
            outcome = "ok"
        elif result.state in ("ABORTED", "COMPENSATED"):
            outcome = "fail"
        else:
            outcome = "info"  # STUCK, or still running: unknown to the client
        self.stats.ops[outcome] += 1
        self.stats.ops[op] += 1
        summary = {"state": result.state, "reason": result.reason} if result is not None else None
        self.history.complete(
            outcome,
            process=w,
            op=op,
            key=key,
            gid=result.gid if result is not None else None,
            result=summary,
            error=error or None,
        )
        if outcome == "ok" and shard in self._killed_at:
            self.stats.kill_to_commit_s.append(time.monotonic() - self._killed_at.pop(shard))
        self._on_progress(self)

    # ------------------------------------------------------------ faults

    def _fault(self, fault: str, target: str, **detail: Any) -> None:
        self.stats.faults[fault] += 1
        self.history.fault(fault, target, detail)
        self._on_progress(self)

    async def _restart(self, node: Node, delay_s: float) -> None:
        self._restarting.add(node.name)
        try:
            await asyncio.sleep(delay_s)
            await self._start(node)
        finally:
            self._restarting.discard(node.name)
        self._fault("restart", node.name)

    async def _start(self, node: Node) -> None:
        """Starts a process again. A coordinator may stop right after starting (exit 75:
        it took its shard over, was then paused past its lease, and found itself fenced):
        that is the design working, so it is simply started again."""
        for attempt in range(10):
            t0 = time.monotonic()
            try:
                await node.proc.start_async(60.0)
            except ProcessFailed:
                if attempt == 9:
                    raise
                await asyncio.sleep(1)
                continue
            self.stats.restart_to_ready_s.append(time.monotonic() - t0)
            return

    def _owner(self, shard: str) -> Node | None:
        for node in self.nodes.values():
            if node.name in self._restarting:
                continue
            if node.shard == shard and node.proc.alive() and "listening on" in node.proc.output():
                return node
        return None

    async def _faults(self) -> None:
        pending: list[asyncio.Task[None]] = []
        while not self._stop.is_set():
            try:
                wait = self.rng.expovariate(1 / self.s.fault_every_s)
                async with asyncio.timeout(wait):
                    await self._stop.wait()
                break
            except TimeoutError:
                pass
            fault = self.rng.choice(self.s.faults)
            if fault == "kill-coordinator":
                shard = self.rng.choice(self.shards)
                node = self._owner(shard)
                if node is None:
                    continue
                self.stats.in_doubt_at_kill.append(self._inflight[shard])
                node.proc.kill()
                self._killed_at.setdefault(shard, time.monotonic())
                self._fault("kill", node.name, shard=shard, in_flight=self._inflight[shard])
                # It comes back as the standby of its shard.
                pending.append(asyncio.create_task(self._restart(node, self.rng.uniform(1, 4))))
            elif fault == "power-loss":
                # The owner's machine loses power: frozen first (so nothing more reaches
                # its files), every record no fdatasync covered is dropped, then killed.
                shard = self.rng.choice(self.shards)
                node = self._owner(shard)
                if node is None:
                    continue
                self.stats.in_doubt_at_kill.append(self._inflight[shard])
                node.proc.pause()
                dropped = await asyncio.to_thread(drop_unsynced, self.root / f"wal-{shard}")
                node.proc.kill()
                self._killed_at.setdefault(shard, time.monotonic())
                self._fault(
                    "power-loss",
                    node.name,
                    shard=shard,
                    in_flight=self._inflight[shard],
                    dropped_records=dropped,
                )
                pending.append(asyncio.create_task(self._restart(node, self.rng.uniform(1, 4))))
            elif fault == "kill-participant":
                node = self.nodes[self.rng.choice(self.banks)]
                if not node.proc.alive() or node.name in self._restarting:
                    continue
                node.proc.kill()
                self._fault("kill", node.name)
                pending.append(asyncio.create_task(self._restart(node, self.rng.uniform(0.5, 3))))
            elif fault == "pause":
                node = self.nodes[self.rng.choice([*self.banks, *self.nodes])]
                if not node.proc.alive() or node.proc.paused or node.name in self._restarting:
                    continue
                node.proc.pause()
                self._fault("pause", node.name)
                await asyncio.sleep(self.s.ttl_s + self.rng.uniform(0.5, 2))
                node.proc.resume()
                self._fault("resume", node.name)
                # A coordinator paused past its lease finds itself fenced and exits 75.
                for _ in range(30):
                    if not node.proc.alive():
                        break
                    await asyncio.sleep(0.1)
                if not node.proc.alive():
                    pending.append(asyncio.create_task(self._restart(node, 1)))
            elif fault == "etcd":
                assert self.etcd is not None
                self.etcd.stop()
                self._fault("etcd-stop", "etcd")
                await asyncio.sleep(self.rng.uniform(1, 4))
                await self.etcd.start_async()
                self._fault("etcd-start", "etcd")
        for task in pending:
            await task  # a process that cannot be started again fails the run

    async def heal(self) -> None:
        assert self.etcd is not None
        if not self.etcd.alive():
            await self.etcd.start_async()
        for node in self.nodes.values():
            if node.proc.paused:
                node.proc.resume()
            if not node.proc.alive():
                await self._start(node)
        self.history.fault("heal", "all", {})

    # ------------------------------------------------------------ quiescence

    async def _bank_state(self, name: str) -> bankpb.GetBalancesResponse:
        return await balances(self.nodes[name].proc.address, timeout_s=5)

    async def coordinator_state(self) -> list[dict[str, Any]]:
        assert self.etcd is not None
        out: list[dict[str, Any]] = []
        for shard in self.shards:
            async with await AccordClient.from_etcd(self.etcd.url, shard=shard) as client:
                token = ""
                while True:
                    txns, token = await client.list(limit=1000, page_token=token)
                    out.extend({**t.to_dict(), "shard": shard} for t in txns)
                    if not token:
                        break
        return out

    async def quiesce(self) -> float:
        """Seconds from healing until nothing is in doubt anywhere."""
        t0 = time.monotonic()
        deadline = t0 + self.s.recovery_bound_s
        while True:
            try:
                txns = await self.coordinator_state()
                banks = [await self._bank_state(b) for b in self.banks]
                open_txns = [t for t in txns if t["state"] not in TERMINAL]
                held = sum(b.prepared_branches + b.total_held for b in banks)
                if not open_txns and held == 0:
                    elapsed = time.monotonic() - t0
                    self.history.quiescent(elapsed)
                    return elapsed
            except (AccordClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                elapsed = time.monotonic() - t0
                self.history.quiescent(elapsed)
                return elapsed
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------ the run

    async def run(self) -> None:
        workers = [
            asyncio.create_task(self._worker(w, self.shards[w % len(self.shards)]))
            for w in range(self.s.workers)
        ]
        faults = asyncio.create_task(self._faults())
        try:
            await asyncio.sleep(self.s.duration_s)
        finally:
            self._stop.set()
            await faults
            await asyncio.gather(*workers)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return round(ordered[k], 3)


def save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def copy_dbs(root: Path, banks: list[str], dest: Path) -> dict[str, Path]:
    """A consistent copy of each bank's database (the SDK's backup-based copy)."""
    return {name: copy_database(root / f"{name}.db", dest / f"{name}.db") for name in banks}


def settings_dict(s: ChaosSettings) -> dict[str, Any]:
    d = asdict(s)
    d["out_dir"] = str(s.out_dir) if s.out_dir else None
    return d
