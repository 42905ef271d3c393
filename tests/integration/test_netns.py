"""NetLab against the real kernel: hosts in their own network namespaces reach each other
over the lab's bridge (and the test over its root link), partitions and isolation cut
exactly what they say and heal, and a lab removes everything it made, a stale one too."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accord.client import AccordClient, Branch
from accord.common.transport import TransportSettings, configured
from accord.tools.topology import (
    ManagedProcess,
    NetLab,
    Topology,
    balances,
    cleanup_stale_labs,
    etcd_url,
    netns_available,
    open_accounts,
)

_REASON = netns_available()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"netns unavailable: {_REASON}")

# A TCP server printing "listening on HOST:PORT" that answers every connection "ok".
_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen(16)
print("listening on %s:7000" % sys.argv[1], flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"ok"); c.close()
"""
# Exits 0 when HOST:7000 answers within the timeout, 1 otherwise.
_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2])) as c:
        sys.exit(0 if c.recv(2) == b"ok" else 1)
except OSError:
    sys.exit(1)
"""


def _reaches(argv_prefix: list[str], target: str, timeout_s: float = 1.0) -> bool:
    done = subprocess.run(
        [*argv_prefix, sys.executable, "-c", _CLIENT, target, str(timeout_s)],
        timeout=30,
        capture_output=True,
    )
    return done.returncode == 0


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_hosts_reach_each_other_by_name_and_address_and_faults_heal(tmp_path: Path) -> None:
    with NetLab() as lab:
        a, b, c = lab.host("a"), lab.host("b"), lab.host("c")
        assert lab.host("a") is a  # idempotent per name
        assert len({a.ip, b.ip, c.ip}) == 3
        assert all(ipaddress.ip_address(h.ip) in lab.network for h in (a, b, c))
        server = ManagedProcess("srv", b.argv([sys.executable, "-c", _SERVER, b.ip]))
        try:
            server.start(20)
            # `ip netns exec` execs: the PID we hold is the server's own, in b's namespace.
            assert os.readlink(f"/proc/{server.pid}/ns/net") != os.readlink("/proc/self/ns/net")
            assert server.address == b.addr(7000)
            assert _reaches(a.argv([]), "b")  # the hosts file names every host
            assert _reaches(c.argv([]), b.ip)
            assert _reaches([], b.ip)  # the test, over the root link

            both = lab.partition("a", "b")
            assert not _reaches(a.argv([]), b.ip)
            assert _reaches(c.argv([]), b.ip)  # only a and b are cut
            both.heal()
            both.heal()  # idempotent
            assert _reaches(a.argv([]), b.ip)

            # a -> b dropped, b -> a not: a's connection attempts vanish at b.
            one = lab.partition("a", "b", one_way=True)
            assert one.kind == "partition-one-way"
            assert not _reaches(a.argv([]), b.ip)
            one.heal()
            assert _reaches(a.argv([]), b.ip)

            cut = lab.isolate("b")
            assert not _reaches(a.argv([]), b.ip)
            assert not _reaches([], b.ip)
            cut.heal()
            assert _reaches(a.argv([]), b.ip)

            # A fault left unhealed is healed by close (below) with everything else.
            lab.partition("c", "b")
        finally:
            server.stop()
        names = {h.ns for h in lab.hosts.values()} | {lab.bridge_ns}
        assert names <= _namespaces()
    assert not names & _namespaces()
    assert not any((Path("/etc/netns") / ns).exists() for ns in names)
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert f"{lab.prefix}r" not in links


def test_two_labs_get_different_subnets_and_close_is_safe_twice() -> None:
    with NetLab() as one, NetLab() as two:
        assert one.subnet != two.subnet
        assert one.host("x").ip != two.host("x").ip
    one.close()


def test_a_stale_lab_of_a_killed_owner_is_removed_by_the_next_one() -> None:
    # A child process makes a lab with a server running in it, then is SIGKILLed.
    script = (
        "import os, signal, subprocess, sys\n"
        "from accord.tools.topology import NetLab\n"
        "lab = NetLab()\n"
        "h = lab.host('h')\n"
        "p = subprocess.Popen(h.argv(['sleep', '300']), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(lab.prefix, p.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    prefix, pid = done.stdout.split()
    assert f"{prefix}-h" in _namespaces()
    assert prefix in cleanup_stale_labs()
    assert f"{prefix}-h" not in _namespaces() and f"{prefix}-br" not in _namespaces()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    state = (
        Path(f"/proc/{pid}/stat").read_text().split()[2]
        if Path(f"/proc/{pid}").exists()
        else "gone"
    )
    assert state in ("gone", "Z")  # killed with its namespace (a zombie until reaped)
    with NetLab() as lab:  # and the next lab works
        assert lab.host("h").ip


async def _transfer(etcd: str, key: str) -> str:
    async with await AccordClient.from_etcd(etcd, shard="s1", timeout_s=30) as client:
        result = await client.execute(
            [
                Branch(service="bank-a", operation="debit", payload={"account": "a", "amount": 1}),
                Branch(service="bank-b", operation="credit", payload={"account": "b", "amount": 1}),
            ],
            idempotency_key=key,
        )
        return result.state


async def test_each_process_on_its_own_host_with_a_three_member_etcd(tmp_path: Path) -> None:
    """etcd members, a coordinator and two banks each in its own namespace: a transfer
    goes through; with one etcd member killed, then one cut off, transfers still do;
    a coordinator cut off from a bank cannot finish one until the partition heals."""
    # The lab's addresses are not loopback: plain text there only when told.
    with NetLab() as lab, Topology(tmp_path) as topo, configured(TransportSettings(insecure=True)):
        hosts = [lab.host(f"etcd-{i}") for i in (1, 2, 3)]
        members = topo.etcd_cluster(hosts=hosts)
        assert [m.address for m in members] == [h.addr(2379) for h in hosts]
        url = etcd_url(members)
        banks = {
            name: topo.bank(
                name, host=lab.host(name), etcd=url, instance_id=name, ttl_s=2,
                accounts=1, initial_balance=100,
            )
            for name in ("bank-a", "bank-b")
        }  # fmt: skip
        # The seeded accounts are "<service>-0"; these two are opened by name.
        await open_accounts(banks["bank-a"].address, {"a": 100})
        await open_accounts(banks["bank-b"].address, {"b": 0})
        coordinator = topo.coordinator(
            host=lab.host("coord"), etcd=url, cid="c1", shard="s1", ttl_s=2
        )
        assert coordinator.address.startswith(lab.hosts["coord"].ip + ":")
        assert banks["bank-a"].address.startswith(lab.hosts["bank-a"].ip + ":")
        assert await _transfer(url, "t1") == "COMMITTED"

        members[0].kill()
        assert await _transfer(url, "t2") == "COMMITTED"
        members[0].start(60)
        cut = lab.isolate("etcd-2")
        assert await _transfer(url, "t3") == "COMMITTED"
        cut.heal()

        part = lab.partition("coord", "bank-b")
        pending = asyncio.ensure_future(_transfer(url, "t4"))
        done, _ = await asyncio.wait({pending}, timeout=3)
        assert not done  # bank-b does not answer across the partition
        part.heal()
        assert await asyncio.wait_for(pending, 60) == "COMMITTED"
        b = await balances(banks["bank-b"].address)
        assert {a.id: a.balance for a in b.accounts}["b"] == 4


def test_a_three_member_etcd_on_loopback(tmp_path: Path) -> None:
    with Topology(tmp_path) as topo:
        members = topo.etcd_cluster()
        assert len({m.client_port for m in members}) == 3
        assert all(m.address.startswith("127.0.0.1:") for m in members)
        members[1].kill()
        members[1].start(60)  # rejoins from its data directory
