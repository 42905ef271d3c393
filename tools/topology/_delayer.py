"""The latency half of a link impairment where the kernel has no netem: a process run
inside the impaired network namespace that takes the packets an iptables ``NFQUEUE``
rule hands it (queue ``--queue N``), holds each one for its delay and then accepts it.

    python -m accord.tools.topology._delayer --queue N --delay-ms D [--jitter-ms J]
        [--seed S] [--parent PID]

(:func:`~accord.tools.topology._impair.impair` runs it by its file path, which skips
importing the package: it needs nothing but the standard library and NetfilterQueue.)

Each packet's delay is drawn uniformly from [D-J, D+J] (netem's default distribution),
from a ``random.Random(seed)``. A packet is never released before the one queued ahead
of it: its release time is the later of its own (arrival + delay) and the previous
packet's, so a flow is never reordered (netem reorders when it jitters) and every delay
stays within [D-J, D+J]: the previous packet's release is at most its own arrival +
D+J, which is before this packet's arrival + D+J.

Packets are queued in copy-meta mode (only the verdict matters, the payload is never
read), at most :data:`MAX_QUEUED` at a time like netem's default ``limit 1000``; the
kernel drops what comes beyond that.

It prints ``delaying queue N`` once bound, and on exit how many packets it released and
how late after their release times (its own scheduling delay). It exits with
:data:`EXIT_QUEUE_BUSY` if another listener holds queue N (the caller picks another
number). On SIGTERM or SIGINT
it accepts every packet it still holds at once and exits 0; it also exits when the
process that started it goes away, so a crashed test leaves no delayer behind (a
delayer's netlink socket would keep a deleted namespace alive). If it is killed, the
kernel drops the packets it held, and the rule's ``--queue-bypass`` lets later packets
through undelayed: a dead delayer never black-holes a link.

Uses the NetfilterQueue package (libnetfilter_queue) with verdicts given after its
callback returned, read without blocking from a ``select`` loop that also waits for the
next release time (``select`` for its microsecond timeout: ``poll`` rounds up to whole
milliseconds, which made packets 0.5 ms late on average)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

#: The kernel holds at most this many packets for us (netem's default limit).
MAX_QUEUED = 1000
#: Exit status when the queue number is taken by another listener.
EXIT_QUEUE_BUSY = 3
#: Exit status when the NetfilterQueue package is not installed.
EXIT_NO_LIBRARY = 4
#: How often (s) an idle delayer checks that the process that started it is alive.
_PARENT_CHECK_S = 1.0


class _Packet(Protocol):
    def accept(self) -> None: ...


class Delays:
    """Release times for packets, in arrival order, never earlier than the previous
    packet's (see the module's docstring)."""

    def __init__(self, delay_ms: float, jitter_ms: float, seed: int | None) -> None:
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        self.low_s = max(0.0, delay_ms - jitter_ms) / 1000
        self.high_s = (delay_ms + jitter_ms) / 1000
        self._rng = random.Random(seed)
        self._last = -math.inf

    def release_at(self, arrival: float) -> float:
        release = max(arrival + self._rng.uniform(self.low_s, self.high_s), self._last)
        self._last = release
        return release


class Holder:
    """Packets held until their release time, oldest first."""

    def __init__(self, delays: Delays, clock: Callable[[], float] = time.monotonic) -> None:
        self.delays = delays
        self.clock = clock
        self._held: deque[tuple[float, _Packet]] = deque()
        #: Packets taken and released so far.
        self.taken = 0
        self.released = 0
        #: How late (s) the last packets were released, for the exit summary.
        self.lateness: deque[float] = deque(maxlen=100_000)

    def take(self, packet: _Packet) -> None:
        self._held.append((self.delays.release_at(self.clock()), packet))
        self.taken += 1

    def release_due(self) -> float | None:
        """Accepts every packet whose time has come; returns the seconds until the next
        one is due (None: nothing held)."""
        now = self.clock()
        while self._held and self._held[0][0] <= now:
            due, packet = self._held.popleft()
            packet.accept()
            self.released += 1
            self.lateness.append(now - due)
        return self._held[0][0] - now if self._held else None

    def release_all(self) -> None:
        while self._held:
            self._held.popleft()[1].accept()
            self.released += 1

    def summary(self) -> str:
        late = sorted(self.lateness)
        if not late:
            return f"released {self.released} packets"
        p50, p99 = (late[min(len(late) - 1, int(q * len(late)))] * 1000 for q in (0.5, 0.99))
        return (
            f"released {self.released} packets, late by median {p50:.3f} ms, "
            f"p99 {p99:.3f} ms, max {late[-1] * 1000:.3f} ms"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accord.tools.topology._delayer")
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--parent",
        type=int,
        default=None,
        help="exit when this process is no longer our parent (default: our parent now)",
    )
    args = parser.parse_args(argv)
    try:
        delays = Delays(args.delay_ms, args.jitter_ms, args.seed)
    except ValueError as e:
        parser.error(str(e))

    # Imported here: the module's docstring and Delays stay usable (tests, --help)
    # where the C extension is not built.
    try:
        import netfilterqueue
    except ImportError as e:
        print(
            f"delayer: {e}: link latency without netem needs the NetfilterQueue package "
            "(pip install 'accord[netlab]'; it builds against libnetfilter-queue-dev)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_NO_LIBRARY

    # Release times are only as good as our wake-ups: on a loaded machine an ordinary
    # process wakes tens of ms late (measured: p99 56 ms at load 13 on 2 cores), so take
    # the lowest real-time priority where allowed. It does little work per packet
    # (about 40 us), and the kernel's real-time throttling bounds it regardless.
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))

    # Given explicitly, a parent that died before we got here is noticed too.
    parent = args.parent if args.parent is not None else os.getppid()
    holder = Holder(delays)
    nfq = netfilterqueue.NetfilterQueue()
    try:
        nfq.bind(args.queue, holder.take, max_len=MAX_QUEUED, mode=netfilterqueue.COPY_META)
    except OSError as e:
        print(f"delayer: queue {args.queue} busy: {e}", file=sys.stderr, flush=True)
        return EXIT_QUEUE_BUSY

    # A signal only wakes select() through this pipe (the handler itself must not raise
    # inside the library's callback machinery).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    queue_fd = nfq.get_fd()
    print(f"delaying queue {args.queue}", flush=True)
    try:
        next_in: float | None = None
        checked = time.monotonic()
        while not stopping:
            wait_s = _PARENT_CHECK_S if next_in is None else min(next_in, _PARENT_CHECK_S)
            readable, _, _ = select.select([queue_fd, wake_r], [], [], wait_s)
            if wake_r in readable:
                os.read(wake_r, 512)
            if queue_fd in readable:
                nfq.run(block=False)
            next_in = holder.release_due()
            now = time.monotonic()
            if now - checked >= _PARENT_CHECK_S:
                checked = now
                if os.getppid() != parent:
                    break
    finally:
        holder.release_all()
        nfq.unbind()
    print(f"delayer: {holder.summary()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
