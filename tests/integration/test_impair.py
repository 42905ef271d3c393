"""Link impairment (accord.tools.topology._impair) on a real link: two network namespaces
joined by a veth pair, made here and removed in teardown, an echo server in one and a
probe in the other; the impairment is on the probe side's egress, so every round trip
crosses it once.

On this project's machines the kernel has no netem, so these exercise the iptables +
NFQUEUE delayer path; where netem exists they exercise netem through the same API."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import pytest

from accord.tools.topology import NetLab, netns_available
from accord.tools.topology._impair import Impairment, LinkImpairment, delayer_argv, impair

pytestmark = pytest.mark.integration

_A_IP, _B_IP, _B_IP2 = "10.77.0.1", "10.77.0.2", "10.77.0.3"
_UDP_PORT, _TCP_PORT = 7000, 7001

# UDP echo on every address of the namespace, and a TCP echo (one connection at a time).
_SERVER = f"""
import socket, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", {_UDP_PORT}))
def udp():
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", {_TCP_PORT}))
t.listen()
print("ready", flush=True)
while True:
    c, _ = t.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while (data := c.recv(2048)):
            c.sendall(data)
"""

# argv: mode host port count; prints JSON. tcp: round trips (ms) of request/response on one
# connection. udp-rtt: round trips (ms) of datagrams one at a time (None: lost).
# udp-burst: datagrams sent 1 ms apart, how many were echoed.
_PROBE = """
import json, socket, sys, time
mode, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = []
if mode == "tcp":
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(count):
        t0 = time.monotonic()
        s.sendall(b"x" * 64)
        got = 0
        while got < 64:
            got += len(s.recv(2048))
        out.append((time.monotonic() - t0) * 1000)
elif mode == "udp-rtt":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    for i in range(count):
        t0 = time.monotonic()
        s.sendto(str(i).encode(), (host, port))
        try:
            while s.recvfrom(64)[0] != str(i).encode():
                pass
            out.append((time.monotonic() - t0) * 1000)
        except socket.timeout:
            out.append(None)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    seen = set()
    for i in range(count):
        s.sendto(str(i).encode(), (host, port))
        time.sleep(0.001)
        try:  # drain as we go: a full receive buffer would lose echoes
            while True:
                seen.add(s.recvfrom(64)[0])
        except BlockingIOError:
            pass
    s.settimeout(0.5)
    try:
        while len(seen) < count:
            seen.add(s.recvfrom(64)[0])
    except socket.timeout:
        pass
    out = len(seen)
print(json.dumps(out))
"""


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (make iptables)"
    return None


@dataclass
class Link:
    a: str  # the probe's namespace (impaired side)
    b: str  # the echo server's namespace
    dev: str  # the veth end in a

    def probe(self, mode: str, count: int, host: str = _B_IP) -> object:
        return _probe(self.a, mode, count, host)

    def rules(self) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.a, "iptables-save"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def _probe(ns: str, mode: str, count: int, host: str) -> object:
    port = _TCP_PORT if mode == "tcp" else _UDP_PORT
    argv = [sys.executable, "-c", _PROBE, mode, host, str(port), str(count)]
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def _echo_server(ns: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    return server


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def link() -> Iterator[Link]:
    reason = _netns_missing()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    a, b, dev = f"imp{tag}-a", f"imp{tag}-b", f"imp{tag}a"
    server: subprocess.Popen[str] | None = None
    _ip("netns", "add", a)
    try:
        _ip("netns", "add", b)
        _ip("link", "add", dev, "netns", a, "type", "veth", "peer", "name", "eth0", "netns", b)
        _ip("-n", a, "addr", "add", f"{_A_IP}/24", "dev", dev)
        _ip("-n", b, "addr", "add", f"{_B_IP}/24", "dev", "eth0")
        _ip("-n", b, "addr", "add", f"{_B_IP2}/24", "dev", "eth0")
        for ns, d in ((a, dev), (b, "eth0")):
            _ip("-n", ns, "link", "set", d, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        server = _echo_server(b)
        yield Link(a, b, dev)
    finally:
        if server is not None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(10)
        for ns in (a, b):  # deleting a namespace deletes its veth end, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def healing() -> Iterator[list[Impairment]]:
    """Impairments a test made, healed in teardown (each heal is idempotent)."""
    made: list[Impairment] = []
    yield made
    for imp in made:
        imp.heal()


def _ours(rules: str) -> list[str]:
    return [line for line in rules.splitlines() if "ACCORD-IMPAIR" in line or "NFQUEUE" in line]


def test_delay_holds_every_round_trip(link: Link, healing: list[Impairment]) -> None:
    imp = impair(link.a, link.dev, delay_ms=50, seed=1)
    healing.append(imp)
    assert imp.kind == "impair"
    assert imp.mechanism in ("netem", "iptables+nfqueue")
    rtts = link.probe("tcp", 10)
    assert isinstance(rtts, list)
    # Each request crosses the impaired egress once (the 1 ms is timer rounding).
    assert min(rtts) >= 49, rtts


def test_jitter_spreads_delays_within_bounds(link: Link, healing: list[Impairment]) -> None:
    delay, jitter = 40, 20
    healing.append(impair(link.a, link.dev, delay_ms=delay, jitter_ms=jitter, seed=7))
    rtts = link.probe("udp-rtt", 40)
    assert isinstance(rtts, list) and None not in rtts, rtts
    rtts.sort()
    assert rtts[0] >= delay - jitter - 1, rtts
    # Uniform over 40 ms: the middle 80 % of 40 draws spans far more than 10 ms.
    assert rtts[int(len(rtts) * 0.9)] - rtts[int(len(rtts) * 0.1)] >= jitter / 2, rtts
    # The delays are at most delay + jitter; the slack is the unloaded link's own time.
    assert median(rtts) <= delay + jitter + 10, rtts


def test_loss_drops_about_its_share(link: Link, healing: list[Impairment]) -> None:
    healing.append(impair(link.a, link.dev, loss_pct=30, seed=3))
    sent = 1000
    echoed = link.probe("udp-burst", sent)
    assert isinstance(echoed, int)
    # 30 % of 1000: sd 14.5; the bounds are seven of them either side.
    assert 0.2 <= 1 - echoed / sent <= 0.4, echoed


def test_peer_only_impairs_that_address(link: Link, healing: list[Impairment]) -> None:
    healing.append(impair(link.a, link.dev, loss_pct=100, peer_ip=_B_IP))
    assert link.probe("udp-burst", 50, host=_B_IP) == 0
    assert link.probe("udp-burst", 50, host=_B_IP2) == 50


def test_heal_restores_the_link_and_leaves_no_rules(link: Link) -> None:
    imp = impair(link.a, link.dev, delay_ms=30, jitter_ms=10, loss_pct=50, seed=5)
    try:
        if imp.mechanism != "netem":
            assert len(_ours(link.rules())) == 4, link.rules()  # chain, jump, loss, queue
    finally:
        imp.heal()
    imp.heal()  # idempotent
    assert _ours(link.rules()) == []
    if imp.delayer is not None:
        assert not imp.delayer.alive()
        assert imp.delayer.returncode == 0, imp.delayer.output()
    assert link.probe("udp-burst", 200) == 200
    rtts = link.probe("tcp", 5)
    assert isinstance(rtts, list) and len(rtts) == 5


def test_a_killed_delayer_does_not_cut_the_link(link: Link, healing: list[Impairment]) -> None:
    imp = impair(link.a, link.dev, delay_ms=50, seed=2)
    healing.append(imp)
    if imp.delayer is None:
        pytest.skip("netem here: no delayer process to kill")
    assert link.probe("udp-rtt", 3) != [None] * 3
    os.kill(imp.delayer.pid, signal.SIGKILL)
    imp.delayer.wait(10)
    # --queue-bypass: with no listener the queue rule lets packets through undelayed.
    rtts = link.probe("udp-rtt", 20)
    assert isinstance(rtts, list) and None not in rtts, rtts
    assert link.probe("tcp", 3) is not None
    imp.heal()
    assert _ours(link.rules()) == []


def test_delayer_exits_when_its_parent_goes(link: Link, tmp_path: Path) -> None:
    """A crashed harness leaves no delayer holding the namespace (bounded wait)."""
    delayer = delayer_argv(4242, LinkImpairment(delay_ms=20))[:-2]  # its own --parent
    # The shell is the delayer's parent and exits at once (maybe before the delayer
    # starts: --parent $$ covers that).
    done = subprocess.run(
        ["sh", "-c", f"ip netns exec {link.a} {shlex.join(delayer)} --parent $$ "
         f">{tmp_path}/out 2>&1 & echo $!"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    pid = int(done.stdout)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid), "the orphaned delayer is still running"
    # It ran, and left through its exit path (packets released, queue unbound).
    out = (tmp_path / "out").read_text()
    assert "delaying queue 4242" in out and "delayer: released" in out, out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _delayers_in(ns: str) -> list[int]:
    pids = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            if "_delayer.py" in Path(f"/proc/{pid}/cmdline").read_text():
                found.append(int(pid))
    return found


def test_through_a_netlab() -> None:
    """NetLab.impair is this impair on the host's eth0; closing the lab without healing
    stops the delayer."""
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"netns unavailable: {reason}")
    with NetLab() as lab:
        a, b, c = lab.host("a"), lab.host("b"), lab.host("c")
        servers = [_echo_server(b.ns), _echo_server(c.ns)]
        delayers: list[int] = []
        try:
            fault = lab.impair("a", delay_ms=40, loss_pct=100, peer="c")
            assert fault.kind == "impair"
            assert _probe(a.ns, "udp-burst", 50, b.ip) == 50  # only a -> c is impaired
            assert _probe(a.ns, "udp-burst", 50, c.ip) == 0
            fault.heal()
            assert _probe(a.ns, "udp-burst", 50, c.ip) == 50
            lab.impair("a", delay_ms=40, peer="b")
            rtts = _probe(a.ns, "tcp", 5, b.ip)
            assert isinstance(rtts, list) and min(rtts) >= 39, rtts
            delayers = _delayers_in(a.ns)
            assert len(delayers) == 1
        finally:
            for server in servers:
                os.kill(server.pid, signal.SIGKILL)
                server.wait(10)
    # Closed without healing: the lab healed it, and the delayer is gone.
    assert delayers and not any(_running(pid) for pid in delayers)
