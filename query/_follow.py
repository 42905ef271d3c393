"""Following the shards' feeds: one task per shard, subscribed to the shard's current
owner from the LSN the store last applied, reconnecting with backoff, and moving to a
new owner when the shard changes hands.

Where shards come from:

- ``--etcd URL``: the coordinators registered under ``/accord/v1/coordinators/`` (a
  watched cache, re-read every two seconds as a safety net): each shard's live owner is
  the one with the highest epoch. A new shard gets a follower; a shard whose owner
  changes (a standby took over) is followed at its new address at once; a shard with no
  live owner waits, disconnected (``/healthz`` says so); a shard that is no longer
  known at all (retired: no epoch key) is no longer followed.
- ``--coordinator ADDR`` (repeatable): a fixed address per follower. The shard is
  learned from the feed itself: every FeedEvent names its shard, so the follower
  subscribes from LSN 0 for one batch, reads the shard off its first event, then
  resumes from that shard's stored LSN (a shard with no event yet has nothing to project
  either, so waiting for the first event costs nothing). ``SHARD=ADDR`` names the shard
  up front and skips the probe. No GetTransaction is needed.

Applying is the store's (:meth:`~accord.query._store.Store.apply`: one transaction per
batch with the shard's LSN), so a follower killed at any point resumes from exactly
what was applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc import aio

import accord.v1 as pb
from accord.common.auth import env_token_metadata
from accord.common.retry import Backoff, pause
from accord.common.transport import TransportSettings, make_channel

log = logging.getLogger("accord.query.follow")

#: Events per Subscribe response asked for.
MAX_BATCH = 1024
#: How long a connection attempt may take.
CONNECT_TIMEOUT_S = 5.0
#: Reconnect schedule after a feed breaks (reset once a batch arrives).
RECONNECT = Backoff(initial_s=0.1, max_s=2.0, multiplier=2.0, jitter=0.5)

Apply = Callable[[str, Sequence[pb.FeedEvent]], Awaitable[int]]
"""``await apply(shard, events)`` stores a batch; returns the shard's applied LSN."""


@dataclass(kw_only=True)
class FeedState:
    """What a follower knows about its shard's feed (read by /healthz, Stats, metrics)."""

    shard: str
    address: str = ""
    connected: bool = False
    applied_lsn: int = 0
    durable_lsn: int = 0
    #: unix_ms of the oldest event received but not applied yet (0: none pending).
    pending_since_ms: int = 0
    #: monotonic time the feed was last heard from (a batch or an empty response).
    heard: float = 0.0
    events_applied: int = 0
    reconnects: int = 0
    last_error: str = ""

    @property
    def lag_events(self) -> int:
        return max(0, self.durable_lsn - self.applied_lsn)

    def lag_seconds(self, now_ms: int) -> float:
        if self.pending_since_ms:
            return max(0.0, (now_ms - self.pending_since_ms) / 1000)
        return 0.0

    def shard_lag(self, now_ms: int) -> pb.ShardLag:
        return pb.ShardLag(
            shard=self.shard,
            coordinator=self.address,
            connected=self.connected,
            applied_lsn=self.applied_lsn,
            durable_lsn=self.durable_lsn,
            lag_events=self.lag_events,
            lag_seconds=self.lag_seconds(now_ms),
        )


def parse_coordinator(spec: str) -> tuple[str, str]:
    """``ADDR`` or ``SHARD=ADDR`` → (shard or "", address)."""
    shard, sep, addr = spec.partition("=")
    if not sep:
        shard, addr = "", spec
    addr = addr.strip()
    host, colon, port = addr.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"--coordinator {spec!r}: expected HOST:PORT or SHARD=HOST:PORT")
    return shard.strip(), addr


class Follower:
    """Follows one shard (or, until its first event names the shard, one address)."""

    def __init__(
        self,
        state: FeedState,
        *,
        apply: Apply,
        start_lsn: Callable[[str], Awaitable[int]],
        transport: TransportSettings | None = None,
        backoff: Backoff = RECONNECT,
        max_batch: int = MAX_BATCH,
        on_shard: Callable[[Follower], None] | None = None,
    ) -> None:
        self.state = state
        self._apply = apply
        self._start_lsn = start_lsn
        self._transport = transport
        self._backoff = backoff
        self._max_batch = max_batch
        self._on_shard = on_shard
        self._moved = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: aio.UnaryStreamCall[pb.SubscribeRequest, pb.SubscribeResponse] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"query-follow:{self.state.shard or self.state.address}"
        )

    def move(self, address: str) -> None:
        """The shard's owner is at ``address`` now ("" while it has none)."""
        if address == self.state.address:
            return
        log.info(
            "event=feed_owner_changed shard=%s from=%s to=%s",
            self.state.shard,
            self.state.address or "-",
            address or "-",
        )
        self.state.address = address
        self._moved.set()
        if self._call is not None:
            self._call.cancel()

    async def stop(self) -> None:
        self._stop.set()
        self._moved.set()
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            address = self.state.address
            if not address:
                self.state.connected = False
                self._moved.clear()
                await self._moved.wait()
                continue
            self._moved.clear()
            try:
                got = await self._follow(address)
            except asyncio.CancelledError:
                raise
            except aio.AioRpcError as e:
                got = False
                if e.code() != grpc.StatusCode.CANCELLED or not self._moved.is_set():
                    self.state.last_error = f"{e.code().name}: {e.details()}"
                    log.warning(
                        "event=feed_broken shard=%s address=%s error=%s",
                        self.state.shard or "?",
                        address,
                        self.state.last_error,
                    )
            except TimeoutError:
                got = False
                self.state.last_error = f"UNAVAILABLE: no connection within {CONNECT_TIMEOUT_S}s"
            except Exception as e:  # the store failed: log, back off, try again
                got = False
                self.state.last_error = f"{type(e).__name__}: {e}"
                log.exception("event=feed_apply_failed shard=%s", self.state.shard)
            finally:
                self.state.connected = False
                self._call = None
            if self._stop.is_set():
                return
            if self._moved.is_set():
                attempt = 0
                continue  # a new owner: go there at once
            attempt = 1 if got else attempt + 1
            self.state.reconnects += 1
            delay = self._backoff.delay(attempt, random.random())
            if await _pause_or(delay, self._stop, self._moved):
                continue

    async def _follow(self, address: str) -> bool:
        """One subscription; True when it delivered something before it ended."""
        got = False
        channel = make_channel(address, self._transport)
        try:
            stub = pb.CoordinatorStub(channel)
            shard = self.state.shard
            from_lsn = await self._start_lsn(shard) if shard else 0
            self.state.applied_lsn = from_lsn
            # The feed sends nothing (not even headers) while there is nothing new: a
            # subscription at the live edge counts as connected once the channel is,
            # and the durable LSN as at least where it starts (a response raises it if
            # the shard is ahead; a refused subscription ends the stream with an error).
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await channel.channel_ready()
            call = stub.Subscribe(
                pb.SubscribeRequest(from_lsn=from_lsn, max_batch=self._max_batch),
                metadata=env_token_metadata(),
            )
            self._call = call
            self.state.connected = True
            self.state.durable_lsn = max(self.state.durable_lsn, from_lsn)
            self.state.heard = time.monotonic()
            log.info(
                "event=feed_connected shard=%s address=%s from_lsn=%d",
                shard or "?",
                address,
                from_lsn,
            )
            async for resp in call:
                self.state.heard = time.monotonic()
                self.state.durable_lsn = resp.durable_lsn
                if not shard and (resp.shard or resp.events):
                    # Learn the shard from the feed's handshake (or, from an older
                    # coordinator, its first event), then resume from its stored LSN.
                    shard = resp.shard or resp.events[0].shard
                    if not shard:
                        raise RuntimeError(f"the feed of {address} names no shard")
                    self.state.shard = shard
                    if self._on_shard is not None:
                        self._on_shard(self)
                    stored = await self._start_lsn(shard)
                    if stored > 0:
                        call.cancel()
                        self.state.applied_lsn = stored
                        self._moved.set()  # resubscribe at once, from the stored LSN
                        return True
                if not resp.events:
                    continue
                got = True
                events = list(resp.events)
                self.state.pending_since_ms = next(
                    (e.unix_ms for e in events if e.lsn > self.state.applied_lsn and e.unix_ms),
                    self.state.pending_since_ms,
                )
                applied = await self._apply(shard, events)
                self.state.events_applied += len(events)
                self.state.applied_lsn = max(self.state.applied_lsn, applied)
                if self.state.applied_lsn >= self.state.durable_lsn:
                    self.state.pending_since_ms = 0
            return got
        finally:
            await channel.close(grace=None)


async def _pause_or(delay: float, stop: asyncio.Event, moved: asyncio.Event) -> bool:
    """Waits ``delay``; True when ``stop`` or ``moved`` came first."""
    either = asyncio.Event()
    waiters = [asyncio.get_running_loop().create_task(_relay(e, either)) for e in (stop, moved)]
    try:
        return await pause(delay, either)
    finally:
        for w in waiters:
            w.cancel()


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
