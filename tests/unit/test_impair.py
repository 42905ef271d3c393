"""Link impairment without a kernel: the rules and command lines it builds, and the
delayer's release schedule (tests/integration/test_impair.py runs them for real)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from accord.tools.topology._delayer import Delays, Holder
from accord.tools.topology._impair import (
    HOLE_QUEUE,
    LinkImpairment,
    chain_rules,
    delayer_argv,
    jump_rule,
    netem_commands,
)


def _w(words: str) -> list[str]:
    return words.split()


def test_netem_on_the_whole_device() -> None:
    spec = LinkImpairment(delay_ms=50, jitter_ms=20, loss_pct=5)
    assert netem_commands("eth0", spec) == [
        _w("tc qdisc add dev eth0 root handle 1: netem delay 50ms 20ms loss 5%")
    ]
    assert netem_commands("eth0", LinkImpairment(loss_pct=0.5)) == [
        _w("tc qdisc add dev eth0 root handle 1: netem loss 0.5%")
    ]


def test_netem_for_one_peer_goes_through_a_prio_band() -> None:
    spec = LinkImpairment(delay_ms=12.5, peer_ip="10.0.0.2")
    assert netem_commands("eth0", spec) == [
        _w("tc qdisc add dev eth0 root handle 1: prio"),
        _w("tc qdisc add dev eth0 parent 1:3 handle 30: netem delay 12.5ms"),
        _w(
            "tc filter add dev eth0 parent 1:0 protocol ip prio 1 u32 match ip dst "
            "10.0.0.2/32 flowid 1:3"
        ),
    ]


def test_iptables_chain_drops_first_then_queues() -> None:
    spec = LinkImpairment(delay_ms=50, jitter_ms=20, loss_pct=5)
    assert chain_rules("C", spec, 4321) == [
        _w(f"C -m statistic --mode random --probability 0.05 -j NFQUEUE --queue-num {HOLE_QUEUE}"),
        _w("C -j NFQUEUE --queue-num 4321 --queue-bypass"),
    ]


def test_iptables_loss_only_needs_no_delayer_queue() -> None:
    rules = chain_rules("C", LinkImpairment(loss_pct=33.3), None)
    assert len(rules) == 1
    assert rules[0][rules[0].index("--probability") + 1] == "0.333"
    # Lost packets go to a queue nobody listens on, without bypass: dropped silently.
    assert "--queue-bypass" not in rules[0]


def test_jump_rule_selects_the_device_and_peer() -> None:
    assert jump_rule("C", "eth0", LinkImpairment(loss_pct=1)) == (_w("POSTROUTING -o eth0 -j C"))
    assert jump_rule("C", "eth0", LinkImpairment(loss_pct=1, peer_ip="10.0.0.9")) == (
        _w("POSTROUTING -o eth0 -d 10.0.0.9 -j C")
    )


def test_delayer_argv() -> None:
    argv = delayer_argv(77, LinkImpairment(delay_ms=50, jitter_ms=20, seed=9))
    assert argv[1].endswith("tools/topology/_delayer.py")
    assert argv[2:] == _w(
        f"--queue 77 --delay-ms 50 --jitter-ms 20 --seed 9 --parent {os.getpid()}"
    )
    assert "--seed" not in delayer_argv(77, LinkImpairment(delay_ms=1))


@pytest.mark.parametrize(
    "kw",
    [
        {"delay_ms": -1},
        {"delay_ms": 5, "jitter_ms": -1},
        {"loss_pct": 101},
        {"loss_pct": -0.1},
        {"jitter_ms": 5},
    ],
)
def test_bad_values_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LinkImpairment(**kw)


def test_describe() -> None:
    spec = LinkImpairment(delay_ms=50, jitter_ms=20, loss_pct=5, peer_ip="10.0.0.2")
    assert spec.describe() == "50 ± 20 ms, 5 % loss to 10.0.0.2"


def test_delays_stay_within_bounds_and_in_order() -> None:
    delays = Delays(50, 20, seed=1)
    arrivals = [i * 0.0005 for i in range(2000)]  # 2000 packets/s: they crowd
    releases = [delays.release_at(t) for t in arrivals]
    held = [r - t for r, t in zip(releases, arrivals, strict=True)]
    assert releases == sorted(releases)  # never reordered
    assert min(held) >= 0.030 - 1e-9 and max(held) <= 0.070 + 1e-9


def test_sparse_delays_spread_over_the_whole_range() -> None:
    delays = Delays(50, 20, seed=1)
    held = [delays.release_at(t) - t for t in range(500)]  # 1 s apart: no crowding
    assert min(held) < 0.032 and max(held) > 0.068
    assert 0.047 < sorted(held)[250] < 0.053


def test_delays_are_repeatable_by_seed() -> None:
    def draw(seed: int) -> list[float]:
        d = Delays(50, 20, seed=seed)
        return [d.release_at(t) for t in range(20)]

    assert draw(4) == draw(4)
    assert draw(4) != draw(5)


class _Packet:
    def __init__(self, log: list[int], n: int) -> None:
        self.log, self.n = log, n

    def accept(self) -> None:
        self.log.append(self.n)


def test_holder_releases_each_packet_at_its_time() -> None:
    now = [0.0]
    holder = Holder(Delays(10, 0, seed=None), clock=lambda: now[0])
    accepted: list[int] = []
    holder.take(_Packet(accepted, 1))
    now[0] = 0.004
    holder.take(_Packet(accepted, 2))
    now[0] = 0.009
    assert holder.release_due() == pytest.approx(0.001)
    assert accepted == []
    now[0] = 0.010
    assert holder.release_due() == pytest.approx(0.004)
    assert accepted == [1]
    holder.take(_Packet(accepted, 3))
    holder.release_all()  # on SIGTERM: everything held goes at once
    assert accepted == [1, 2, 3]
    assert holder.release_due() is None
    assert (holder.taken, holder.released) == (3, 3)


def test_holder_summary_reports_lateness() -> None:
    now = [0.0]
    holder = Holder(Delays(10, 0, seed=None), clock=lambda: now[0])
    assert holder.summary() == "released 0 packets"
    holder.take(_Packet([], 1))
    now[0] = 0.0125
    holder.release_due()
    assert holder.summary() == (
        "released 1 packets, late by median 2.500 ms, p99 2.500 ms, max 2.500 ms"
    )
