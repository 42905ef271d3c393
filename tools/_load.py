"""``accord load``: the load generator users run against Accord.

The workload is bank transfers between the example bank's participant services
(``accord participant bank``, accounts ``<service>-<i>``): a 2PC transfer is one debit and
``branches - 1`` credits in one ``Execute``; a saga transfer is a debit step (compensated by
``refund``) followed by credit steps (compensated by ``uncredit``) that depend on it.

Two ways of driving it:

- closed loop (the default): ``concurrency`` workers, each issuing its next transaction as
  soon as the previous one returns. Latency is measured from the actual start.
- open loop (``--rate R``): transactions are due on a fixed timetable (one every ``1/R``
  seconds), whatever the answers do; at most ``concurrency`` are outstanding. Latency is
  measured from the *intended* start, so a stall of the system (or of the generator)
  shows up in the latency of every transaction that had to wait for it instead of being
  hidden by the generator politely waiting too (coordinated omission). Transactions that
  started late are counted; those still waiting for a free slot when the run ends are
  counted as dropped.

``--warmup`` seconds run first and are not measured; then the measured part is bounded by
``--duration`` or ``--transactions``. Latencies go into an HDR histogram (microseconds,
3 significant digits); per-second histograms (2 digits) make the timeline. With
``--processes P`` each of P worker processes (``python -m accord.tools._load_worker``) runs its
own event loop and client with its share of the concurrency, rate and transactions; the
parent aligns their start, merges their histograms exactly (encode, decode, add) and shows
the live progress. Every process measures its own CPU time over the run, so the report
says when the generator itself was the bottleneck.

This module measures (settings, workload, recorder, the two loops, one process's run);
``_load_report`` merges and reports, ``_load_run`` runs the whole thing (in worker
processes through ``_load_worker`` when asked), ``_load_view`` shows it and
``_load_plot`` draws it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from accord.client import AccordClient, AccordClientError, Branch, SagaStep, TxnState
from accord.tools._choices import LoadMode

MODES = tuple(m.value for m in LoadMode)
#: Latencies in microseconds, 1 us .. 1 h.
HIST_MAX_US = 3_600_000_000
HIST_DIGITS = 3
TIMELINE_DIGITS = 2
#: An open-loop transaction that starts this much after its intended time is "late".
LATE_S = 0.010
#: A generator process busier than this (% of one core) may be the bottleneck.
SATURATED_PCT = 80.0
PROGRESS_EVERY_S = 0.5
#: After a client error a closed-loop worker pauses (no busy loop against a dead server).
ERROR_PAUSE_S = 0.01
SUCCESS_STATES = frozenset({TxnState.COMMITTED, TxnState.COMPLETED})
#: The outcome is decided (durable) in these; phase two or compensation trails the answer.
_DECIDED = {"COMMITTING": "COMMITTED", "ABORTING": "ABORTED"}
_PLAN_SIZE = 1024
_MAX_SAMPLE_CHARS = 300


class LoadError(Exception):
    """The run could not start (bad settings, no coordinator, a worker died)."""


# ------------------------------------------------------------------------ settings


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    coordinator: str = ""
    etcd: str = ""
    mode: str = "2pc"
    concurrency: int = 16
    duration_s: float | None = None
    transactions: int | None = None
    rate: float | None = None
    branches: int = 2
    payload_bytes: int = 0
    warmup_s: float = 0.0
    processes: int = 1
    services: tuple[str, ...] = ("bank-a", "bank-b")
    accounts: int = 100
    max_amount: int = 5
    seed: int = 1
    #: Client-side deadline of one transaction (it then counts as DEADLINE_EXCEEDED).
    timeout_s: float = 30.0
    #: Bearer token for a coordinator with auth on. Never in a report or on a command
    #: line: workers get it in their environment (ACCORD_TOKEN).
    token: str = field(default="", repr=False)

    def validate(self) -> None:
        """Raises ValueError with a one-line reason for the first bad setting."""
        if bool(self.coordinator) == bool(self.etcd):
            raise ValueError("give exactly one of --coordinator ADDR and --etcd URL")
        if (self.duration_s is None) == (self.transactions is None):
            raise ValueError("give exactly one of --duration S and --transactions N")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("--duration must be > 0")
        if self.transactions is not None and self.transactions < 1:
            raise ValueError("--transactions must be >= 1")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("--rate must be > 0")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if not 1 <= self.processes <= self.concurrency:
            raise ValueError("--processes must be between 1 and --concurrency")
        if not 2 <= self.branches <= 64:
            raise ValueError("--branches must be between 2 and 64")
        if self.payload_bytes < 0:
            raise ValueError("--payload-bytes must be >= 0")
        if not self.warmup_s >= 0:
            raise ValueError("--warmup must be >= 0")
        if not self.services or not all(s and s.strip() == s for s in self.services):
            raise ValueError("--services must be a comma-separated list of service names")
        if self.accounts < 1:
            raise ValueError("--accounts must be >= 1")
        if self.max_amount < 1:
            raise ValueError("the transfer amount must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError("--timeout must be > 0")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    def share(self, index: int) -> Share:
        """Process ``index``'s part: its concurrency and transactions, and its slots of the
        timetable (every P-th, so the processes together keep the even spacing)."""
        p = self.processes

        def part(n: int) -> int:
            return n // p + (1 if index < n % p else 0)

        return Share(
            index=index,
            concurrency=part(self.concurrency),
            transactions=None if self.transactions is None else part(self.transactions),
            interval_s=None if self.rate is None else p / self.rate,
            phase_s=0.0 if self.rate is None else index / self.rate,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["services"] = list(self.services)
        del d["token"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoadSettings:
        return cls(**{**d, "services": tuple(d["services"])})


@dataclass(frozen=True, kw_only=True)
class Share:
    index: int
    concurrency: int
    transactions: int | None
    #: Open loop: seconds between this process's intended starts, and its first one.
    interval_s: float | None
    phase_s: float = 0.0


# ------------------------------------------------------------------------ workload

#: One transaction: returns its final state (and a reason); raises on a client error.
TxnFn = Callable[[], Awaitable[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class PlannedTxn:
    """One transfer, ready to send: 2PC branches, or saga steps."""

    branches: tuple[Branch, ...] = ()
    steps: tuple[SagaStep, ...] = ()


def pad(payload: dict[str, Any], size: int) -> bytes:
    """The payload as JSON, with a ``pad`` field filling it to about ``size`` bytes."""
    raw = json.dumps(payload, separators=(",", ":")).encode()
    if size <= len(raw):
        return raw
    empty = json.dumps({**payload, "pad": ""}, separators=(",", ":")).encode()
    return json.dumps(
        {**payload, "pad": "x" * max(0, size - len(empty))}, separators=(",", ":")
    ).encode()


def _movements(
    s: LoadSettings, rng: random.Random
) -> tuple[tuple[str, str, int], list[tuple[str, str, int]]]:
    """(service, account, amount) of the debit and of each credit of one transfer: the
    debit on a random service, the credits spread over the others."""
    src = rng.choice(s.services)
    others = [x for x in s.services if x != src] or [src]
    credits = []
    for j in range(s.branches - 1):
        dst = others[j % len(others)]
        credits.append((dst, f"{dst}-{rng.randrange(s.accounts)}", rng.randint(1, s.max_amount)))
    debit = (src, f"{src}-{rng.randrange(s.accounts)}", sum(c[2] for c in credits))
    return debit, credits


def build_plan(s: LoadSettings, rng: random.Random, size: int = _PLAN_SIZE) -> list[PlannedTxn]:
    """Pre-built transfers (payloads already JSON bytes), cycled through by a worker, so
    the generator spends its CPU on calls rather than on building them."""
    plan: list[PlannedTxn] = []
    for _ in range(size):
        kind = s.mode if s.mode != "mixed" else rng.choice(("2pc", "saga"))
        (src, src_account, total), credits = _movements(s, rng)

        def body(account: str, amount: int) -> bytes:
            return pad({"account": account, "amount": amount}, s.payload_bytes)

        if kind == "2pc":
            branches = (
                Branch(service=src, operation="debit", payload=body(src_account, total)),
                *(
                    Branch(service=svc, operation="credit", payload=body(acc, amt))
                    for svc, acc, amt in credits
                ),
            )
            plan.append(PlannedTxn(branches=branches))
        else:
            steps = (
                SagaStep(
                    name="debit",
                    service=src,
                    action="debit",
                    compensation="refund",
                    payload=body(src_account, total),
                ),
                *(
                    SagaStep(
                        name=f"credit-{j + 1}",
                        service=svc,
                        action="credit",
                        compensation="uncredit",
                        payload=body(acc, amt),
                        depends_on=("debit",),
                    )
                    for j, (svc, acc, amt) in enumerate(credits)
                ),
            )
            plan.append(PlannedTxn(steps=steps))
    return plan


def transfer_fn(client: AccordClient, plan: Sequence[PlannedTxn]) -> TxnFn:
    """A transaction function walking ``plan`` round and round."""
    pos = 0
    n = len(plan)

    async def txn() -> tuple[str, str]:
        nonlocal pos
        t = plan[pos]
        pos = (pos + 1) % n
        if t.steps:
            r = await client.start_saga(t.steps, wait=True)
        else:
            r = await client.execute(t.branches)
        return _DECIDED.get(r.state, r.state), r.reason

    return txn


# ------------------------------------------------------------------------ recording


def new_histogram(digits: int = HIST_DIGITS) -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, digits)


def _us(seconds: float) -> int:
    return min(HIST_MAX_US, max(1, round(seconds * 1e6)))


class _Second:
    __slots__ = ("count", "encoded", "errors", "hist")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.hist: HdrHistogram | None = None
        self.encoded: str | None = None

    def freeze(self) -> None:
        """Keeps the histogram encoded (a few hundred bytes instead of ~20 KiB)."""
        if self.hist is not None:
            self.encoded = self.hist.encode().decode()
            self.hist = None


class Recorder:
    """What one process measured. Times are ``time.perf_counter()`` seconds; ``origin``
    is where the measured part begins (after the warmup)."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.hist = new_histogram()
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        #: The first message seen for every outcome other than success, and every error.
        self.samples: dict[str, str] = {}
        self.timeline: dict[int, _Second] = {}
        self._last_second = -1
        self.scheduled = 0
        self.late = 0
        self.dropped = 0
        self.max_start_delay_s = 0.0
        self.finished_at: float | None = None

    @property
    def count(self) -> int:
        return self.outcomes.total() + self.errors.total()

    def _second(self, finish: float) -> _Second:
        sec = max(0, int(finish - self.origin))
        if sec > self._last_second:
            # Answers come in time order: seconds two behind will not change any more.
            for old in range(max(0, self._last_second - 2), sec - 1):
                if old in self.timeline:
                    self.timeline[old].freeze()
            self._last_second = sec
        bucket = self.timeline.get(sec)
        if bucket is None:
            bucket = self.timeline[sec] = _Second()
        return bucket

    def outcome(self, state: str, reason: str, intended: float, finish: float) -> None:
        us = _us(finish - intended)
        self.hist.record_value(us)
        self.outcomes[state] += 1
        bucket = self._second(finish)
        bucket.count += 1
        if bucket.hist is None:
            bucket.hist = new_histogram(TIMELINE_DIGITS)
            if bucket.encoded is not None:  # a straggler into a frozen second
                bucket.hist.add(HdrHistogram.decode(bucket.encoded))
                bucket.encoded = None
        bucket.hist.record_value(us)
        if state not in SUCCESS_STATES and state not in self.samples and reason:
            self.samples[state] = reason[:_MAX_SAMPLE_CHARS]

    def error(self, code: str, message: str, finish: float) -> None:
        self.errors[code] += 1
        bucket = self._second(finish)
        bucket.count += 1
        bucket.errors += 1
        if code not in self.samples:
            self.samples[code] = message.splitlines()[0][:_MAX_SAMPLE_CHARS] if message else code

    def started(self, intended: float, actual: float) -> None:
        delay = actual - intended
        self.scheduled += 1
        if delay > LATE_S:
            self.late += 1
        self.max_start_delay_s = max(self.max_start_delay_s, delay)

    def progress(self, now: float) -> dict[str, Any]:
        """A snapshot for the live view (cumulative; cheap enough twice a second)."""
        return {
            "measured_s": now - self.origin,
            "count": self.count,
            "hist": self.hist.encode().decode(),
            "outcomes": dict(self.outcomes),
            "errors": dict(self.errors),
        }

    def export(self) -> dict[str, Any]:
        """Everything measured, JSON-able, for merging (possibly in another process)."""
        for bucket in self.timeline.values():
            bucket.freeze()
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return {
            "hist": self.hist.encode().decode(),
            "outcomes": dict(self.outcomes),
            "errors": dict(self.errors),
            "samples": self.samples,
            "timeline": [
                [sec, b.count, b.errors, b.encoded] for sec, b in sorted(self.timeline.items())
            ],
            "scheduled": self.scheduled,
            "late": self.late,
            "dropped": self.dropped,
            "max_start_delay_s": self.max_start_delay_s,
            "window_s": max(0.0, end - self.origin),
        }


# ------------------------------------------------------------------------ driving


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """When one process starts, measures and stops (``perf_counter`` seconds)."""

    start: float
    warmup_s: float
    duration_s: float | None
    transactions: int | None
    timeout_s: float

    @property
    def measure_from(self) -> float:
        return self.start + self.warmup_s

    @property
    def end(self) -> float:
        return math.inf if self.duration_s is None else self.measure_from + self.duration_s


async def _one(
    txn: TxnFn,
    rec: Recorder,
    intended: float,
    measured: bool,
    timeout_s: float,
    clock: Callable[[], float],
) -> bool:
    """Runs one transaction; records it when measured. Returns False on a client error."""
    state = reason = code = ""
    try:
        async with asyncio.timeout(timeout_s):
            state, reason = await txn()
    except TimeoutError:
        code, reason = "DEADLINE_EXCEEDED", f"no answer within {timeout_s:g} s (client side)"
    except AccordClientError as e:
        code, reason = e.code.name, str(e)
    except Exception as e:
        code, reason = type(e).__name__, f"{type(e).__name__}: {e}"
    finish = clock()
    if measured:
        if code:
            rec.error(code, reason, finish)
        else:
            rec.outcome(state, reason, intended, finish)
    return not code


async def run_closed_loop(
    txn: TxnFn,
    concurrency: int,
    bounds: Bounds,
    rec: Recorder,
    *,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """``concurrency`` workers, each starting its next transaction when the last ends."""
    remaining = bounds.transactions
    stop = stop or asyncio.Event()

    async def worker() -> None:
        nonlocal remaining
        while not stop.is_set():
            now = clock()
            if now >= bounds.end:
                return
            measured = now >= bounds.measure_from
            if measured and remaining is not None:
                if remaining <= 0:
                    return
                remaining -= 1
            if not await _one(txn, rec, now, measured, bounds.timeout_s, clock):
                await asyncio.sleep(ERROR_PAUSE_S)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rec.finished_at = clock()


async def run_open_loop(
    txn: TxnFn,
    concurrency: int,
    interval_s: float,
    bounds: Bounds,
    rec: Recorder,
    *,
    phase_s: float = 0.0,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Starts a transaction every ``interval_s`` (from ``bounds.start + phase_s``), at most
    ``concurrency`` outstanding; latency counts from the intended start."""
    stop = stop or asyncio.Event()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[bool]] = set()
    remaining = bounds.transactions
    stopped = asyncio.create_task(stop.wait())

    async def run(intended: float, measured: bool) -> bool:
        try:
            return await _one(txn, rec, intended, measured, bounds.timeout_s, clock)
        finally:
            slots.release()

    k = 0
    try:
        while not stop.is_set():
            intended = bounds.start + phase_s + k * interval_s
            measured = intended >= bounds.measure_from
            if intended >= bounds.end or (measured and remaining is not None and remaining <= 0):
                break
            delay = intended - clock()
            if delay > 0:
                await asyncio.wait([stopped], timeout=delay)
                if stop.is_set():
                    break
            if slots.locked():
                # Every slot busy: this transaction waits, and its latency counts the wait.
                acquire = asyncio.create_task(slots.acquire())
                wait_s = None if bounds.end == math.inf else max(0.0, bounds.end - clock())
                done, _ = await asyncio.wait(
                    [acquire, stopped], timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
                )
                if acquire not in done:
                    acquire.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await acquire
                    if not acquire.cancelled():
                        slots.release()  # acquired as it was being cancelled
                    if not stop.is_set():
                        # The run ended first: this slot and the rest were never started.
                        rec.dropped += _slots_left(intended, interval_s, bounds)
                    break
            else:
                await slots.acquire()
            if measured:
                rec.started(intended, clock())
                if remaining is not None:
                    remaining -= 1
            task = asyncio.create_task(run(intended, measured))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        stopped.cancel()
        for t in tasks:
            t.cancel()
    rec.finished_at = clock()


def _slots_left(intended: float, interval_s: float, bounds: Bounds) -> int:
    """Measured slots of the timetable from ``intended`` (included) to the end."""
    if bounds.end == math.inf:
        return 0
    first = max(0, math.ceil((bounds.measure_from - intended) / interval_s - 1e-9))
    last = math.ceil((bounds.end - intended) / interval_s - 1e-9)
    return max(0, last - first)


def cpu_s() -> float:
    """CPU seconds of this process so far, every thread (gRPC's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def connect(s: LoadSettings) -> AccordClient:
    """A client of the coordinator (or, with etcd, a sharded client of every shard's
    owner: the load is spread over them all), ready; LoadError if not."""
    try:
        client = (
            await AccordClient.from_etcd(s.etcd, token=s.token)
            if s.etcd
            else AccordClient(s.coordinator, token=s.token)
        )
    except AccordClientError as e:
        raise LoadError(str(e)) from None
    try:
        await client.wait_ready(5.0)
    except TimeoutError:
        await client.close()
        raise LoadError(f"cannot reach the coordinator at {client.address} within 5 s") from None
    return client


ProgressFn = Callable[[dict[str, Any]], None]


async def run_worker(
    s: LoadSettings,
    index: int,
    client: AccordClient,
    *,
    start_wall: float | None = None,
    on_progress: ProgressFn | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Process ``index``'s share of the run, from ``start_wall`` (``time.time()``; now
    when None); returns the exported measurements plus its CPU use."""
    share = s.share(index)
    rng = random.Random(f"{s.seed}:{index}")
    txn = transfer_fn(client, build_plan(s, rng))
    if start_wall is not None:
        await asyncio.sleep(max(0.0, start_wall - time.time()))
    start = time.perf_counter()
    cpu0 = cpu_s()
    bounds = Bounds(
        start=start,
        warmup_s=s.warmup_s,
        duration_s=s.duration_s,
        transactions=share.transactions,
        timeout_s=s.timeout_s,
    )
    rec = Recorder(bounds.measure_from)
    stop = stop or asyncio.Event()

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            if on_progress is not None:
                on_progress({"index": index, **rec.progress(time.perf_counter())})

    ticker = asyncio.create_task(report())
    try:
        if share.concurrency > 0 and share.transactions != 0:
            if share.interval_s is None:
                await run_closed_loop(txn, share.concurrency, bounds, rec, stop=stop)
            else:
                await run_open_loop(
                    txn,
                    share.concurrency,
                    share.interval_s,
                    bounds,
                    rec,
                    phase_s=share.phase_s,
                    stop=stop,
                )
        rec.finished_at = rec.finished_at or time.perf_counter()
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    wall = time.perf_counter() - start
    used = cpu_s() - cpu0
    out = rec.export()
    if s.duration_s is not None and not stop.is_set():
        # The measured part lasted the duration even if the last answer came earlier.
        out["window_s"] = max(out["window_s"], s.duration_s)
    return {"index": index, "pid": os.getpid(), "cpu_s": used, "wall_s": wall, **out}
