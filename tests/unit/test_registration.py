"""Registration's decisions against a fake etcd whose leases and keys the test changes
behind its back (the real etcd, killed and cut off, is in
tests/integration/test_registry_cluster.py)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from accord.registry import Etcd, Registration

TTL_S = 1


def _not_found() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="etcdserver: requested lease not found",
    )


class _Stream:
    def __init__(self, ttl: int) -> None:
        self._ttl = ttl

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[Any]:
        yield SimpleNamespace(TTL=self._ttl)

    def cancel(self) -> None:
        pass


@dataclass
class FakeEtcd:
    """Leases (alive or not) and keys (value, lease); ``fail_puts`` next puts time out
    on the way back, ``expire_on_failed_put`` also lets the lease lapse then."""

    leases: set[int] = field(default_factory=set)
    keys: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    fail_puts: int = 0
    expire_on_failed_put: bool = False
    url: str = "http://fake:2379"
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def client(self) -> Any:
        return SimpleNamespace(lease=self, kv=self)

    def expire(self, lease: int) -> None:
        self.leases.discard(lease)
        self.keys = {k: v for k, v in self.keys.items() if v[1] != lease}

    # Lease service
    async def grant(self, ttl: int, **_: object) -> Any:
        lease = next(self._ids)
        self.leases.add(lease)
        return SimpleNamespace(ID=lease, TTL=ttl)

    def keep_alive(self, lease: int) -> _Stream:
        return _Stream(TTL_S if lease in self.leases else 0)

    async def revoke(self, lease: int, **_: object) -> None:
        if lease not in self.leases:
            raise _not_found()
        self.expire(lease)

    # KV service
    async def put(self, key: str, value: bytes, lease: int = 0, **_: object) -> None:
        if self.fail_puts:
            self.fail_puts -= 1
            if self.expire_on_failed_put:
                self.expire(lease)
            raise TimeoutError
        if lease and lease not in self.leases:
            raise _not_found()
        self.keys[key] = (value, lease)

    async def get(self, key: str, **_: object) -> Any:
        kvs = (
            [SimpleNamespace(key=key.encode(), lease=self.keys[key][1])] if key in self.keys else []
        )
        return SimpleNamespace(kvs=kvs)


async def _until(check: Any, what: str, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def _holds(fake: FakeEtcd, reg: Registration, value: bytes = b"v1") -> bool:
    return (
        reg.registered
        and fake.keys.get(reg.key) == (value, reg.lease_id)
        and (reg.lease_id in fake.leases)
    )


@pytest.fixture
async def fake() -> FakeEtcd:
    return FakeEtcd()


async def test_a_put_that_failed_is_retried_on_a_new_lease(fake: FakeEtcd) -> None:
    # The first put is lost and its lease lapses before the next try: a put on the old
    # lease would be refused ("requested lease not found") on every try after.
    fake.fail_puts, fake.expire_on_failed_put = 1, True
    reg = Registration(cast(Etcd, fake), "/k", b"v1", ttl_s=TTL_S, start_timeout_s=10)
    await reg.start()
    try:
        assert _holds(fake, reg)
        assert reg.lease_id != 1  # not the lease of the failed put
    finally:
        await reg.close()
    assert "/k" not in fake.keys


async def test_a_key_deleted_under_a_live_lease_is_put_back(fake: FakeEtcd) -> None:
    reg = Registration(cast(Etcd, fake), "/k", b"v1", ttl_s=TTL_S)
    await reg.start()
    try:
        lease = reg.lease_id
        del fake.keys["/k"]  # the lease lives on and keepalives say so
        await _until(lambda: _holds(fake, reg), "the key back")
        assert reg.lease_id == lease  # put back on the same, live lease
    finally:
        await reg.close()


async def test_a_lost_lease_is_replaced_and_the_key_put_again(fake: FakeEtcd) -> None:
    reg = Registration(cast(Etcd, fake), "/k", b"v1", ttl_s=TTL_S)
    await reg.start()
    try:
        lease = reg.lease_id
        fake.expire(lease)
        await _until(lambda: _holds(fake, reg) and reg.lease_id != lease, "a new lease")
    finally:
        await reg.close()


async def test_an_update_whose_put_failed_is_written_later(fake: FakeEtcd) -> None:
    reg = Registration(cast(Etcd, fake), "/k", b"v1", ttl_s=TTL_S)
    await reg.start()
    try:
        fake.fail_puts = 2
        reg.update(b"v2")
        await _until(lambda: _holds(fake, reg, b"v2"), "the new value")
    finally:
        await reg.close()
