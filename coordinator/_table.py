"""The transaction table: every live and recently finished transaction, by gid, and the
idempotency-key index. In memory only; the WAL (through the engine) is what survives.

The metrics endpoint reads it from another thread: :meth:`TxnTable.live` copies the live
set with one C call under the GIL, then does only single look-ups.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import accord.v1 as pb
from accord.coordinator._errors import AlreadyExists, ResourceExhausted
from accord.coordinator._model import Txn
from accord.coordinator._states import TxnState


class TxnTable:
    def __init__(self, *, retain_finished: int, max_inflight: int) -> None:
        self._retain = retain_finished
        self._max_inflight = max_inflight
        self._txns: dict[str, Txn] = {}
        self._live: set[str] = set()
        #: Finished gids, oldest first; beyond ``retain_finished`` they are forgotten.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._keys: dict[str, str] = {}

    # ------------------------------------------------------------------ views

    def find(self, gid: str) -> Txn | None:
        return self._txns.get(gid)

    @property
    def inflight(self) -> int:
        return len(self._live)

    def live(self) -> list[Txn]:
        """The unfinished transactions (safe from another thread)."""
        txns = self._txns
        return [t for t in (txns.get(g) for g in list(self._live)) if t is not None]

    def unfinished(self) -> list[Txn]:
        """The unfinished transactions in gid order (recovery drives them)."""
        return [self._txns[g] for g in sorted(self._live)]

    def all(self) -> Iterable[Txn]:
        return self._txns.values()

    def gid_for_key(self, key: str) -> str | None:
        return self._keys.get(key)

    def keys(self) -> list[str]:
        """The idempotency keys known."""
        return list(self._keys)

    def page(
        self, states: Sequence[TxnState], limit: int, page_token: str
    ) -> tuple[list[Txn], str]:
        """Up to ``limit`` transactions after ``page_token`` in gid order, in one of
        ``states`` (all when empty), and the token of the next page ("" at the end)."""
        wanted = set(states)
        gids = sorted(g for g in self._txns if g > page_token)
        out: list[Txn] = []
        for gid in gids:
            txn = self._txns[gid]
            if wanted and txn.state not in wanted:
                continue
            out.append(txn)
            if len(out) == limit:
                return out, gid
        return out, ""

    def checkpoint_entries(self) -> list[pb.CheckpointTxn]:
        """What a checkpoint keeps: every unfinished transaction, and the finished ones
        still answering for an idempotency key."""
        entries = [self._txns[g].checkpoint_entry() for g in self._live]
        entries += [self._txns[g].checkpoint_entry() for g in self._finished if self._txns[g].key]
        return entries

    # ------------------------------------------------------------------ changes

    def check_capacity(self) -> None:
        if len(self._live) >= self._max_inflight:
            raise ResourceExhausted(
                f"{len(self._live)} transactions in flight (limit {self._max_inflight})"
            )

    def by_key(self, key: str, digest: bytes) -> Txn | None:
        """The transaction an idempotency key already names; ALREADY_EXISTS when it was
        used for another request."""
        gid = self._keys.get(key)
        if gid is None:
            return None
        txn = self._txns[gid]
        if txn.digest != digest:
            raise AlreadyExists(
                f"idempotency key {key!r} was used for a different request (transaction {gid})"
            )
        return txn

    def admit(self, txn: Txn) -> None:
        self._txns[txn.gid] = txn
        self._live.add(txn.gid)
        if txn.key:
            self._keys[txn.key] = txn.gid

    def index_key(self, txn: Txn) -> None:
        """``txn``'s idempotency key became known (a replayed record carried it)."""
        if txn.key:
            self._keys[txn.key] = txn.gid

    def forget(self, txn: Txn) -> None:
        """Drops a transaction nobody heard of (its first record never became durable)."""
        self._txns.pop(txn.gid, None)
        self._live.discard(txn.gid)
        if txn.key and self._keys.get(txn.key) == txn.gid:
            del self._keys[txn.key]

    def finish(self, txn: Txn) -> None:
        """``txn`` reached a final state: kept for look-ups until ``retain_finished``
        newer ones push it out."""
        txn.finished.set()
        txn.decided.set()
        self._live.discard(txn.gid)
        self._finished[txn.gid] = None
        while len(self._finished) > self._retain:
            old, _ = self._finished.popitem(last=False)
            gone = self._txns.pop(old, None)
            if gone is not None and gone.key and self._keys.get(gone.key) == old:
                del self._keys[gone.key]
