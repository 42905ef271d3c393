"""The closed-loop load generator: N workers on one event loop, each issuing its next
transaction as soon as the previous one returns.

Each run has a warmup (not measured) then a measured window bounded in time and in count;
load never pauses between the two, so the window sees the steady state. A transaction is
measured when it *completes* inside the window; transactions still in flight when the
window closes are awaited (so the next run starts on a quiet system) but not counted.
Latency goes into an HdrHistogram in microseconds. The generator's own CPU use
(``getrusage``, every thread of this process, gRPC's included) and the CPU use of every
server process (``/proc/PID/stat``) over the window are reported, so a saturated
generator is visible. A server that forks workers (PostgreSQL: a backend per connection)
is measured as a process tree: its root, every live descendant, and the children they
have reaped.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

#: One transaction; returns True when it committed. Raising counts as an error.
TxnFn = Callable[[], Awaitable[bool]]
#: Makes the transaction function of worker ``i`` (its own random stream, say).
TxnFactory = Callable[[int], TxnFn]

_HIST_MAX_US = 120_000_000
_ERROR_PAUSE_S = 0.01
_MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    concurrency: int
    warmup_s: float = 2.0
    duration_s: float = 10.0
    #: The window also closes after this many measured transactions.
    max_transactions: int = 200_000
    #: How long in-flight transactions may take to finish after the window.
    drain_timeout_s: float = 30.0


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    concurrency: int
    transactions: int
    errors: int
    duration_s: float
    tps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: CPU of this process (the generator) over the window, in % of one core.
    client_cpu_pct: float
    #: CPU of each server process over the window, in % of one core.
    server_cpu_pct: dict[str, float] = field(default_factory=dict)
    #: CPU of kernel threads (journal commits and writeback for fsync ...), % of a core.
    kernel_cpu_pct: float = 0.0
    #: CPU of every other process on this machine, in % of one core: well above zero
    #: means something else was running and the figures are disturbed.
    other_cpu_pct: float = 0.0
    #: The part of ``other_cpu_pct`` used by the idle processes of the run's other rows
    #: (``idle_pids``/``idle_trees``): every row stays up for the whole run.
    idle_rows_cpu_pct: float = 0.0
    error_samples: tuple[str, ...] = ()


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces
    and parentheses): index 0 is field 3 (state) of proc(5)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads); 0 if gone."""
    rest = _stat_fields(pid)
    if rest is None:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_s(root: int) -> float:
    """User + system CPU seconds so far of ``root`` and every live descendant, plus the
    CPU of the children they have exited and been reaped (``cutime``/``cstime``): the
    whole work of a server that forks a process per connection, such as PostgreSQL's
    postmaster and its backends. A child that exits between two snapshots moves its
    time into its parent's ``cutime`` when reaped, so nothing is lost or counted twice
    (a child not yet reaped at the second snapshot is missed until it is). 0 if gone."""
    parents: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        rest = _stat_fields(entry.name)
        if rest is None:
            continue
        pid = int(entry.name)
        parents.setdefault(int(rest[1]), []).append(pid)
        # utime, stime, cutime, cstime: fields 14-17 of proc(5).
        ticks[pid] = sum(int(v) for v in rest[11:15])
    if root not in ticks:
        return 0.0
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(parents.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


_PF_KTHREAD = 0x00200000


def kernel_threads_cpu() -> dict[int, int]:
    """CPU ticks of every kernel thread by PID (ext4's journal and writeback workers doing
    the fsyncs' work, among others). Compare two snapshots with :func:`kernel_cpu_s`."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        rest = _stat_fields(entry.name)
        if rest is None or not int(rest[6]) & _PF_KTHREAD:
            continue
        out[int(entry.name)] = int(rest[11]) + int(rest[12])
    return out


def kernel_cpu_s(before: Mapping[int, int], after: Mapping[int, int]) -> float:
    """CPU seconds kernel threads used between two snapshots (threads that came and went
    in between are missed: their time counts as "other")."""
    ticks = sum(max(0, t - before.get(pid, 0)) for pid, t in after.items())
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent in processes (user, nice and system, all
    cores), the same kinds of time as ``/proc/PID/stat`` charges to a process; interrupt
    handling (loopback packets are mostly softirq), iowait and steal are left out."""
    try:
        with open("/proc/stat") as f:
            user, nice, system = (int(v) for v in f.readline().split()[1:4])
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Window:
    """What the workers share: whether the window is open, counts, the histogram."""

    def __init__(self, max_transactions: int) -> None:
        self.measuring = False
        self.stopping = False
        self.ok = 0
        self.errors = 0
        self.max_transactions = max_transactions
        self.full = asyncio.Event()
        self.hist = HdrHistogram(1, _HIST_MAX_US, 3)
        self.samples: list[str] = []

    def note_error(self, e: BaseException) -> None:
        if self.measuring:
            self.errors += 1
        text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if len(self.samples) < _MAX_ERROR_SAMPLES and text not in self.samples:
            self.samples.append(text)


async def _worker(window: _Window, txn: TxnFn) -> None:
    clock = time.perf_counter
    hist = window.hist
    while not window.stopping:
        t0 = clock()
        try:
            committed = await txn()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            window.note_error(e)
            await asyncio.sleep(_ERROR_PAUSE_S)  # no busy loop against a dead server
            continue
        if not window.measuring:
            continue
        if not committed:
            window.errors += 1
            continue
        hist.record_value(max(1, int((clock() - t0) * 1e6)))
        window.ok += 1
        if window.ok >= window.max_transactions:
            window.full.set()


async def run_closed_loop(
    factory: TxnFactory,
    settings: LoadSettings,
    *,
    server_pids: Mapping[str, int] | None = None,
    server_trees: Mapping[str, int] | None = None,
    idle_pids: Sequence[int] = (),
    idle_trees: Sequence[int] = (),
) -> LoadResult:
    """Runs ``settings.concurrency`` workers: warmup, then the measured window.
    ``server_pids``: name -> PID of a server process; ``server_trees``: name -> root PID
    of a server measured with every process it forks (:func:`process_tree_cpu_s`);
    ``idle_pids``/``idle_trees``: processes (trees) that should be idle, whose CPU is
    reported as ``idle_rows_cpu_pct`` (and counts in ``other_cpu_pct``)."""
    if settings.concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    pids = dict(server_pids or {})
    trees = dict(server_trees or {})

    def servers_cpu() -> dict[str, float]:
        return {
            **{name: process_cpu_s(pid) for name, pid in pids.items()},
            **{name: process_tree_cpu_s(pid) for name, pid in trees.items()},
        }

    def idle_cpu() -> float:
        return sum(process_cpu_s(p) for p in idle_pids) + sum(
            process_tree_cpu_s(p) for p in idle_trees
        )

    window = _Window(settings.max_transactions)
    tasks = [
        asyncio.create_task(_worker(window, factory(i)), name=f"bench-worker-{i}")
        for i in range(settings.concurrency)
    ]
    try:
        await asyncio.sleep(settings.warmup_s)
        cpu0, busy0, kern0 = self_cpu_s(), machine_busy_s(), kernel_threads_cpu()
        srv0, idle0 = servers_cpu(), idle_cpu()
        t0 = time.perf_counter()
        window.measuring = True
        try:
            async with asyncio.timeout(settings.duration_s):
                await window.full.wait()
        except TimeoutError:
            pass
        window.measuring = False
        elapsed = time.perf_counter() - t0
        cpu1, busy1, kern1 = self_cpu_s(), machine_busy_s(), kernel_threads_cpu()
        srv1, idle1 = servers_cpu(), idle_cpu()
        window.stopping = True
        await asyncio.wait(tasks, timeout=settings.drain_timeout_s)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    hist = window.hist
    has = window.ok > 0
    ours = (cpu1 - cpu0) + sum(srv1[n] - srv0[n] for n in srv1)
    kernel = kernel_cpu_s(kern0, kern1)
    other = max(0.0, (busy1 - busy0) - ours - kernel)
    return LoadResult(
        concurrency=settings.concurrency,
        transactions=window.ok,
        errors=window.errors,
        duration_s=round(elapsed, 3),
        tps=round(window.ok / elapsed, 1) if elapsed > 0 else 0.0,
        p50_ms=round(hist.get_value_at_percentile(50) / 1000, 3) if has else 0.0,
        p99_ms=round(hist.get_value_at_percentile(99) / 1000, 3) if has else 0.0,
        max_ms=round(hist.get_max_value() / 1000, 3) if has else 0.0,
        client_cpu_pct=round((cpu1 - cpu0) / elapsed * 100, 1) if elapsed > 0 else 0.0,
        server_cpu_pct={
            name: round((srv1[name] - srv0[name]) / elapsed * 100, 1) if elapsed > 0 else 0.0
            for name in srv1
        },
        kernel_cpu_pct=round(kernel / elapsed * 100, 1) if elapsed > 0 else 0.0,
        other_cpu_pct=round(other / elapsed * 100, 1) if elapsed > 0 else 0.0,
        idle_rows_cpu_pct=round((idle1 - idle0) / elapsed * 100, 1) if elapsed > 0 else 0.0,
        error_samples=tuple(window.samples),
    )
