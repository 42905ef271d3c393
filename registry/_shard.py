"""Owning a WAL shard through etcd (DESIGN.md guarantee 7, key layout).

Keys::

    /accord/v1/shards/<shard>/owner    → {"id", "address", "epoch"}   (on the owner's lease)
    /accord/v1/shards/<shard>/epoch    → "<n>"                         (never leased)
    /accord/v1/shards/<shard>/retired  → {"at", "by", "transactions", "kept", "epoch",
                                          "last_owner"}                (never leased)
    /accord/v1/retired/<shard>/keys/<idempotency key> → {"gid", "state", "protocol", "reason"}
    /accord/v1/retired/<shard>/gids/<gid>             → {"key", "state", "protocol", "reason"}

A shard is *known* once its epoch key exists (some coordinator owned it once); clients
place idempotency keys over every known shard. ``accord shard retire`` (see
:mod:`accord.registry._retire`) marks a shard that is gone for good as *retired*: it
first writes the outcome of every finished transaction of the shard that had an
idempotency key (the two ``/accord/v1/retired/<shard>/`` keys of each, in batches, a
re-run writes them again), then, last, the ``retired`` marker, in one transaction that
also checks that no coordinator owns the shard and that its epoch has not moved. So a
shard is either not retired, or retired with all its kept outcomes in place. A client
asks the kept outcomes of a retired shard before placing a key elsewhere, and answers a
gid of the shard from them. The kept outcomes live outside ``/accord/v1/shards/`` on
purpose: clients read that whole prefix on every shard-map refresh, and a retired shard
can keep a hundred thousand keys. A shard is never un-retired by Accord itself.

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
and the coordinator stops (it may already have a successor). When no renewal is answered
(etcd down, or this process cut off from it while a standby still reaches it: the owner
cannot tell which), the owner stops calling participants before the lease it last
renewed can have expired (:meth:`ShardLease.may_act`), so it never acts while a standby
may have taken the shard over; a renewal that finds the lease alive proves nobody did,
and calls resume. The WAL directory's file lock keeps a successor out of the files until
this process exits.

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

from accord.common.exits import StartupError
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


class ShardRetiredError(StartupError):
    """The shard was retired for good: no coordinator may own it again."""


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
        #: Monotonic times: the last renewal answered was sent, and this process may act
        #: as the owner until (see :meth:`may_act`).
        self._renewed_at = 0.0
        self._sure_until = 0.0
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
                if (await kv.get(retired_key(self.shard), timeout=REQUEST_TIMEOUT_S)).kvs:
                    raise ShardRetiredError(
                        f"shard {self.shard} was retired (accord shard retire): a coordinator "
                        "cannot own it again; start this one with another --shard"
                    )
                # A fresh lease for each attempt: one granted before a long wait as a
                # standby would have expired.
                # The lease lives at least ttl_s from the grant's sending.
                self._renewed_at = time.monotonic()
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
                        # Never over a shard retired meanwhile (mark_retired compares the
                        # epoch's version too, so one of the two wins).
                        kv.txn_compare_create_revision(retired_key(self.shard), 0),
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
        self._sure_until = self.owned_until(self._renewed_at)
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

    def owned_until(self, renewed_at: float) -> float:
        """The monotonic time until which this process may act as the owner, after a
        renewal sent at ``renewed_at`` was answered: etcd received it after we sent it, so
        the lease lives at least ``ttl_s`` from then; a margin (a quarter of the TTL, at
        least 0.2 s, at most 1 s) covers calls already on their way."""
        margin = min(1.0, max(0.2, self.ttl_s / 4))
        return renewed_at + self.ttl_s - margin

    def may_act(self) -> bool:
        """Whether this process is sure to own the shard now: its lease was renewed
        recently enough that it cannot have expired (:meth:`owned_until`), and it is not
        lost. The coordinator calls no participant while this is False."""
        return not self.lost.is_set() and time.monotonic() < self._sure_until

    async def _keepalive(self) -> None:
        """Renews the lease every TTL/3. Without an answer (etcd down, or this process
        cut off from it while a standby still reaches it: it cannot tell which) the owner
        stops acting (:meth:`may_act`) before the lease it last renewed can expire, so it
        never acts while a standby may have taken the shard over. A later renewal that
        finds the lease alive proves nobody did: it acts again. One that finds it gone
        sets :attr:`lost` (the coordinator then stops)."""
        client = self.etcd.client
        assert client.lease is not None
        unsure_since = 0.0
        while True:
            pause = max(self.ttl_s / 3, 0.2)
            await asyncio.sleep(max(0.0, min(pause, self._sure_until - time.monotonic())))
            if not unsure_since and time.monotonic() >= self._sure_until:
                unsure_since = time.monotonic()
                log.critical(
                    "event=shard_unsure shard=%s owner=%s epoch=%d action=stop-calls (no lease "
                    "renewal answered in time: a standby may take the shard over)",
                    self.shard,
                    self.owner_id,
                    self.epoch,
                )
            sent = time.monotonic()
            stream = client.lease.keep_alive(self.lease)
            # Answered after the deadline is still worth hearing (the lease may live).
            wait_s = REQUEST_TIMEOUT_S
            if not unsure_since:
                wait_s = max(0.05, min(wait_s, self._sure_until - sent))
            try:
                async with asyncio.timeout(wait_s):
                    ttl = 0
                    async for response in stream:
                        ttl = int(response.TTL)
                        break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning(
                    "event=shard_lease_unrenewed shard=%s for_s=%.1f error=%s",
                    self.shard,
                    time.monotonic() - self._renewed_at,
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
            self._renewed_at = sent
            self._sure_until = self.owned_until(sent)
            if unsure_since:
                log.warning(
                    "event=shard_sure shard=%s owner=%s epoch=%d unsure_s=%.1f (the lease "
                    "lived: calls resume)",
                    self.shard,
                    self.owner_id,
                    self.epoch,
                    time.monotonic() - unsure_since,
                )
                unsure_since = 0.0

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


def retired_key(shard: str) -> str:
    return f"{SHARDS}{shard}/retired"


#: Where the kept outcomes of retired shards live (outside SHARDS: see the docstring).
RETIRED = ROOT + "retired/"


def kept_key_key(shard: str, key: str) -> str:
    """The key keeping the outcome of idempotency key ``key`` of retired ``shard``."""
    return f"{RETIRED}{shard}/keys/{key}"


def kept_gid_key(shard: str, gid: str) -> str:
    """The key keeping the outcome of ``gid`` (one that had an idempotency key)."""
    return f"{RETIRED}{shard}/gids/{gid}"


@dataclass(frozen=True, kw_only=True)
class Retired:
    """The ``retired`` marker of a shard."""

    at: str = ""
    by: str = ""
    #: Finished transactions found in the shard's WAL, and how many of them had an
    #: idempotency key (their outcomes are kept).
    transactions: int = 0
    kept: int = 0
    epoch: int = 0
    last_owner: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "at": self.at,
            "by": self.by,
            "transactions": self.transactions,
            "kept": self.kept,
            "epoch": self.epoch,
            "last_owner": self.last_owner,
        }

    @classmethod
    def parse(cls, value: bytes) -> Retired:
        try:
            data = json.loads(value)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return cls()  # a marker that does not parse still marks the shard retired
        return cls(
            at=str(data.get("at", "")),
            by=str(data.get("by", "")),
            transactions=int(data.get("transactions", 0) or 0),
            kept=int(data.get("kept", 0) or 0),
            epoch=int(data.get("epoch", 0) or 0),
            last_owner=str(data.get("last_owner", "")),
        )


@dataclass(frozen=True, kw_only=True)
class ShardState:
    """One known shard, as ``accord shard list`` shows it."""

    shard: str
    #: The newest epoch granted (0 if unknown).
    epoch: int = 0
    #: The live owner's id; without one, the last owner's if etcd's history still
    #: has it ("" otherwise).
    owner: str = ""
    #: The live owner's address ("" without one).
    address: str = ""
    live: bool = False
    retired: Retired | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "shard": self.shard,
            "epoch": self.epoch,
            "owner": self.owner,
            "address": self.address,
            "live": self.live,
            "retired": self.retired.to_dict() if self.retired is not None else None,
        }


@dataclass(frozen=True, kw_only=True)
class ShardMap:
    """Who serves each shard now, as a sharded client sees it."""

    #: The live coordinator of each shard that has one (the highest epoch registered).
    owners: dict[str, CoordinatorInfo] = field(default_factory=dict)
    #: Every shard that has ever had an owner (its epoch key is never leased), sorted,
    #: retired ones included. Idempotency keys are placed over these, not over the
    #: live ones: a key whose shard is down waits for it (a standby) rather than moving
    #: to another shard, which would not know the first attempt.
    known: tuple[str, ...] = ()
    #: The retired shards (a subset of :attr:`known`).
    retired: frozenset[str] = frozenset()
    #: Every known shard's state, by name.
    states: dict[str, ShardState] = field(default_factory=dict)

    @property
    def serving(self) -> tuple[str, ...]:
        """The shards new keyless transactions go to: live and not retired, sorted."""
        return tuple(s for s in sorted(self.owners) if s not in self.retired)


def shard_map(
    coordinators: list[CoordinatorInfo],
    epoch_shards: list[str],
    *,
    epochs: dict[str, int] | None = None,
    retired: dict[str, Retired] | None = None,
    owner_ids: dict[str, str] | None = None,
) -> ShardMap:
    """The map from the registered coordinators and the shards' keys: ``epochs`` the
    newest epoch of each shard, ``retired`` the retired ones' markers, ``owner_ids``
    the current owner (owner key) or else the last one known of each."""
    epochs, retired, owner_ids = epochs or {}, retired or {}, owner_ids or {}
    owners: dict[str, CoordinatorInfo] = {}
    for c in coordinators:
        if c.shard and (c.shard not in owners or c.epoch > owners[c.shard].epoch):
            owners[c.shard] = c
    known = tuple(sorted({*owners, *epoch_shards}))
    states = {}
    for s in known:
        live = owners.get(s)
        marker = retired.get(s)
        last = owner_ids.get(s) or (marker.last_owner if marker is not None else "")
        states[s] = ShardState(
            shard=s,
            epoch=max(epochs.get(s, 0), live.epoch if live is not None else 0),
            owner=live.coordinator_id if live is not None else last,
            address=live.address if live is not None else "",
            live=live is not None,
            retired=marker,
        )
    return ShardMap(
        owners=owners,
        known=known,
        retired=frozenset(s for s in known if s in retired),
        states=states,
    )


async def find_shards(url: str, timeout_s: float = 5.0, *, etcd: Etcd | None = None) -> ShardMap:
    """The shard map from etcd (two reads, and one more per known shard that has no
    owner and is not retired, to name its last owner; for clients, on start and after a
    failure). ``etcd``: a connected client to use instead of a new one for ``url``."""
    if etcd is None:
        async with Etcd(url) as own:
            return await find_shards(url, timeout_s, etcd=own)
    kv = etcd.client.kv
    assert kv is not None
    try:
        coords = await kv.get(
            COORDINATORS, prefix_range_end(COORDINATORS), timeout=timeout_s, max_attempts=2
        )
        resp = await kv.get(SHARDS, prefix_range_end(SHARDS), timeout=timeout_s, max_attempts=2)
    except _ERRORS as e:
        raise ConnectionError(f"etcd at {url} unreachable: {_short(e)}") from e
    coordinators = parse_coordinators({kv_.key.decode(): bytes(kv_.value) for kv_ in coords.kvs})
    epochs: dict[str, int] = {}
    epoch_revs: dict[str, int] = {}
    retired: dict[str, Retired] = {}
    owner_ids: dict[str, str] = {}
    for kv_ in resp.kvs:
        shard, _, leaf = kv_.key.decode()[len(SHARDS) :].rpartition("/")
        if leaf == "epoch":
            try:
                epochs[shard] = int(kv_.value)
            except ValueError:
                epochs[shard] = 0
            epoch_revs[shard] = int(kv_.mod_revision)
        elif leaf == "retired":
            retired[shard] = Retired.parse(bytes(kv_.value))
        elif leaf == "owner":
            owner_ids[shard] = _owner_id(bytes(kv_.value))
    for shard, rev in epoch_revs.items():
        if shard not in owner_ids and shard not in retired:
            owner_ids[shard] = await _last_owner(etcd, shard, rev, timeout_s)
    return shard_map(
        coordinators, list(epochs), epochs=epochs, retired=retired, owner_ids=owner_ids
    )


def _owner_id(value: bytes) -> str:
    try:
        data = json.loads(value)
    except ValueError:
        return ""
    return str(data.get("id", "")) if isinstance(data, dict) else ""


async def _last_owner(etcd: Etcd, shard: str, epoch_revision: int, timeout_s: float) -> str:
    """Who owned ``shard`` last: the owner key as the transaction that made the newest
    epoch wrote it (etcd's history; "" once compacted away)."""
    kv = etcd.client.kv
    assert kv is not None
    try:
        resp = await kv.get(
            owner_key(shard), revision=epoch_revision, timeout=timeout_s, max_attempts=1
        )
    except _ERRORS:
        return ""
    return _owner_id(bytes(resp.kvs[0].value)) if resp.kvs else ""
