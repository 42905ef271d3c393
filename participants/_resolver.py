"""The in-doubt resolver (DESIGN guarantee 3, presumed abort).

The coordinator logs its branch list without forcing it, so after a coordinator crash
nobody may ever tell a prepared participant the outcome. This background task finds
branches held PREPARED for longer than ``after_s`` and asks the coordinator named in
their Prepare (``Coordinator.QueryOutcome``): COMMITTED → commit, ABORTED → abort, both
through :meth:`ParticipantService.call` exactly like an incoming Commit/Abort (barrier
included, so a racing coordinator call is harmless). IN_PROGRESS, an unreachable
coordinator or any error → ask again later, backing off per gid on the schedule every
retry in Accord uses (:class:`accord.common.retry.Backoff`; no jitter here: one pass
asks for many gids at once anyway).

After a failover the coordinator named in the Prepare is gone for good, and its shard
has a new owner. When the named one cannot be reached and the participant runs with
etcd, the resolver asks the shard's current owner, found there (``find_owner``). That
owner replayed the shard's WAL, so its answer is the shard's answer: an unknown gid
means no decision was ever durable, so abort.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc import aio

import accord.v1 as pb
from accord.common.retry import Backoff
from accord.common.transport import TransportSettings, make_channel
from accord.participants._barrier import BranchRecord
from accord.participants._service import ParticipantService
from accord.participants._types import BranchCall, Op, Status

log = logging.getLogger("accord.participant.resolver")

#: Answers that say the coordinator asked is not there (any more).
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class _Waiting:
    """A gid asked about ``attempts`` times in a row without an answer."""

    next_at: float
    attempts: int


class InDoubtResolver:
    """Start with :meth:`start`, stop with :meth:`close` (safe twice). :meth:`run_once`
    does one pass (tests call it directly)."""

    def __init__(
        self,
        service: ParticipantService,
        *,
        after_s: float = 10.0,
        interval_s: float | None = None,
        max_backoff_s: float = 30.0,
        query_timeout_s: float = 5.0,
        transport: TransportSettings | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        find_owner: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        self._service = service
        self.find_owner = find_owner
        self.after_s = after_s
        self.interval_s = interval_s if interval_s is not None else min(1.0, max(0.05, after_s / 4))
        #: The first retry waits one pass interval, each next one twice as long.
        self._schedule = Backoff(
            initial_s=self.interval_s, max_s=max_backoff_s, multiplier=2.0, jitter=0.0
        )
        self._query_timeout_s = query_timeout_s
        self._transport = transport
        self._monotonic = monotonic
        self._channels: dict[str, tuple[aio.Channel, pb.CoordinatorStub]] = {}
        self._backoff: dict[tuple[str, str], _Waiting] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="accord-in-doubt-resolver")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() neither raises the task's CancelledError nor swallows our own.
            await asyncio.wait([task])
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=resolver_pass_failed")
            await asyncio.sleep(self.interval_s)

    async def run_once(self) -> int:
        """One pass over the in-doubt branches; returns how many it resolved."""
        branches = await self._service.in_doubt(self.after_s)
        live = {(b.coordinator_address, b.gid) for b in branches}
        for key in [k for k in self._backoff if k not in live]:
            del self._backoff[key]
        now = self._monotonic()
        by_gid: dict[tuple[str, str], list[BranchRecord]] = {}
        for branch in branches:
            key = (branch.coordinator_address, branch.gid)
            backoff = self._backoff.get(key)
            if backoff is None or backoff.next_at <= now:
                by_gid.setdefault(key, []).append(branch)
        if not by_gid:
            return 0
        done = await asyncio.gather(*(self._resolve(k, bs) for k, bs in by_gid.items()))
        return sum(done)

    async def _resolve(self, key: tuple[str, str], branches: list[BranchRecord]) -> int:
        address, gid = key
        if not address:
            self._later(key, "no coordinator_address in the Prepare: cannot ask")
            return 0
        try:
            reply = await self._query(address, gid)
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, aio.AioRpcError) else None
            owner = await self._owner(branches[0].shard) if code in _GONE else None
            if owner is None or owner == address:
                self._later(key, f"QueryOutcome failed: {code} {err}")
                return 0
            try:
                reply = await self._query(owner, gid)
            except grpc.RpcError as err2:
                self._later(key, f"QueryOutcome failed at {address} and at owner {owner}: {err2}")
                return 0
            log.info(
                "event=in_doubt_asked_owner gid=%s shard=%s owner=%s", gid, branches[0].shard, owner
            )
        except ValueError as err:  # e.g. plain text refused towards a non-loopback address
            self._later(key, f"cannot reach {address}: {err}")
            return 0
        if reply.outcome == pb.OUTCOME_COMMITTED:
            op = Op.COMMIT
        elif reply.outcome == pb.OUTCOME_ABORTED:
            op = Op.ABORT
        else:
            self._later(key, f"outcome {pb.Outcome.Name(reply.outcome)}")
            return 0
        resolved = 0
        for branch in branches:
            call = BranchCall(
                gid=branch.gid,
                branch_id=branch.branch_id,
                operation=branch.operation,
                payload=branch.payload,
                shard=branch.shard,
                epoch=branch.epoch,
                coordinator_address=branch.coordinator_address,
            )
            # fence=False: this is the coordinator's recorded outcome, asked for by us,
            # not a command from a possibly deposed coordinator.
            result = await self._service.call(op, call, fence=False)
            if result.status is Status.OK:
                resolved += 1
            else:
                self._later(key, f"{op.value} not applied: {result.status} {result.message}")
        if resolved == len(branches):
            self._backoff.pop(key, None)
        log.info(
            "event=in_doubt_resolved gid=%s outcome=%s branches=%d coordinator=%s",
            gid,
            op.value,
            resolved,
            address,
        )
        return resolved

    async def _query(self, address: str, gid: str) -> pb.QueryOutcomeResponse:
        reply: pb.QueryOutcomeResponse = await self._stub(address).QueryOutcome(
            pb.QueryOutcomeRequest(gid=gid), timeout=self._query_timeout_s
        )
        return reply

    async def _owner(self, shard: str) -> str | None:
        if self.find_owner is None or not shard:
            return None
        try:
            return await self.find_owner(shard)
        except Exception as e:  # the registry is down: ask again later
            log.warning("event=owner_lookup_failed shard=%s error=%s", shard, e)
            return None

    def _later(self, key: tuple[str, str], why: str) -> None:
        waiting = self._backoff.get(key)
        attempts = 1 if waiting is None else waiting.attempts + 1
        delay = self._schedule.delay(attempts)
        self._backoff[key] = _Waiting(next_at=self._monotonic() + delay, attempts=attempts)
        log.warning(
            "event=in_doubt_retry gid=%s coordinator=%s retry_in_s=%.2f reason=%s",
            key[1],
            key[0],
            delay,
            why,
        )

    def _stub(self, address: str) -> pb.CoordinatorStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = make_channel(address, self._transport)
            entry = (channel, pb.CoordinatorStub(channel))
            self._channels[address] = entry
        return entry[1]
