"""Registrations against a three-member etcd cluster whose members are cut off and killed
(each member in its own network namespace): once the disturbance ends, every key is back
in etcd on the lease its registration holds, within a bounded time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from accord.common.transport import TransportSettings, configured
from accord.registry import Etcd, Registration, service_key, service_value
from accord.tools.topology import NetLab, Topology, etcd_url, netns_available
from tests.integration._util import assert_eventually

_REASON = netns_available()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"netns unavailable: {_REASON}"),
]

N_REGISTRATIONS = 8
TTL_S = 2
#: After the disturbance ends: a lease's TTL, a renewal interval, and the request
#: timeouts of the round that notices, with room for a loaded machine.
RECOVERY_S = 15.0


async def _present(url: str, regs: list[Registration]) -> dict[str, int]:
    """key → lease for each registration's key in etcd now (0: on another lease than the
    one its registration holds; missing: absent)."""
    async with Etcd(url) as etcd:
        kv = etcd.client.kv
        assert kv is not None
        found: dict[str, int] = {}
        for reg in regs:
            resp = await kv.get(reg.key, timeout=5, max_attempts=3)
            for item in resp.kvs:
                found[reg.key] = int(item.lease) if int(item.lease) == reg.lease_id else 0
        return found


async def test_every_key_comes_back_after_a_member_is_cut_off_then_killed(
    tmp_path: Path,
) -> None:
    with NetLab() as lab, Topology(tmp_path) as topo, configured(TransportSettings(insecure=True)):
        hosts = [lab.host(f"etcd-{i}") for i in (1, 2, 3)]
        members = topo.etcd_cluster(hosts=hosts)
        url = etcd_url(members)
        # One client per registration, as each participant process has its own.
        clients = [Etcd(url) for _ in range(N_REGISTRATIONS)]
        regs = [
            Registration(
                etcd,
                service_key("bank", f"b{i}"),
                service_value(f"10.0.0.{i}:7000"),
                ttl_s=TTL_S,
                start_timeout_s=30,
            )
            for i, etcd in enumerate(clients)
        ]
        try:
            for etcd in clients:
                await etcd.connect()
            await asyncio.gather(*(r.start() for r in regs))
            assert all(r.registered for r in regs)
            assert len(await _present(url, regs)) == N_REGISTRATIONS

            # Cut a member off for a few TTLs: a third of every client's requests go to
            # it and hang until their deadline, so leases lapse and registrations are
            # redone while requests keep timing out. Then kill it and reconnect its link.
            cut = lab.isolate("etcd-2")
            await asyncio.sleep(5 * TTL_S)
            members[1].kill()
            cut.heal()

            try:
                await assert_eventually(
                    lambda: _present(url, regs),
                    lambda found: len(found) == N_REGISTRATIONS and all(found.values()),
                    timeout_s=RECOVERY_S,
                    what="every key in etcd on its registration's lease",
                )
            except AssertionError as e:
                states = {r.key: (r.registered, f"{r.lease_id:x}") for r in regs}
                raise AssertionError(f"{e}; registrations (registered, lease): {states}") from None
            assert all(r.registered for r in regs)
        finally:
            for reg in regs:
                await reg.close()
            for etcd in clients:
                await etcd.close()
