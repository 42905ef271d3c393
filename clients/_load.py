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
``--processes P`` each of P worker processes (``python -m clients._load_worker``) runs its
own event loop and client with its share of the concurrency, rate and transactions; the
parent aligns their start, merges their histograms exactly (encode, decode, add) and shows
the live progress. Every process measures its own CPU time over the run, so the report
says when the generator itself was the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from clients._client import AccordClient, Branch, SagaStep
from clients._errors import AccordClientError

MODES = ("2pc", "saga", "mixed")
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
SUCCESS_STATES = frozenset({"COMMITTED", "COMPLETED"})
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
    """A client of the coordinator (or of one found in etcd), ready; LoadError if not."""
    try:
        client = await AccordClient.from_etcd(s.etcd) if s.etcd else AccordClient(s.coordinator)
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


# ------------------------------------------------------------------------ several processes


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process
    stderr_tail: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str = ""
    readers: list[asyncio.Task[None]] = field(default_factory=list)


async def _read_lines(stream: asyncio.StreamReader, handle: Callable[[bytes], None]) -> None:
    while line := await stream.readline():
        handle(line)


async def run_processes(
    s: LoadSettings,
    *,
    on_progress: ProgressFn | None = None,
    stop: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """Runs ``s.processes`` worker processes, starting them together; their results."""
    stop = stop or asyncio.Event()
    children: list[_Child] = []
    ready = [asyncio.Event() for _ in range(s.processes)]
    readers: list[asyncio.Task[None]] = []
    try:
        for i in range(s.processes):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "clients._load_worker",
                json.dumps(s.to_dict()),
                str(i),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=64 * 1024 * 1024,
            )
            child = _Child(i, proc)
            children.append(child)

            def on_line(line: bytes, child: _Child = child) -> None:
                try:
                    msg = json.loads(line)
                except ValueError:
                    child.stderr_tail = [*child.stderr_tail[-19:], line.decode(errors="replace")]
                    return
                kind = msg.get("type")
                if kind == "ready":
                    ready[child.index].set()
                elif kind == "progress" and on_progress is not None:
                    on_progress(msg["snapshot"])
                elif kind == "result":
                    child.result = msg["result"]
                elif kind == "error":
                    child.error = str(msg["message"])
                    ready[child.index].set()

            def on_err(line: bytes, child: _Child = child) -> None:
                text = line.decode(errors="replace").rstrip()
                child.stderr_tail = [*child.stderr_tail[-19:], text]

            assert proc.stdout is not None and proc.stderr is not None
            child.readers = [
                asyncio.create_task(_read_lines(proc.stdout, on_line)),
                asyncio.create_task(_read_lines(proc.stderr, on_err)),
            ]
            readers.extend(child.readers)

        async def became_ready(c: _Child) -> None:
            done = asyncio.create_task(c.proc.wait())
            flag = asyncio.create_task(ready[c.index].wait())
            await asyncio.wait([done, flag], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            flag.cancel()
            if c.proc.returncode is not None:  # it died: let its last words arrive
                await asyncio.wait(c.readers, timeout=2)
            if not ready[c.index].is_set() or c.error:
                why = c.error or ("; ".join(c.stderr_tail[-3:]) or "did not start within 60 s")
                raise LoadError(f"worker process {c.index}: {why}")

        await asyncio.gather(*(became_ready(c) for c in children))
        start_wall = time.time() + 0.05
        for c in children:
            assert c.proc.stdin is not None
            c.proc.stdin.write(f"go {start_wall!r}\n".encode())
            await c.proc.stdin.drain()

        async def forward_stop() -> None:
            await stop.wait()
            for c in children:
                if c.proc.stdin is not None and c.proc.returncode is None:
                    with contextlib.suppress(OSError, RuntimeError):
                        c.proc.stdin.write(b"stop\n")

        stopper = asyncio.create_task(forward_stop())
        try:
            await asyncio.gather(*(c.proc.wait() for c in children))
            await asyncio.gather(*readers)
        finally:
            stopper.cancel()
        for c in children:
            if c.result is None:
                why = c.error or "; ".join(c.stderr_tail[-3:]) or f"exit {c.proc.returncode}"
                raise LoadError(f"worker process {c.index} failed: {why}")
        return [c.result for c in children if c.result is not None]
    finally:
        for c in children:
            if c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                await c.proc.wait()
        for r in readers:
            r.cancel()


# ------------------------------------------------------------------------ the report


def percentiles_ms(hist: HdrHistogram) -> dict[str, float]:
    if hist.get_total_count() == 0:
        return {k: 0.0 for k in ("min", "mean", "p50", "p90", "p99", "p99.9", "max")}
    out = {"min": hist.get_min_value() / 1000, "mean": hist.get_mean_value() / 1000}
    for label, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
        out[label] = hist.get_value_at_percentile(p) / 1000
    out["max"] = hist.get_max_value() / 1000
    return {k: round(v, 3) for k, v in out.items()}


def merge_histograms(encoded: Sequence[str], digits: int = HIST_DIGITS) -> HdrHistogram:
    """Adds up encoded histograms (exactly: counts are added bucket by bucket)."""
    total = new_histogram(digits)
    for e in encoded:
        total.add(HdrHistogram.decode(e))
    return total


@dataclass(kw_only=True)
class Report:
    data: dict[str, Any]
    hist: HdrHistogram

    @property
    def succeeded(self) -> int:
        return sum(n for k, n in self.data["outcomes"].items() if k in SUCCESS_STATES)

    @property
    def exit_code(self) -> int:
        return 0 if self.succeeded > 0 else 1


def build_report(
    s: LoadSettings,
    results: Sequence[Mapping[str, Any]],
    *,
    started_unix: float,
    parent_cpu: tuple[float, float] | None = None,
) -> Report:
    """Merges every process's measurements into the report (``parent_cpu`` is the
    coordinating parent's (CPU s, wall s) when the workers ran in other processes)."""
    hist = merge_histograms([r["hist"] for r in results])
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    seconds: dict[int, list[Any]] = {}
    for r in results:
        outcomes.update(r["outcomes"])
        errors.update(r["errors"])
        for k, v in r["samples"].items():
            samples.setdefault(k, v)
        for sec, count, errs, enc in r["timeline"]:
            slot = seconds.setdefault(sec, [0, 0, []])
            slot[0] += count
            slot[1] += errs
            if enc is not None:
                slot[2].append(enc)
    total = outcomes.total() + errors.total()
    window = max((float(r["window_s"]) for r in results), default=0.0)
    succeeded = sum(n for k, n in outcomes.items() if k in SUCCESS_STATES)
    last = max(seconds, default=-1)
    if last >= 1 and window - last < 0.5:
        # A sliver of a last second (answers to what was in flight at the end) would show
        # as a spike of throughput: it joins the second before.
        count, errs, encs = seconds.pop(last)
        prev = seconds.setdefault(last - 1, [0, 0, []])
        prev[0] += count
        prev[1] += errs
        prev[2].extend(encs)
        last -= 1
    timeline = []
    for sec in range(last + 1):
        count, errs, encs = seconds.get(sec, [0, 0, []])
        h = merge_histograms(encs, TIMELINE_DIGITS)
        has = h.get_total_count() > 0
        # The last second may be partial (or a bit longer): throughput over its real span.
        span = max(1e-3, window - sec if sec == last else 1.0)
        timeline.append(
            {
                "t_s": sec,
                "tps": round(count / span, 1),
                "errors": errs,
                "p50_ms": round(h.get_value_at_percentile(50) / 1000, 3) if has else None,
                "p99_ms": round(h.get_value_at_percentile(99) / 1000, 3) if has else None,
            }
        )
    procs = [
        {
            "index": r["index"],
            "pid": r["pid"],
            "cpu_s": round(r["cpu_s"], 3),
            "wall_s": round(r["wall_s"], 3),
            "cpu_pct": round(100 * r["cpu_s"] / r["wall_s"], 1) if r["wall_s"] > 0 else 0.0,
        }
        for r in results
    ]
    busiest = max((p["cpu_pct"] for p in procs), default=0.0)
    warnings: list[str] = []
    if busiest > SATURATED_PCT:
        hint = "use more --processes" if (os.cpu_count() or 1) > len(procs) else "no idle core"
        warnings.append(
            f"the load generator was near CPU saturation ({busiest:.0f}% of a core in its"
            f" busiest process): it may be the bottleneck, not Accord ({hint})"
        )
    open_loop = None
    if s.rate is not None:
        late = sum(int(r["late"]) for r in results)
        dropped = sum(int(r["dropped"]) for r in results)
        open_loop = {
            "rate": s.rate,
            "scheduled": sum(int(r["scheduled"]) for r in results),
            "late": late,
            "late_threshold_ms": LATE_S * 1000,
            "dropped": dropped,
            "max_start_delay_ms": round(
                max((float(r["max_start_delay_s"]) for r in results), default=0.0) * 1000, 3
            ),
        }
        if late:
            warnings.append(
                f"{late} transactions started more than {LATE_S * 1000:g} ms after their"
                " intended time (every slot busy, or the generator behind); their latency"
                " includes the wait"
            )
        if dropped:
            warnings.append(
                f"{dropped} scheduled transactions never started before the end:"
                f" the rate of {s.rate:g}/s was not reached"
            )
    if total and not succeeded:
        warnings.append("no transaction succeeded")
    cpu = {
        "processes": procs,
        "busiest_cpu_pct": busiest,
        "saturated": busiest > SATURATED_PCT,
        "threshold_pct": SATURATED_PCT,
        "cpus": os.cpu_count(),
    }
    if parent_cpu is not None:
        used, wall = parent_cpu
        cpu["parent_cpu_pct"] = round(100 * used / wall, 1) if wall > 0 else 0.0
    data = {
        "settings": {**s.to_dict(), "loop": "open" if s.open_loop else "closed"},
        "started_unix": round(started_unix, 3),
        "duration_s": round(window, 3),
        "transactions": total,
        "succeeded": succeeded,
        "throughput_tps": round(total / window, 1) if window > 0 else 0.0,
        "success_tps": round(succeeded / window, 1) if window > 0 else 0.0,
        "latency_ms": percentiles_ms(hist),
        "outcomes": dict(sorted(outcomes.items())),
        "errors": dict(sorted(errors.items())),
        "samples": samples,
        "open_loop": open_loop,
        "timeline": timeline,
        "generator": cpu,
        "warnings": warnings,
        "histogram": hist.encode().decode(),
    }
    return Report(data=data, hist=hist)


def merge_progress(snapshots: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The live view's figures from the latest snapshot of every process."""
    hist = merge_histograms([s["hist"] for s in snapshots.values()])
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for snap in snapshots.values():
        outcomes.update(snap["outcomes"])
        errors.update(snap["errors"])
    measured_s = max((float(s["measured_s"]) for s in snapshots.values()), default=0.0)
    count = sum(int(s["count"]) for s in snapshots.values())
    has = hist.get_total_count() > 0
    return {
        "measured_s": measured_s,
        "count": count,
        "tps": count / measured_s if measured_s > 0 else 0.0,
        "p50_ms": hist.get_value_at_percentile(50) / 1000 if has else None,
        "p99_ms": hist.get_value_at_percentile(99) / 1000 if has else None,
        "outcomes": dict(outcomes),
        "errors": dict(errors),
    }


# ------------------------------------------------------------------------ the run


async def run_load(
    s: LoadSettings,
    *,
    on_progress: ProgressFn | None = None,
    stop: asyncio.Event | None = None,
) -> Report:
    """The whole run: in this process (``processes == 1``) or in worker processes."""
    s.validate()
    started = time.time()
    if s.processes == 1:
        client = await connect(s)
        async with client:
            result = await run_worker(s, 0, client, on_progress=on_progress, stop=stop)
        return build_report(s, [result], started_unix=started)
    cpu0, t0 = cpu_s(), time.perf_counter()
    results = await run_processes(s, on_progress=on_progress, stop=stop)
    return build_report(
        s, results, started_unix=started, parent_cpu=(cpu_s() - cpu0, time.perf_counter() - t0)
    )
