"""``accord chaos``: the whole topology on this machine, a bank workload of 2PC transfers
and sagas, faults on a seeded schedule, then healing, quiescence and the checker.

Topology: one etcd (or a cluster of ``etcd_members``); ``participants`` bank services (``bank-1`` ...) registered in etcd
on fixed loopback ports, so a restarted one comes back at the address coordinators know
(each on its own SQLite file, or with ``participant_db="postgres"`` on its own database of
one PostgreSQL server the harness starts);
for each of ``coordinators`` WAL shards (``s1`` ...) an owner and a standby sharing the
shard's WAL directory (the stand-in for a shared volume). Workers are bound to a shard;
each finds the shard's owner in etcd and, on ``UNAVAILABLE``, finds it again and retries
with the same idempotency key. Every client operation and every fault goes to the
history (JSONL), which the checker reads with the participants' databases afterwards.

With ``net``, every process runs on a host of its own (a network namespace of a
:class:`~accord.tools.topology.NetLab`: etcd members, coordinators, banks, the query
service), and the network faults can be injected: partitions between a shard's owner and
a bank (both ways or one way), an owner cut off from etcd, a bank cut off from the
coordinators while it holds prepared branches, latency or loss on a link, an etcd member
cut off. Each lasts a seeded, bounded time, then heals; the time from a heal to the first
transaction that succeeds through the healed link is the recovery time reported.
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
from accord.tools._choices import CLUSTER_FAULTS, NET_FAULTS, Fault, ParticipantDb
from accord.tools.chaos._history import HistoryWriter
from accord.tools.topology import (
    EtcdServer,
    ManagedProcess,
    NetHost,
    NetLab,
    PostgresServer,
    ProcessFailed,
    Topology,
    balances,
    etcd_url,
    free_port,
)
from accord.tools.topology import Fault as NetFault

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
    #: Each process on a host of its own (a network namespace; needs root), so network
    #: faults can be injected.
    net: bool = False
    #: etcd members: 1, or a cluster of 3 (or 5).
    etcd_members: int = 1
    #: A network fault lasts this long (seconds, drawn uniformly), then heals.
    net_fault_s: tuple[float, float] = (2.0, 6.0)


def validate(s: ChaosSettings) -> None:
    """ValueError (one line) for settings that cannot run together."""
    if s.participant_db not in PARTICIPANT_DBS:
        raise ValueError(f"participant_db must be one of {PARTICIPANT_DBS}")
    if s.etcd_members not in (1, 3, 5):
        raise ValueError("etcd_members: 1, 3 or 5")
    unknown = [f for f in s.faults if f not in INJECTABLE_FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown}")
    net = sorted(f for f in s.faults if f in NET_FAULTS)
    if net and not s.net:
        raise ValueError(f"faults {', '.join(net)} need each process on its own host (--net)")
    cluster = sorted(f for f in s.faults if f in CLUSTER_FAULTS)
    if cluster and s.etcd_members < 3:
        raise ValueError(f"faults {', '.join(cluster)} need an etcd cluster (--etcd-members 3)")
    if s.net and s.tls:
        raise ValueError("--net with --tls is not supported yet (certificates name 127.0.0.1)")
    if s.net and s.participant_db != "sqlite":
        raise ValueError("--net runs SQLite banks only (PostgreSQL runs on 127.0.0.1)")


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
    #: Per network fault kind: seconds from its heal to the first transaction that
    #: succeeded through the healed link.
    recover_s: dict[str, list[float]] = field(default_factory=dict)
    #: Heals after which no transaction went through the link before the run ended.
    unrecovered: Counter[str] = field(default_factory=Counter)
    #: Coordinators that stopped themselves as fenced (exit 75) and were started again.
    fenced_exits: int = 0
    #: Faults chosen but not injectable at that moment (no owner, impairment missing...).
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass
class _HealWatch:
    """A healed network fault waiting for its first transaction through the link."""

    kind: str
    #: The shard whose owner is on the link (None: any shard).
    shard: str | None
    #: The bank on the link (None: any transaction of the shard).
    bank: str | None
    healed_at: float


class Chaos:
    def __init__(self, s: ChaosSettings, root: Path, on_progress: Callable[[Chaos], None]):
        self.s = s
        self.root = root
        self.rng = random.Random(s.seed)
        self.history = HistoryWriter(root / "history.jsonl")
        self.stats = Stats()
        self.topology = Topology(root, certs=tls_certs(root) if s.tls else None)
        self.nodes: dict[str, Node] = {}
        #: The first etcd member (every one: :attr:`etcd_members`; their URL: etcd_url).
        self.etcd: EtcdServer | None = None
        self.etcd_members: list[EtcdServer] = []
        self.etcd_url = ""
        #: With ``net``: the lab every process has its host in (closed by stop_all).
        self.lab: NetLab | None = None
        self._watches: list[_HealWatch] = []
        self._deck: list[str] = []
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

    def _host(self, name: str) -> NetHost | None:
        return self.lab.host(name) if self.lab is not None else None

    def _port(self, fixed: int) -> int:
        """A port kept across restarts: on its own host any fixed one is free."""
        return fixed if self.lab is not None else free_port()

    def _bank(self, name: str) -> ManagedProcess:
        """A bank registered in etcd, on a port kept across its restarts (so it comes
        back at the address the coordinators know)."""
        return self.topology.bank(
            name,
            host=self._host(name),
            port=self._port(7100),
            etcd=self.etcd_url,
            instance_id=name,
            ttl_s=self.s.ttl_s,
            accounts=self.s.accounts,
            initial_balance=self.s.initial_balance,
            in_doubt_after_s=5,
            db=self.db_urls.get(name),
        )

    def _coordinator(self, name: str, shard: str) -> ManagedProcess:
        """The owner or a standby of ``shard``, whichever it finds itself to be."""
        return self.topology.coordinator(
            name,
            host=self._host(name),
            port=self._port(7070),
            wal=f"wal-{shard}",
            cid=name,
            shard=shard,
            etcd=self.etcd_url,
            role="any",
            ttl_s=self.s.ttl_s,
            retry_max_s=0.5,
            default_timeout_ms=15000,
            log_level="info",
            # The SYNCED marker lets a power loss be simulated on the coordinator's WAL.
            env={"ACCORD_WAL_SYNC_MARKER": "1", **self.s.coordinator_env},
        )

    def start_topology(self) -> None:
        validate(self.s)
        if self.s.net:
            self.lab = NetLab()
        if self.s.etcd_members == 1:
            self.etcd_members = [self.topology.etcd(host=self._host("etcd"))]
        else:
            names = [f"etcd-{i + 1}" for i in range(self.s.etcd_members)]
            hosts = [self.lab.host(n) for n in names] if self.lab is not None else None
            self.etcd_members = self.topology.etcd_cluster(names, hosts=hosts)
        self.etcd = self.etcd_members[0]
        self.etcd_url = etcd_url(self.etcd_members)
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
        try:
            self.topology.stop()
        finally:
            if self.lab is not None:
                self.lab.close()

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
        rng = random.Random(self.s.seed * 1000 + w)
        client: AccordClient | None = None
        i = 0
        while not self._stop.is_set():
            if client is None:
                try:
                    client = await AccordClient.from_etcd(self.etcd_url, shard=shard, timeout_s=30)
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
            self._record(w, op, key, shard, result, error, _banks(request))
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
        self,
        w: int,
        op: str,
        key: str,
        shard: str,
        result: TxnResult | None,
        error: str,
        banks: frozenset[str] = frozenset(),
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
        if outcome == "ok" and self._watches:
            now = time.monotonic()
            for watch in list(self._watches):
                if watch.shard in (None, shard) and (watch.bank is None or watch.bank in banks):
                    self._watches.remove(watch)
                    self.stats.recover_s.setdefault(watch.kind, []).append(now - watch.healed_at)
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

    def _skip(self, fault: str) -> None:
        """A fault chosen but not injectable now (no live owner, a member already
        down...): counted, and with ``net`` tried again later in the round (thrice)."""
        self.stats.skipped[fault] += 1
        if self.s.net and self.stats.skipped[fault] <= 3:
            self._deck.insert(0, fault)

    def _next_fault(self) -> str:
        """The next fault: a seeded choice; with ``net``, a seeded deck instead (each
        kind once per round, in a shuffled order), so a short run injects every kind."""
        if not self.s.net:
            return self.rng.choice(self.s.faults)
        if not self._deck:
            self._deck = list(self.s.faults)
            self.rng.shuffle(self._deck)
        return self._deck.pop()

    async def _supervise(self, pending: list[asyncio.Task[None]]) -> None:
        """Starts again every coordinator that stopped by itself as fenced (exit 75: it
        lost its lease, say after its etcd links failed for longer than the TTL), as a
        process supervisor would."""
        while not self._stop.is_set():
            for node in self.nodes.values():
                if (
                    node.kind == "coordinator"
                    and node.name not in self._restarting
                    and node.proc.returncode == 75
                ):
                    self.stats.fenced_exits += 1
                    self._restarting.add(node.name)
                    pending.append(asyncio.create_task(self._restart(node, 0.5)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._stop.wait()

    async def _faults(self) -> None:
        pending: list[asyncio.Task[None]] = []
        supervisor = asyncio.create_task(self._supervise(pending))
        while not self._stop.is_set():
            try:
                wait = self.rng.expovariate(1 / self.s.fault_every_s)
                async with asyncio.timeout(wait):
                    await self._stop.wait()
                break
            except TimeoutError:
                pass
            fault = self._next_fault()
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
                if not node.proc.alive() and node.name not in self._restarting:
                    self._restarting.add(node.name)  # not the supervisor's too
                    pending.append(asyncio.create_task(self._restart(node, 1)))
            elif fault == "etcd":
                members = [m for m in self.etcd_members if m.alive()]
                for m in members:
                    m.stop()
                self._fault("etcd-stop", "etcd")
                await asyncio.sleep(self.rng.uniform(1, 4))
                await asyncio.gather(*(m.start_async(60) for m in members))
                self._fault("etcd-start", "etcd")
            elif fault == "kill-etcd-member":
                member = self.rng.choice(self.etcd_members)
                if any(not m.alive() for m in self.etcd_members):
                    self._skip(fault)
                    continue  # one member down at most: the cluster keeps its quorum
                member.kill()
                self._fault("kill-etcd-member", member.name)
                pending.append(
                    asyncio.create_task(self._restart_etcd(member, self.rng.uniform(1, 4)))
                )
            else:
                await self._net_fault(fault, pending)
        await supervisor
        for task in pending:
            await task  # a process that cannot be started again fails the run

    async def _restart_etcd(self, member: EtcdServer, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await member.start_async(60)
        self._fault("restart", member.name)

    # ------------------------------------------------------------ network faults

    def _net_hold_s(self) -> float:
        lo, hi = self.s.net_fault_s
        return self.rng.uniform(lo, hi)

    def _link(self) -> tuple[str, Node, str] | None:
        """A shard, its owner and a bank (seeded), or None without a live owner."""
        shard = self.rng.choice(self.shards)
        bank = self.rng.choice(self.banks)
        owner = self._owner(shard)
        if owner is None or self.nodes[bank].proc.paused or bank in self._restarting:
            return None
        return shard, owner, bank

    async def _net_fault(self, fault: str, pending: list[asyncio.Task[None]]) -> None:
        """Injects one network fault, holds it for a seeded time, heals it."""
        assert self.lab is not None
        lab = self.lab
        injected: list[NetFault] = []
        # (shard, bank) of the link to time after the heal (None: any).
        watch: tuple[str | None, str | None] | None = None
        target = ""
        detail: dict[str, Any] = {}
        try:
            if fault in ("partition", "partition-one-way", "latency", "loss"):
                link = self._link()
                if link is None:
                    self._skip(fault)
                    return
                shard, owner, bank = link
                target, watch = f"{owner.name}<->{bank}", (shard, bank)
                if fault == "partition":
                    injected.append(lab.partition(owner.name, bank))
                elif fault == "partition-one-way":
                    # Which way is seeded too: requests lost, or answers lost.
                    a, b = (owner.name, bank) if self.rng.random() < 0.5 else (bank, owner.name)
                    target = f"{a}->{b}"
                    injected.append(lab.partition(a, b, one_way=True))
                else:
                    impair = (
                        {"delay_ms": 50.0, "jitter_ms": 20.0}
                        if fault == "latency"
                        else {"loss_pct": 5.0}
                    )
                    detail = dict(impair)
                    seed = self.rng.randrange(2**31)
                    try:
                        for a, b in ((owner.name, bank), (bank, owner.name)):
                            injected.append(
                                lab.impair(
                                    a,
                                    peer=b,
                                    delay_ms=impair.get("delay_ms", 0.0),
                                    jitter_ms=impair.get("jitter_ms", 0.0),
                                    loss_pct=impair.get("loss_pct", 0.0),
                                    seed=seed,
                                )
                            )
                    except NotImplementedError:
                        self._skip(fault)
                        watch = None
                        return
            elif fault == "cut-etcd":
                shard = self.rng.choice(self.shards)
                cut_off = self._owner(shard)
                if cut_off is None:
                    self._skip(fault)
                    return
                target, watch = cut_off.name, (shard, None)
                for m in self.etcd_members:
                    injected.append(lab.partition(cut_off.name, m.name))
                detail = {"shard": shard}
            elif fault == "cut-prepared":
                found = await self._cut_prepared(injected)
                if found is None:
                    self._skip(fault)
                    return
                bank, prepared = found
                target, detail = bank, {"prepared_branches": prepared}
                watch = (None, bank)
            elif fault == "partition-etcd-member":
                if any(not m.alive() for m in self.etcd_members):
                    self._skip(fault)
                    return
                member = self.rng.choice(self.etcd_members)
                target = member.name
                injected.append(lab.isolate(member.name))
            else:
                raise ValueError(f"unknown fault {fault!r}")
            held = self._net_hold_s()
            if fault == "cut-etcd":
                # Long enough for the lease to expire: the standby takes the shard over.
                held += self.s.ttl_s
            self._fault(fault, target, held_s=round(held, 2), **detail)
            await asyncio.sleep(held)
        finally:
            for f in reversed(injected):
                f.heal()
            if injected:
                self.history.fault("net-heal", target, {"fault": fault})
                if watch is not None:
                    self._watches.append(_HealWatch(fault, watch[0], watch[1], time.monotonic()))
        # cut-etcd: the owner stopped calling participants when its lease went
        # unrenewed; once etcd answers it again it finds the lease gone and stops (exit
        # 75), and the supervisor starts it again as the standby.

    async def _cut_prepared(self, injected: list[NetFault]) -> tuple[str, int] | None:
        """Cuts a bank off from every coordinator at a moment it holds prepared branches
        (bounded tries: cut, look, heal at once if it held none); None if none did."""
        assert self.lab is not None
        coordinators = [n.name for n in self.nodes.values() if n.kind == "coordinator"]
        for _ in range(20):
            bank = self.rng.choice(self.banks)
            node = self.nodes[bank]
            if not node.proc.alive() or node.proc.paused or bank in self._restarting:
                continue
            cut = [self.lab.partition(bank, c) for c in coordinators]
            try:
                held = (await self._bank_state(bank)).prepared_branches
            except (AccordClientError, OSError, TimeoutError, Exception):
                held = 0
            if held > 0:
                injected.extend(cut)
                return bank, held
            for f in cut:
                f.heal()
            await asyncio.sleep(0.05)
        return None

    def pending_recoveries(self) -> None:
        """Counts the heals no transaction went through before the end of the run."""
        for watch in self._watches:
            self.stats.unrecovered[watch.kind] += 1
        self._watches.clear()

    async def heal(self) -> None:
        if self.lab is not None:
            self.lab.heal_all()
        for member in self.etcd_members:
            if not member.alive():
                await member.start_async(60)
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
        out: list[dict[str, Any]] = []
        for shard in self.shards:
            async with await AccordClient.from_etcd(self.etcd_url, shard=shard) as client:
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


def _banks(request: dict[str, Any]) -> frozenset[str]:
    """The banks an operation's request names."""
    parts = request.get("branches") or request.get("steps") or []
    return frozenset(str(p["service"]) for p in parts)


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
    d["net_fault_s"] = list(s.net_fault_s)
    return d
