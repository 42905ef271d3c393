"""Watchers of one transaction (``WatchTransaction``): each gets the state when it
starts watching, then every durable change with the LSN that made it durable, until a
final state. A watcher too slow to keep up (its queue full) is dropped, never waited
for: a watcher must not slow the write path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import accord.v1 as pb
from accord.coordinator._errors import ResourceExhausted
from accord.coordinator._host import Clock
from accord.coordinator._model import Txn
from accord.coordinator._states import TxnState


class Watchers:
    """``max_watchers``: watchers at once, over every transaction and caller; one more
    is refused with RESOURCE_EXHAUSTED before its first event."""

    def __init__(self, *, clock: Clock, queue_size: int, max_watchers: int = 1000) -> None:
        self._clock = clock
        self._queue_size = queue_size
        self._max_watchers = max_watchers
        self.active = 0

    def event(self, txn: Txn) -> pb.TransactionEvent:
        """A snapshot of ``txn`` now (its state, LSN and the transaction)."""
        return pb.TransactionEvent(
            gid=txn.gid,
            lsn=txn.lsn,
            state=int(txn.state),  # type: ignore[arg-type]
            unix_ms=self._clock.now_ms(),
            transaction=txn.to_pb(),
        )

    async def watch(self, txn: Txn) -> AsyncIterator[pb.TransactionEvent]:
        if self.active >= self._max_watchers:
            raise ResourceExhausted(
                f"{self.active} WatchTransaction streams are open (limit {self._max_watchers})"
            )
        queue: asyncio.Queue[pb.TransactionEvent | None] = asyncio.Queue(self._queue_size)
        txn.watchers.append(queue)
        self.active += 1
        try:
            yield self.event(txn)
            if txn.state.final:
                return
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
                if TxnState(event.state).final:
                    return
        finally:
            self.active -= 1
            if queue in txn.watchers:
                txn.watchers.remove(queue)

    def publish(self, txn: Txn) -> None:
        """Tells every watcher of ``txn`` (call only when ``txn.watchers``)."""
        event = self.event(txn)
        for q in list(txn.watchers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                txn.watchers.remove(q)  # a watcher too slow to keep up is dropped
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)
