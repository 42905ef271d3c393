"""Owning a WAL shard through etcd (DESIGN.md guarantee 7, key layout).

Keys::

    /accord/v1/shards/<shard>/owner  → {"id", "address", "epoch"}   (on the owner's lease)
    /accord/v1/shards/<shard>/epoch  → "<n>"                         (never leased)

Acquiring is one etcd transaction: *if the owner key does not exist and the epoch key
is still at the version we read, then put the owner key on our lease and the epoch
n + 1*. So every owner of a shard has its own, higher epoch. That epoch goes on every
participant call, and participants refuse an epoch lower than one they have seen. A
former owner that wakes up (after a pause past its TTL, say) is refused by every
participant the new owner has reached.

etcd3aio retries a request on UNAVAILABLE, and a compare-and-swap that is retried may
have applied already. So the transaction is sent with one attempt, and a doubtful
answer is settled by reading the owner key back.

Losing ownership is final. When a renewal finds the lease gone, :attr:`lost` is set
and the coordinator stops (it may already have a successor). When etcd is merely
unreachable, the owner keeps going: no successor can be chosen without etcd, and the
WAL directory's file lock keeps a successor out of the files until this process exits.

Giving up the wait is safe at any point: cancelling :meth:`ShardLease.acquire` (a
standby stopped by a signal) leaves at most a lease of ours behind, which
:meth:`ShardLease.close` revokes, and with it an owner key a doubtful transaction may
have put. So a stopped standby never takes the shard over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from etcd3aio import prefix_range_end

from accord.registry._etcd import (
    _ERRORS,
    COORDINATORS,
    REQUEST_TIMEOUT_S,
    ROOT,
    CoordinatorInfo,
    Etcd,
    Throttle,
    _short,
    parse_coordinators,
)

log = logging.getLogger("accord.registry.shard")

SHARDS = ROOT + "shards/"


def owner_key(shard: str) -> str:
    return f"{SHARDS}{shard}/owner"


def epoch_key(shard: str) -> str:
    return f"{SHARDS}{shard}/epoch"


@dataclass(frozen=True, kw_only=True)
class Owner:
    owner_id: str
    address: str
    epoch: int
    lease: int


class ShardLease:
    """``epoch = await ShardLease(etcd, shard, ...).acquire()`` blocks until this process
    owns the shard (a standby waits here), then keeps the lease alive."""

    def __init__(
        self,
        etcd: Etcd,
        shard: str,
        *,
        owner_id: str,
        address: str = "",
        ttl_s: int = 5,
    ) -> None:
        if ttl_s < 1:
            raise ValueError("shard lease TTL must be at least 1 second")
        self.etcd = etcd
        self.shard = shard
        self.owner_id = owner_id
        self.address = address
        self.ttl_s = ttl_s
        self.epoch = 0
        self.lease = 0
        #: Set once the lease is known to be gone: ownership is lost for good.
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def current(self) -> Owner | None:
        kv = self.etcd.client.kv
        assert kv is not None
        resp = await kv.get(owner_key(self.shard), timeout=REQUEST_TIMEOUT_S, max_attempts=1)
        if not resp.kvs:
            return None
        data = json.loads(resp.kvs[0].value)
        return Owner(
            owner_id=str(data.get("id", "")),
            address=str(data.get("address", "")),
            epoch=int(data.get("epoch", 0)),
            lease=int(resp.kvs[0].lease),
        )

    async def acquire(self, on_wait: Callable[[Owner], None] | None = None) -> int:
        """Waits until this process owns the shard; returns its epoch. Cancelling it is
        safe; call :meth:`close` afterwards (it revokes a lease granted meanwhile)."""
        client = self.etcd.client
        assert client.kv is not None and client.lease is not None
        kv = client.kv
        waiting_for: str | None = None
        warn = Throttle()
        while True:
            try:
                owner = await self.current()
                if owner is not None:
                    if self.lease and owner.lease == self.lease and owner.owner_id == self.owner_id:
                        return self._owned(owner.epoch)  # a doubtful transaction did apply
                    if waiting_for != owner.owner_id:
                        waiting_for = owner.owner_id
                        log.info(
                            "event=standby shard=%s owner=%s epoch=%d",
                            self.shard,
                            owner.owner_id,
                            owner.epoch,
                        )
                        if on_wait is not None:
                            on_wait(owner)
                    await asyncio.sleep(min(0.25, self.ttl_s / 4))
                    continue
                # A fresh lease for each attempt: one granted before a long wait as a
                # standby would have expired.
                grant = await client.lease.grant(self.ttl_s, timeout=REQUEST_TIMEOUT_S)
                self.lease = grant.ID
                resp = await kv.get(epoch_key(self.shard), timeout=REQUEST_TIMEOUT_S)
                version = int(resp.kvs[0].version) if resp.kvs else 0
                current = int(resp.kvs[0].value) if resp.kvs else 0
                epoch = current + 1
                value = json.dumps(
                    {"id": self.owner_id, "address": self.address, "epoch": epoch},
                    separators=(",", ":"),
                )
                txn = await kv.txn(
                    compare=[
                        kv.txn_compare_create_revision(owner_key(self.shard), 0),
                        kv.txn_compare_version(epoch_key(self.shard), version),
                    ],
                    success=[
                        kv.txn_op_put(owner_key(self.shard), value, lease=self.lease),
                        kv.txn_op_put(epoch_key(self.shard), str(epoch)),
                    ],
                    timeout=REQUEST_TIMEOUT_S,
                    max_attempts=1,
                )
                if txn.succeeded:
                    return self._owned(epoch)
                # Someone else was quicker; our lease is unused.
                with contextlib.suppress(*_ERRORS):
                    await client.lease.revoke(self.lease, timeout=1.0, max_attempts=1)
                self.lease = 0
            except asyncio.CancelledError:
                raise
            except _ERRORS as e:
                # Doubt: the next round reads the owner key back.
                if warn.ready():
                    log.warning(
                        "event=shard_acquire_retry shard=%s error=%s retries_not_logged=%d",
                        self.shard,
                        _short(e),
                        warn.take_skipped(),
                    )
                await asyncio.sleep(0.5)

    def _owned(self, epoch: int) -> int:
        self.epoch = epoch
        log.info(
            "event=shard_owned shard=%s owner=%s epoch=%d lease=%x",
            self.shard,
            self.owner_id,
            epoch,
            self.lease,
        )
        self._task = asyncio.get_running_loop().create_task(
            self._keepalive(), name=f"shard-lease:{self.shard}"
        )
        return epoch

    async def _keepalive(self) -> None:
        client = self.etcd.client
        assert client.lease is not None
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(max(self.ttl_s / 3, 0.2))
            stream = client.lease.keep_alive(self.lease)
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    ttl = 0
                    async for response in stream:
                        ttl = int(response.TTL)
                        break
            except asyncio.CancelledError:
                raise
            except _ERRORS as e:
                log.warning(
                    "event=shard_lease_unrenewed shard=%s for_s=%.1f error=%s",
                    self.shard,
                    time.monotonic() - last_ok,
                    _short(e),
                )
                continue
            finally:
                stream.cancel()
            if ttl <= 0:
                log.critical(
                    "event=shard_lost shard=%s owner=%s epoch=%d (the lease expired)",
                    self.shard,
                    self.owner_id,
                    self.epoch,
                )
                self.lost.set()
                return
            last_ok = time.monotonic()

    async def close(self) -> None:
        """Gives the shard up at once (revokes the lease), for a clean shutdown."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.lease and not self.lost.is_set():
            lease, self.lease = self.lease, 0
            try:
                client = self.etcd.client
                assert client.lease is not None
                await client.lease.revoke(lease, timeout=1.0, max_attempts=1)
                log.info("event=shard_released shard=%s owner=%s", self.shard, self.owner_id)
            except (*_ERRORS, RuntimeError) as e:
                log.warning("event=shard_release_failed shard=%s error=%s", self.shard, _short(e))


@dataclass(frozen=True, kw_only=True)
class ShardMap:
    """Who serves each shard now, as a sharded client sees it."""

    #: The live coordinator of each shard that has one (the highest epoch registered).
    owners: dict[str, CoordinatorInfo] = field(default_factory=dict)
    #: Every shard that has ever had an owner (its epoch key is never leased), sorted.
    #: Idempotency keys are placed over these, not over the live ones: a key whose
    #: shard is down waits for it (a standby) rather than moving to another shard,
    #: which would not know the first attempt.
    known: tuple[str, ...] = ()


def shard_map(coordinators: list[CoordinatorInfo], epoch_shards: list[str]) -> ShardMap:
    owners: dict[str, CoordinatorInfo] = {}
    for c in coordinators:
        if c.shard and (c.shard not in owners or c.epoch > owners[c.shard].epoch):
            owners[c.shard] = c
    return ShardMap(owners=owners, known=tuple(sorted({*owners, *epoch_shards})))


async def find_shards(url: str, timeout_s: float = 5.0) -> ShardMap:
    """The shard map from etcd (two reads; for clients, on start and after a failure)."""
    async with Etcd(url) as etcd:
        kv = etcd.client.kv
        assert kv is not None
        try:
            coords = await kv.get(
                COORDINATORS, prefix_range_end(COORDINATORS), timeout=timeout_s, max_attempts=2
            )
            epochs = await kv.get(
                SHARDS, prefix_range_end(SHARDS), timeout=timeout_s, max_attempts=2, keys_only=True
            )
        except _ERRORS as e:
            raise ConnectionError(f"etcd at {url} unreachable: {_short(e)}") from e
    coordinators = parse_coordinators({kv_.key.decode(): bytes(kv_.value) for kv_ in coords.kvs})
    shards = [
        k[len(SHARDS) : -len("/epoch")]
        for k in (kv_.key.decode() for kv_ in epochs.kvs)
        if k.endswith("/epoch")
    ]
    return shard_map(coordinators, shards)
