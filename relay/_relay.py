"""The relay: every shard's feed (``Coordinator/Subscribe``) into one JetStream stream.

One task per shard follows the shard's owner: it subscribes after the shard's position,
publishes each batch of events in LSN order (pipelined: every publish of a batch is
sent, then the acknowledgements are awaited in order) and advances the position only
through the prefix JetStream acknowledged. Any failure (the coordinator gone, NATS
unreachable, a publish not acknowledged in time) ends the subscription; the task backs
off and subscribes again after the position, so events are published again only after
the last acknowledged one, with the ids JetStream already saw.

Which coordinators: with ``--etcd`` the shard map (owners registered under
``/accord/v1/coordinators/``, :func:`accord.registry.find_shards`) is read again every
``refresh_s``; a shard whose owner changed is followed at its new address, from the
same position. With ``--coordinator ADDR`` the shard of each address is learned from
the first event of its feed.

Order: within a batch the publishes are pipelined on one connection, so JetStream
stores them in the order sent. Should one publish fail and a later one of the same
batch succeed, the retry stores the failed one after it (the later one is dropped as a
duplicate): LSN order per shard holds except around such a failure, and the LSN in
every message lets a consumer tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

import accord.v1 as pb
from accord.common.auth import env_token_metadata
from accord.common.retry import Backoff, pause
from accord.common.transport import make_channel
from accord.relay._positions import StreamPositions, js_last_message_id
from accord.relay._subjects import (
    CONTENT_TYPE,
    MSG_ID,
    STREAM_SUBJECTS,
    Format,
    encode,
    is_snapshot,
    message_id,
    subject,
)

log = logging.getLogger("accord.relay")

DEFAULT_STREAM = "ACCORD"
#: JetStream drops a message whose id it stored within this window. It only has to
#: cover a relay's own retries and restarts (the position is the stream itself), so
#: JetStream's default of two minutes is kept.
DEFAULT_DUPLICATE_WINDOW_S = 120.0
READY_LINE = "relay ready"


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    nats_url: str
    #: Static coordinators (one per shard), or ...
    coordinators: tuple[str, ...] = ()
    #: ... an etcd URL to find every shard's owner.
    etcd: str = ""
    stream: str = DEFAULT_STREAM
    fmt: Format = Format.PROTO
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S
    #: How often the shard map is read again from etcd.
    refresh_s: float = 2.0
    #: Events per Subscribe batch.
    max_batch: int = 512
    #: How long the first connection to NATS may take.
    connect_wait_s: float = 30.0
    #: A publish not acknowledged by then ends the subscription (it is retried).
    publish_timeout_s: float = 10.0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.2, max_s=5.0))

    def __post_init__(self) -> None:
        if bool(self.coordinators) == bool(self.etcd):
            raise ValueError("give either --coordinator (one or more) or --etcd")
        if not self.stream or any(c in self.stream for c in ".*> \t"):
            raise ValueError(f"stream name {self.stream!r}: no '.', '*', '>' or spaces")
        if self.duplicate_window_s <= 0:
            raise ValueError("the duplicate window must be positive")
        if not 1 <= self.max_batch <= 4096:
            raise ValueError("max batch must be in 1..4096")


class Publisher:
    """Publishes batches of feed events to the stream (``js``: a nats-py JetStream
    context, or anything with its ``publish_async``)."""

    def __init__(self, js: object, *, stream: str, fmt: Format, timeout_s: float) -> None:
        self.js = js
        self.stream = stream
        self.fmt = fmt
        self.timeout_s = timeout_s
        #: Messages JetStream stored, and those it dropped as duplicates.
        self.stored = 0
        self.duplicates = 0

    async def publish(self, events: Sequence[pb.FeedEvent], position: int) -> int:
        """Publishes ``events`` in order; returns the position after the last one
        acknowledged, from ``position`` (a snapshot's transactions do not move it, its
        end moves it to the snapshot's LSN). The first publish that fails raises
        :class:`PublishFailed`, which says how far it got."""
        pending: list[tuple[pb.FeedEvent, asyncio.Future[object]]] = []
        try:
            for event in events:
                headers = {MSG_ID: message_id(event), CONTENT_TYPE: self.fmt.content_type}
                future = await self.js.publish_async(  # type: ignore[attr-defined]
                    subject(event), encode(event, self.fmt), headers=headers, stream=self.stream
                )
                pending.append((event, future))
            for event, future in pending:
                ack = await asyncio.wait_for(future, self.timeout_s)
                if getattr(ack, "duplicate", False):
                    self.duplicates += 1
                else:
                    self.stored += 1
                if event.kind != pb.FEED_EVENT_KIND_SNAPSHOT:
                    position = event.lsn
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise PublishFailed(position, e) from e
        finally:
            for _, future in pending:
                future.cancel()  # no-op for the answered ones
        return position


class PublishFailed(Exception):
    """A publish failed (or was not acknowledged in time); ``position`` is how far the
    acknowledged prefix got."""

    def __init__(self, position: int, cause: BaseException) -> None:
        super().__init__(f"publish failed after LSN {position}: {type(cause).__name__}: {cause}")
        self.position = position


class ShardFollower:
    """Follows one coordinator's feed into the stream, from the shard's position."""

    def __init__(
        self,
        *,
        address: str,
        shard: str,
        positions: StreamPositions,
        publisher: Publisher,
        settings: RelaySettings,
        position: int | None = None,
    ) -> None:
        self.address = address
        #: "" until learned from the feed (a static coordinator).
        self.shard = shard
        self.positions = positions
        self.publisher = publisher
        self.settings = settings
        #: The LSN the next subscription starts after; None until read from the stream.
        self.position = position
        self.connected = asyncio.Event()

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                if not self.shard:
                    self.shard = await self._learn_shard()
                if self.position is None:
                    self.position = await self.positions.load(self.shard)
                    log.info("event=relay_resume shard=%s from_lsn=%d", self.shard, self.position)
                attempt = 0
                await self._follow()
                reason = "the feed ended"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                reason = f"{e.code().name}: {e.details()}"
            except Exception as e:  # NATS errors, timeouts: all retried the same way
                reason = f"{type(e).__name__}: {e}"
            self.connected.clear()
            attempt += 1
            delay = self.settings.backoff.delay(attempt, random.random())
            log.warning(
                "event=relay_retry shard=%s address=%s position=%s in_s=%.2f reason=%s",
                self.shard or "?",
                self.address,
                self.position,
                delay,
                reason,
            )
            await pause(delay)

    async def _learn_shard(self) -> str:
        """The shard of a static coordinator: that of the first event of its feed."""
        async with make_channel(self.address) as channel:
            call = pb.CoordinatorStub(channel).Subscribe(
                pb.SubscribeRequest(from_lsn=0, max_batch=1), metadata=env_token_metadata()
            )
            try:
                async for resp in call:
                    # The handshake names the shard (an older coordinator's first event).
                    if resp.shard or resp.events:
                        shard: str = resp.shard or resp.events[0].shard
                        log.info("event=relay_shard address=%s shard=%s", self.address, shard)
                        return shard
            finally:
                call.cancel()
        raise ConnectionError(f"the feed of {self.address} ended before its first event")

    async def _follow(self) -> None:
        assert self.position is not None
        async with make_channel(self.address) as channel:
            call = pb.CoordinatorStub(channel).Subscribe(
                pb.SubscribeRequest(from_lsn=self.position, max_batch=self.settings.max_batch),
                metadata=env_token_metadata(),
            )
            try:
                async for resp in call:
                    self.connected.set()
                    events = [e for e in resp.events if is_snapshot(e) or e.lsn > self.position]
                    for e in events:
                        if e.shard != self.shard:
                            raise ValueError(
                                f"{self.address} sends events of shard {e.shard!r}, "
                                f"not {self.shard!r}"
                            )
                    if events:
                        try:
                            self.position = await self.publisher.publish(events, self.position)
                        except PublishFailed as e:
                            self.position = e.position
                            raise
            finally:
                call.cancel()


class Relay:
    """Runs a :class:`ShardFollower` per shard until ``stop`` is set."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.followers: dict[str, ShardFollower] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        import nats

        s = self.settings
        try:
            # Reconnecting for ever once connected; a first connection has a bound, so a
            # wrong URL is a one-line failure rather than a silent wait.
            async with asyncio.timeout(s.connect_wait_s):
                nc = await nats.connect(
                    s.nats_url,
                    name="accord-relay",
                    connect_timeout=5,
                    reconnect_time_wait=0.5,
                    max_reconnect_attempts=-1,
                )
        except TimeoutError:
            raise ConnectionError(
                f"NATS at {s.nats_url} unreachable for {s.connect_wait_s:g} s"
            ) from None
        try:
            js = nc.jetstream()
            await ensure_stream(js, s.stream, s.duplicate_window_s)
            publisher = Publisher(js, stream=s.stream, fmt=s.fmt, timeout_s=s.publish_timeout_s)
            positions = StreamPositions(js_last_message_id(js, s.stream))
            print(f"{READY_LINE}: stream {s.stream} on {s.nats_url}", flush=True)
            while not stop.is_set():
                for key, address, shard in await self._targets():
                    self._follow(key, address, shard, positions, publisher)
                if s.coordinators and not s.etcd:
                    await stop.wait()  # a static list never changes
                else:
                    await pause(s.refresh_s, stop)
        finally:
            for task in self._tasks.values():
                task.cancel()
            for task in self._tasks.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await nc.close()

    async def _targets(self) -> list[tuple[str, str, str]]:
        """(key, address, shard) of every feed to follow; the key names the follower."""
        s = self.settings
        if not s.etcd:
            return [(address, address, "") for address in s.coordinators]
        from accord.registry import find_shards

        try:
            shard_map = await find_shards(s.etcd)
        except ConnectionError as e:
            log.warning("event=relay_etcd_unreachable error=%s", e)
            return [(k, f.address, f.shard) for k, f in self.followers.items()]
        return [(shard, info.address, shard) for shard, info in shard_map.owners.items()]

    def _follow(
        self,
        key: str,
        address: str,
        shard: str,
        positions: StreamPositions,
        publisher: Publisher,
    ) -> None:
        current = self.followers.get(key)
        if current is not None and current.address == address:
            return
        position = None
        if current is not None:  # the shard has a new owner: go on from where we are
            self._tasks.pop(key).cancel()
            position = current.position
            log.info(
                "event=relay_owner_changed shard=%s address=%s position=%s",
                shard,
                address,
                position,
            )
        follower = ShardFollower(
            address=address,
            shard=shard,
            positions=positions,
            publisher=publisher,
            settings=self.settings,
            position=position,
        )
        self.followers[key] = follower
        self._tasks[key] = asyncio.get_running_loop().create_task(
            follower.run(), name=f"relay:{key}"
        )


async def ensure_stream(js: object, name: str, duplicate_window_s: float) -> None:
    """Creates the stream (subjects ``accord.>``, file storage, the duplicate window)
    unless it exists; an existing one is left as it is, but must take ``accord.>``."""
    from nats.js import JetStreamContext
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    assert isinstance(js, JetStreamContext)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=name,
                description="Accord's shard feeds, published by `accord relay`",
                subjects=[STREAM_SUBJECTS],
                storage=StorageType.FILE,
                duplicate_window=duplicate_window_s,
            )
        )
        log.info(
            "event=relay_stream_created stream=%s duplicate_window_s=%g", name, duplicate_window_s
        )
        return
    if STREAM_SUBJECTS not in (info.config.subjects or []):
        raise ValueError(
            f"stream {name} exists with subjects {info.config.subjects}, not {STREAM_SUBJECTS}"
        )
