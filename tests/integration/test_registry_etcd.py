"""The etcd registry with a real etcd and real processes: registration and leases,
re-registration after etcd restarts, the coordinator's watched cache, balancing and
failover across instances of one service, and an etcd outage during a workload."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import socket
import time
from collections import Counter

import pytest
from etcd3aio import prefix_range_end

from accord.client import AccordClient, Branch, TxnResult
from accord.client._errors import AccordClientError, UnavailableError
from accord.registry import (
    COORDINATORS,
    SERVICES,
    Etcd,
    EtcdRegistry,
    Registration,
    service_key,
    service_value,
)
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

pytestmark = pytest.mark.integration

TERMINAL = {"COMMITTED", "ABORTED"}


async def keys(url: str, prefix: str) -> dict[str, dict[str, object]]:
    """What etcd holds under prefix right now (a fresh client: nothing cached)."""
    async with Etcd(url) as etcd:
        kv = etcd.client.kv
        assert kv is not None
        resp = await kv.get(prefix, prefix_range_end(prefix), timeout=5)
        return {k.key.decode(): json.loads(k.value) for k in resp.kvs}


async def test_participant_registers_with_a_lease_and_deregisters_on_shutdown(
    cluster: Cluster,
) -> None:
    etcd = cluster.etcd()
    bank = cluster.bank("bank-1", service="bank", etcd=etcd.url, ttl_s=3)
    key = service_key("bank", "bank-1")
    found = await keys(etcd.url, SERVICES)
    assert found[key]["address"] == bank.address
    operations = found[key]["operations"]
    assert isinstance(operations, list) and {"debit", "credit", "balance"} <= set(operations)

    async with Etcd(etcd.url) as client:
        kv, lease = client.client.kv, client.client.lease
        assert kv is not None and lease is not None
        lease_id = (await kv.get(key, timeout=5)).kvs[0].lease
        assert lease_id != 0, "the key must be leased"
        ttl = await lease.time_to_live(lease_id, timeout=5)
        assert 0 < ttl.grantedTTL <= 3

    t0 = time.monotonic()
    assert bank.stop() == 0
    # Revoked on the way out, not left to expire.
    assert key not in await keys(etcd.url, SERVICES)
    assert time.monotonic() - t0 < 3


async def test_key_expires_within_ttl_after_sigkill(cluster: Cluster) -> None:
    etcd = cluster.etcd()
    ttl = 2
    bank = cluster.bank("bank-1", service="bank", etcd=etcd.url, ttl_s=ttl)
    key = service_key("bank", "bank-1")
    assert key in await keys(etcd.url, SERVICES)
    bank.kill()
    killed = time.monotonic()
    await assert_eventually(
        lambda: keys(etcd.url, SERVICES),
        lambda k: key not in k,
        timeout_s=ttl + 3,
        what="the dead participant's key expires with its lease",
    )
    # etcd may round a lease up to its minimum TTL plus an election tick.
    assert time.monotonic() - killed <= ttl + 2.5


async def test_reregisters_after_etcd_restart_and_after_losing_its_data(
    cluster: Cluster,
) -> None:
    etcd = cluster.etcd()
    bank = cluster.bank("bank-1", service="bank", etcd=etcd.url, ttl_s=2)
    key = service_key("bank", "bank-1")

    # A restart on the same data: the lease survives (etcd renews leases on start).
    etcd.stop()
    await asyncio.sleep(3)  # longer than the TTL
    etcd.start()
    await assert_eventually(
        lambda: keys(etcd.url, SERVICES),
        lambda k: k.get(key, {}).get("address") == bank.address,
        timeout_s=10,
        what="registered after an etcd restart",
    )

    # etcd loses everything (a new cluster on the same address): the lease is gone, the
    # participant notices at its next renewal and registers again on a new lease.
    etcd.kill()
    shutil.rmtree(etcd.data_dir)
    etcd.start()
    assert key not in await keys(etcd.url, SERVICES)
    await assert_eventually(
        lambda: keys(etcd.url, SERVICES),
        lambda k: k.get(key, {}).get("address") == bank.address,
        timeout_s=10,
        what="registered again after etcd lost its data",
    )
    assert bank.alive()


async def test_registry_cache_follows_the_watch(cluster: Cluster) -> None:
    etcd_proc = cluster.etcd()
    async with Etcd(etcd_proc.url) as etcd:
        registry = EtcdRegistry(etcd, resync_s=60)  # the watch alone must keep it current
        await registry.start()
        try:
            assert registry.instances("inventory") == ()
            assert not registry.known("inventory")
            regs = [
                Registration(
                    etcd,
                    service_key("inventory", f"i{n}"),
                    service_value(f"127.0.0.1:{9000 + n}", ["reserve"]),
                    ttl_s=5,
                )
                for n in (1, 2)
            ]
            for r in regs:
                await r.start()

            async def addresses() -> list[str]:
                return [i.address for i in registry.instances("inventory")]

            await assert_eventually(
                addresses, lambda a: a == ["127.0.0.1:9001", "127.0.0.1:9002"], timeout_s=5
            )
            assert registry.instances("inventory")[0].operations == ("reserve",)

            regs[0].update(service_value("127.0.0.1:9101", ["reserve"]))
            await assert_eventually(
                addresses, lambda a: a == ["127.0.0.1:9101", "127.0.0.1:9002"], timeout_s=5
            )

            await regs[0].close()
            await assert_eventually(addresses, lambda a: a == ["127.0.0.1:9002"], timeout_s=5)
            await regs[1].close()
            await assert_eventually(addresses, lambda a: a == [], timeout_s=5)
            # Known once seen: a branch naming it waits for an instance, not refused.
            assert registry.known("inventory")

            # A malformed value is skipped, not fatal.
            kv = etcd.client.kv
            assert kv is not None
            await kv.put(service_key("inventory", "bad"), b"not json", timeout=5)
            await kv.put(service_key("inventory", "ok"), service_value("127.0.0.1:9200"), timeout=5)
            await assert_eventually(addresses, lambda a: a == ["127.0.0.1:9200"], timeout_s=5)
        finally:
            await registry.close()


async def _transfer_workload(
    client: AccordClient,
    *,
    n: int,
    concurrency: int,
    services: tuple[str, str],
    accounts: int,
    seed: int,
    during: asyncio.Event | None = None,
) -> list[TxnResult | AccordClientError]:
    """n transfers (debit in one service, credit in the other); returns each result or
    the client error it raised. ``during`` is set once a third of them are done."""
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        amount = rng.randint(1, 5)
        plan.append(
            (
                f"w{seed}-{i}",
                Branch(
                    service=services[0],
                    operation="debit",
                    payload={"account": f"a{rng.randrange(accounts)}", "amount": amount},
                ),
                Branch(
                    service=services[1],
                    operation="credit",
                    payload={"account": f"b{rng.randrange(accounts)}", "amount": amount},
                ),
            )
        )
    results: list[TxnResult | AccordClientError | None] = [None] * n
    queue = list(enumerate(plan))
    done = 0

    async def worker() -> None:
        nonlocal done
        while queue:
            i, (key, debit, credit) = queue.pop(0)
            try:
                results[i] = await client.execute([debit, credit], idempotency_key=key)
            except AccordClientError as e:
                results[i] = e
            done += 1
            if during is not None and done >= n // 3:
                during.set()

    async with asyncio.timeout(120):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


async def test_balancing_and_failover_across_instances_of_one_service(cluster: Cluster) -> None:
    """Two processes serve the service "bank" over one SQLite file; the coordinator
    spreads branches over both, and when one is SIGKILLed mid-workload, every
    transaction still ends decided, through the survivor."""
    etcd = cluster.etcd()
    a = cluster.bank("bank-a", service="bank", db="bank", etcd=etcd.url, ttl_s=2)
    b = cluster.bank("bank-b", service="bank", db="bank", etcd=etcd.url, ttl_s=2)
    accounts = 20
    await open_accounts(
        a.address,
        {**{f"a{i}": 1000 for i in range(accounts)}, **{f"b{i}": 1000 for i in range(accounts)}},
    )
    coord = cluster.coordinator({}, etcd=etcd.url)
    assert (await keys(etcd.url, COORDINATORS))["/accord/v1/coordinators/accord-1"][
        "address"
    ] == coord.address

    async with await AccordClient.from_etcd(etcd.url) as client:
        # Balancing: a first batch, both instances alive.
        first = await _transfer_workload(
            client, n=60, concurrency=8, services=("bank", "bank"), accounts=accounts, seed=1
        )
        assert all(isinstance(r, TxnResult) and r.committed for r in first), first[:3]
        used = Counter(br.address for r in first if isinstance(r, TxnResult) for br in r.branches)
        assert set(used) == {a.address, b.address}, used

        # Failover: kill one instance a third of the way into the second batch.
        third = asyncio.Event()
        load = asyncio.create_task(
            _transfer_workload(
                client,
                n=150,
                concurrency=8,
                services=("bank", "bank"),
                accounts=accounts,
                seed=2,
                during=third,
            )
        )
        await third.wait()
        a.kill()
        second = await load

        done = [r for r in second if isinstance(r, TxnResult)]
        assert len(done) == len(second), [r for r in second if not isinstance(r, TxnResult)][:3]
        # Nothing here is refused for funds: every one commits.
        assert [r.state for r in done] == ["COMMITTED"] * len(done)

        # Nothing left undecided on the coordinator, nothing held prepared in the bank.
        txns, _ = await client.list(limit=1000)
        assert all(t.state in TERMINAL for t in txns), [t.state for t in txns]

    summary = await assert_eventually(
        lambda: balances(b.address),
        lambda s: s.prepared_branches == 0,
        timeout_s=20,
        what="no branch left prepared",
    )
    assert summary.total == 2 * accounts * 1000
    assert summary.total_held == 0


async def test_etcd_outage_during_a_workload(cluster: Cluster) -> None:
    """etcd stops for a few seconds mid-workload: transactions go on from the cache,
    nothing is lost, a service never seen fails fast, and after etcd returns new
    transactions and new registrations work again."""
    etcd = cluster.etcd()
    src = cluster.bank("src", etcd=etcd.url, ttl_s=3)
    dst = cluster.bank("dst", etcd=etcd.url, ttl_s=3)
    accounts = 10
    await open_accounts(src.address, {f"a{i}": 10_000 for i in range(accounts)})
    await open_accounts(dst.address, {f"b{i}": 0 for i in range(accounts)})
    coord = cluster.coordinator({}, etcd=etcd.url)

    async with AccordClient(coord.address) as client:
        third = asyncio.Event()
        load = asyncio.create_task(
            _transfer_workload(
                client,
                n=240,
                concurrency=8,
                services=("src", "dst"),
                accounts=accounts,
                seed=3,
                during=third,
            )
        )
        await third.wait()
        etcd.stop()
        t_down = time.monotonic()

        # A service the coordinator never saw: refused at once, saying why (once the
        # coordinator has noticed the outage, at its next resync).
        async def unknown_service() -> str:
            t0 = time.monotonic()
            with pytest.raises(UnavailableError) as err:
                await client.execute([Branch(service="nowhere", operation="debit")])
            assert time.monotonic() - t0 < 1, "fails fast"
            return str(err.value)

        await assert_eventually(
            unknown_service, lambda m: "unreachable" in m, timeout_s=3.5, what="says why"
        )

        await asyncio.sleep(max(0.0, 4 - (time.monotonic() - t_down)))
        etcd.start()
        results = await load

    done = [r for r in results if isinstance(r, TxnResult)]
    assert len(done) == len(results), [r for r in results if not isinstance(r, TxnResult)][:3]
    assert all(r.committed for r in done)
    s_src, s_dst = await balances(src.address), await balances(dst.address)
    assert s_src.total + s_dst.total == accounts * 10_000
    assert s_dst.total > 0

    # After etcd returns: a new participant registers and is used.
    late = cluster.bank("late", etcd=etcd.url, ttl_s=3)
    await open_accounts(late.address, {"c0": 0})
    async with AccordClient(coord.address) as client:

        async def attempt() -> TxnResult | UnavailableError:
            try:
                return await client.execute(
                    [
                        Branch(
                            service="src", operation="debit", payload={"account": "a0", "amount": 1}
                        ),
                        Branch(
                            service="late",
                            operation="credit",
                            payload={"account": "c0", "amount": 1},
                        ),
                    ]
                )
            except UnavailableError as e:
                return e

        result = await assert_eventually(
            attempt,
            lambda r: not isinstance(r, Exception),
            timeout_s=10,
            what="a transaction naming the new service",
        )
        assert isinstance(result, TxnResult) and result.committed


async def test_sidecar_registers_a_plain_health_checked_service(cluster: Cluster) -> None:
    """A participant without the SDK's registration (a bank started without --etcd,
    standing for a service in any language) kept in etcd by ``accord sidecar`` while its
    gRPC health status is SERVING."""
    from accord.tools.topology import accord_argv
    from tests.integration.conftest import free_port

    etcd = cluster.etcd()
    port = free_port()
    target = cluster.bank("plain", port=port)
    ttl = 2
    car = cluster.topology.process(
        "sidecar",
        accord_argv(
            [
                "sidecar",
                "--service",
                "plain",
                "--target",
                f"127.0.0.1:{port}",
                "--etcd",
                etcd.url,
                "--ttl",
                str(ttl),
                "--interval-s",
                "0.3",
                "--instance-id",
                "plain-1",
            ]
        ),
        ready="sidecar watching ",
    )
    cluster.topology.start(car)
    key = service_key("plain", "plain-1")

    async def registered() -> bool:
        return key in await keys(etcd.url, SERVICES)

    await assert_eventually(registered, bool, timeout_s=5, what="registered while SERVING")
    assert (await keys(etcd.url, SERVICES))[key]["address"] == f"127.0.0.1:{port}"

    # The target dies: the key goes within one TTL.
    target.kill()
    t0 = time.monotonic()
    await assert_eventually(registered, lambda r: not r, timeout_s=ttl + 2, what="removed")
    assert time.monotonic() - t0 <= ttl

    # It comes back on the same port: registered again.
    cluster.bank("plain", port=port)
    await assert_eventually(registered, bool, timeout_s=5, what="registered again")

    # A clean stop of the sidecar revokes its lease.
    car.stop()
    assert not await registered()

    # The sidecar SIGKILLed: its lease expires within the TTL.
    car.start()
    await assert_eventually(registered, bool, timeout_s=5, what="registered by a new sidecar")
    assert car.proc is not None
    car.proc.send_signal(signal.SIGKILL)
    await assert_eventually(registered, lambda r: not r, timeout_s=ttl + 3, what="lease expired")


async def test_an_etcd_url_with_a_host_name_connects(cluster: Cluster) -> None:
    """A host name, not an address (compose's http://etcd:2379, a Kubernetes Service):
    etcd3aio alone dials "ipv4:etcd:2379", which never connects. This machine's own name
    (not "localhost", which has an IPv4 shortcut) goes through gRPC's DNS resolver; a
    two-endpoint list with it is resolved at start."""
    name = socket.gethostname()
    try:
        addrs = {i[4][0] for i in socket.getaddrinfo(name, 1, socket.AF_INET)}
    except OSError:
        addrs = set()
    if "127.0.0.1" not in addrs:
        pytest.skip(f"this machine's name {name!r} does not resolve to 127.0.0.1 ({addrs})")
    etcd_proc = cluster.etcd()
    port = etcd_proc.url.rsplit(":", 1)[1]
    for url in (f"http://{name}:{port}", f"http://{name}:{port},http://127.0.0.1:{port}"):
        async with Etcd(url) as etcd:
            await etcd.wait_reachable(10)
            kv = etcd.client.kv
            assert kv is not None
            await kv.put(f"/test/hostname/{len(url)}", b"1", timeout=5)
    assert len(await keys(etcd_proc.url, "/test/hostname/")) == 2
