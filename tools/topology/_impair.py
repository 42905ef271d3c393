"""Latency and loss on a link: :func:`impair` adds a delay (± jitter) and random loss to
the packets leaving a device inside a network namespace (only those to one peer address
when asked), and the :class:`Impairment` it returns undoes it (:meth:`Impairment.heal`).

Two mechanisms, chosen by trying the first:

- ``netem`` where the kernel has it (``tc qdisc ... netem delay D J loss L``; with a
  peer, a ``prio`` root qdisc whose third band holds the netem and a ``u32`` filter that
  sends the peer's packets there);
- otherwise iptables in the namespace: a chain of our own in the ``mangle`` table,
  jumped to from ``POSTROUTING`` for packets out of the device (to the peer), so it sees
  both locally sent and forwarded packets after every filter rule (a partition's DROP
  wins). In it, loss is ``-m statistic --mode random --probability p`` sending packets
  to an NFQUEUE nobody listens on (:data:`HOLE_QUEUE`, no bypass), which the kernel
  drops silently as a lossy link would: a ``-j DROP`` on egress makes the sender's own
  ``send()`` fail with EPERM, which no real loss does. The kernel draws the random
  numbers: the seed does not make the loss repeatable. Latency is
  ``-j NFQUEUE --queue-num N --queue-bypass`` with a delayer process
  (:mod:`accord.tools.topology._delayer`) inside the namespace that holds each packet
  for its delay and then accepts it. ``--queue-bypass`` is the fail-safe: while no
  process listens on the queue (the delayer died or is being stopped), packets pass
  undelayed instead of being dropped.

Heal removes exactly the rules (or qdisc) it added and stops the delayer (SIGTERM: it
releases the packets it holds at once), and is idempotent; a namespace already deleted
has no rules left to remove. Only IPv4 is impaired on the iptables path.

Needs root, ``ip`` (iproute2), ``iptables`` and, for latency without netem, the
NetfilterQueue package (the ``netlab`` extra, built against Debian's
libnetfilter-queue-dev: ``make nfqueue``)."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from accord.tools.topology import _delayer
from accord.tools.topology._delayer import EXIT_QUEUE_BUSY
from accord.tools.topology._process import ManagedProcess, ProcessFailed

#: Lost packets go to this queue, which no process ever listens on.
HOLE_QUEUE = 65535
#: Delayer queue numbers are drawn from here; a number another listener holds is drawn
#: again.
_QUEUE_RANGE = (1024, HOLE_QUEUE - 1)
_QUEUE_TRIES = 8
_CHAIN_PREFIX = "ACCORD-IMPAIR-"


class ImpairError(RuntimeError):
    pass


@dataclass(frozen=True, kw_only=True)
class LinkImpairment:
    """What to do to a link's egress: validated values, all in ms and %."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    peer_ip: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("impair: delay and jitter must be >= 0")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError("impair: loss must be within [0, 100] %")
        if self.jitter_ms and not self.delay_ms:
            raise ValueError("impair: jitter needs a delay")

    @property
    def delays(self) -> bool:
        return self.delay_ms > 0

    def describe(self) -> str:
        parts = []
        if self.delays:
            jitter = f" ± {self.jitter_ms:g}" if self.jitter_ms else ""
            parts.append(f"{self.delay_ms:g}{jitter} ms")
        if self.loss_pct:
            parts.append(f"{self.loss_pct:g} % loss")
        what = ", ".join(parts) or "nothing"
        return what + (f" to {self.peer_ip}" if self.peer_ip else "")


def netem_commands(dev: str, spec: LinkImpairment) -> list[list[str]]:
    """The ``tc`` command lines (to run inside the namespace) that add the netem."""
    netem = ["netem"]
    if spec.delays:
        netem += ["delay", f"{spec.delay_ms:g}ms"]
        if spec.jitter_ms:
            netem.append(f"{spec.jitter_ms:g}ms")
    if spec.loss_pct:
        netem += ["loss", f"{spec.loss_pct:g}%"]
    if spec.peer_ip is None:
        return [["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", *netem]]
    # prio's priomap never picks band 3 by itself: only the filter sends packets there.
    return [
        ["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "prio"],
        ["tc", "qdisc", "add", "dev", dev, "parent", "1:3", "handle", "30:", *netem],
        [
            "tc", "filter", "add", "dev", dev, "parent", "1:0", "protocol", "ip",
            "prio", "1", "u32", "match", "ip", "dst", f"{spec.peer_ip}/32", "flowid", "1:3",
        ],
    ]  # fmt: skip


def netem_heal_command(dev: str) -> list[str]:
    return ["tc", "qdisc", "del", "dev", dev, "root"]


def jump_rule(chain: str, dev: str, spec: LinkImpairment) -> list[str]:
    """The ``mangle POSTROUTING`` rule (without the -A/-D) that sends the device's egress
    (to the peer) to our chain."""
    rule = ["POSTROUTING", "-o", dev]
    if spec.peer_ip is not None:
        rule += ["-d", spec.peer_ip]
    return [*rule, "-j", chain]


def chain_rules(chain: str, spec: LinkImpairment, queue: int | None) -> list[list[str]]:
    """Our chain's rules (without the -A), in order: loss first, then the queue."""
    rules = []
    if spec.loss_pct:
        probability = f"{spec.loss_pct / 100:.6g}"
        sample = ["-m", "statistic", "--mode", "random", "--probability", probability]
        rules.append([chain, *sample, "-j", "NFQUEUE", "--queue-num", str(HOLE_QUEUE)])
    if queue is not None:
        rules.append([chain, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"])
    return rules


def delayer_argv(queue: int, spec: LinkImpairment) -> list[str]:
    # By its path rather than ``-m accord.tools.topology._delayer``: it needs only the
    # standard library and NetfilterQueue, and importing the topology package first
    # (grpc and the rest) costs 0.4 s of CPU, seconds on a loaded machine.
    argv = [sys.executable, _delayer.__file__, "--queue", str(queue)]
    argv += ["--delay-ms", f"{spec.delay_ms:g}", "--jitter-ms", f"{spec.jitter_ms:g}"]
    if spec.seed is not None:
        argv += ["--seed", str(spec.seed)]
    # `ip netns exec` execs, so this process is the delayer's parent.
    return [*argv, "--parent", str(os.getpid())]


def _in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)


def _check(argv: Sequence[str]) -> None:
    done = _run(argv)
    if done.returncode != 0:
        raise ImpairError(f"impair: {' '.join(argv)}: {done.stderr.strip() or done.stdout}")


def _iptables(ns: str, *args: str) -> list[str]:
    return _in_ns(ns, ["iptables", "-w", "-t", "mangle", *args])


class Impairment:
    """One impaired link egress; :meth:`heal` undoes it (idempotent, thread-safe)."""

    #: As NetLab's faults name it.
    kind = "impair"

    def __init__(
        self,
        ns: str,
        dev: str,
        spec: LinkImpairment,
        *,
        mechanism: str,
        chain: str | None = None,
        delayer: ManagedProcess | None = None,
    ) -> None:
        self.ns = ns
        self.dev = dev
        self.spec = spec
        #: "netem", "iptables" (loss only), "iptables+nfqueue" or "none".
        self.mechanism = mechanism
        self.chain = chain
        self.delayer = delayer
        self.healed = False
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        how = self.mechanism
        if self.delayer is not None and self.delayer.proc is not None:
            how += f", delayer pid {self.delayer.pid}"
        return f"{self.spec.describe()} on {self.ns}/{self.dev} ({how})"

    def __repr__(self) -> str:
        return f"<Impairment {self.description}{' healed' if self.healed else ''}>"

    def heal(self) -> None:
        """Removes what :func:`impair` added and stops the delayer; every step is tried,
        the first error raised after."""
        with self._lock:
            if self.healed:
                return
            self.healed = True
        errors: list[str] = []
        ns_alive = Path("/run/netns", self.ns).exists()
        if ns_alive and self.mechanism == "netem":
            done = _run(_in_ns(self.ns, netem_heal_command(self.dev)))
            if done.returncode != 0:
                errors.append(done.stderr.strip())
        if ns_alive and self.chain is not None:
            # The jump first, so no packet enters the chain while it is emptied.
            for args in (
                ["-D", *jump_rule(self.chain, self.dev, self.spec)],
                ["-F", self.chain],
                ["-X", self.chain],
            ):
                done = _run(_iptables(self.ns, *args))
                if done.returncode != 0:
                    errors.append(f"iptables {' '.join(args)}: {done.stderr.strip()}")
        if self.delayer is not None:
            # After the rules: it releases what it still holds at once and exits.
            self.delayer.stop(grace_s=5)
        if errors:
            raise ImpairError(f"impair: heal of {self.description}: " + "; ".join(errors))


def impair(
    ns: str,
    dev: str,
    *,
    delay_ms: float = 0,
    jitter_ms: float = 0,
    loss_pct: float = 0,
    peer_ip: str | None = None,
    seed: int | None = None,
) -> Impairment:
    """Adds ``delay_ms`` ± ``jitter_ms`` (uniform, per packet) and ``loss_pct`` % random
    loss to the egress of ``dev`` in namespace ``ns`` (only packets to ``peer_ip`` when
    given): netem where the kernel has it, else iptables and a delayer process (see the
    module's docstring). ``seed`` seeds the delayer's jitter."""
    spec = LinkImpairment(
        delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct, peer_ip=peer_ip, seed=seed
    )
    if not spec.delays and not spec.loss_pct:
        return Impairment(ns, dev, spec, mechanism="none")
    if _try_netem(ns, dev, spec):
        return Impairment(ns, dev, spec, mechanism="netem")
    return _impair_iptables(ns, dev, spec)


def _try_netem(ns: str, dev: str, spec: LinkImpairment) -> bool:
    """Adds the netem qdisc; False (having added nothing) where the kernel has none."""
    commands = netem_commands(dev, spec)
    added_root = False
    for argv in commands:
        done = _run(_in_ns(ns, argv))
        if done.returncode == 0:
            added_root = added_root or "root" in argv
            continue
        if added_root:
            _run(_in_ns(ns, netem_heal_command(dev)))
        if "qdisc kind is unknown" in done.stderr:  # no netem (or no prio) here
            return False
        raise ImpairError(f"impair: {' '.join(argv)} in {ns}: {done.stderr.strip()}")
    return True


def _impair_iptables(ns: str, dev: str, spec: LinkImpairment) -> Impairment:
    delayer: ManagedProcess | None = None
    queue: int | None = None
    if spec.delays:
        delayer, queue = _start_delayer(ns, spec)
    chain = _CHAIN_PREFIX + secrets.token_hex(4).upper()
    impairment = Impairment(
        ns,
        dev,
        spec,
        mechanism="iptables+nfqueue" if delayer else "iptables",
        chain=chain,
        delayer=delayer,
    )
    try:
        _check(_iptables(ns, "-N", chain))
    except BaseException:
        impairment.chain = None  # nothing of ours in the table
        impairment.heal()
        raise
    try:
        for rule in chain_rules(chain, spec, queue):
            _check(_iptables(ns, "-A", *rule))
        # Last: the chain is complete before any packet is sent to it.
        _check(_iptables(ns, "-A", *jump_rule(chain, dev, spec)))
    except BaseException:
        # The jump rule may not exist yet: the error that matters is the one raised.
        with contextlib.suppress(ImpairError):
            impairment.heal()
        raise
    return impairment


def _start_delayer(ns: str, spec: LinkImpairment) -> tuple[ManagedProcess, int]:
    """A delayer bound to a free queue number in the namespace (queues are per
    namespace), ready before any rule sends it packets."""
    draw = random.Random()
    for _ in range(_QUEUE_TRIES):
        queue = draw.randint(*_QUEUE_RANGE)
        delayer = ManagedProcess(
            f"delayer-{ns}-q{queue}",
            _in_ns(ns, delayer_argv(queue, spec)),
            ready_prefix="delaying queue ",
        )
        try:
            delayer.start(timeout_s=15)
        except ProcessFailed:
            if delayer.returncode == EXIT_QUEUE_BUSY:
                continue
            raise
        return delayer, queue
    raise ImpairError(f"impair: no free NFQUEUE number in {ns} after {_QUEUE_TRIES} tries")
