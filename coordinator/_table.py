"""The transaction table: every live and recently finished transaction, by gid, and the
idempotency-key index. In memory only; the WAL (through the engine) is what survives.

Idempotency keys are per caller (``Txn.caller``): the index is keyed by (caller, key), so
one tenant cannot reach another's transaction by guessing its key, and the same key from
two callers names two transactions. With auth off every caller is "".

The metrics endpoint reads it from another thread: :meth:`TxnTable.live` copies the live
set with one C call under the GIL, then does only single look-ups.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

import accord.v1 as pb
from accord.coordinator._errors import AlreadyExists, ResourceExhausted
from accord.coordinator._model import Txn
from accord.coordinator._states import TxnState


class TxnTable:
    def __init__(
        self, *, retain_finished: int, max_inflight: int, max_inflight_per_caller: int = 0
    ) -> None:
        self._retain = retain_finished
        self._max_inflight = max_inflight
        self._max_per_caller = max_inflight_per_caller
        self._txns: dict[str, Txn] = {}
        self._live: set[str] = set()
        #: Finished gids, oldest first; beyond ``retain_finished`` they are forgotten.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._keys: dict[tuple[str, str], str] = {}
        #: Unfinished transactions per caller (callers other than "" only).
        self._per_caller: Counter[str] = Counter()

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

    def gid_for_key(self, key: str, caller: str = "") -> str | None:
        return self._keys.get((caller, key))

    def keys(self, caller: str = "") -> list[str]:
        """The idempotency keys known of ``caller``."""
        return [k for c, k in self._keys if c == caller]

    def inflight_of(self, caller: str) -> int:
        return self._per_caller[caller]

    def page(
        self,
        states: Sequence[TxnState],
        limit: int,
        page_token: str,
        *,
        caller: str | None = None,
    ) -> tuple[list[Txn], str]:
        """Up to ``limit`` transactions after ``page_token`` in gid order, in one of
        ``states`` (all when empty), and the token of the next page ("" at the end).
        ``caller``: only that caller's (and those of the caller "")."""
        wanted = set(states)
        gids = sorted(g for g in self._txns if g > page_token)
        out: list[Txn] = []
        for gid in gids:
            txn = self._txns[gid]
            if wanted and txn.state not in wanted:
                continue
            if caller is not None and txn.caller not in ("", caller):
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

    def check_capacity(self, caller: str = "") -> None:
        if len(self._live) >= self._max_inflight:
            raise ResourceExhausted(
                f"{len(self._live)} transactions in flight (limit {self._max_inflight})"
            )
        if caller and self._max_per_caller and self._per_caller[caller] >= self._max_per_caller:
            raise ResourceExhausted(
                f"caller {caller!r} has {self._per_caller[caller]} transactions in flight "
                f"(limit {self._max_per_caller} per caller: --max-inflight-per-caller)"
            )

    def by_key(self, key: str, digest: bytes, caller: str = "") -> Txn | None:
        """The transaction ``caller``'s idempotency key already names; ALREADY_EXISTS
        when it was used for another request."""
        gid = self._keys.get((caller, key))
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
        self._set_live(txn, True)
        if txn.key:
            self._keys[(txn.caller, txn.key)] = txn.gid

    def index_key(self, txn: Txn) -> None:
        """``txn``'s idempotency key became known (a replayed record carried it)."""
        if txn.key:
            self._keys[(txn.caller, txn.key)] = txn.gid

    def _set_live(self, txn: Txn, live: bool) -> None:
        was = txn.gid in self._live
        if live == was:
            return
        if live:
            self._live.add(txn.gid)
        else:
            self._live.discard(txn.gid)
        if txn.caller:
            self._per_caller[txn.caller] += 1 if live else -1
            if self._per_caller[txn.caller] <= 0:
                del self._per_caller[txn.caller]

    def _unkey(self, txn: Txn) -> None:
        k = (txn.caller, txn.key)
        if txn.key and self._keys.get(k) == txn.gid:
            del self._keys[k]

    def forget(self, txn: Txn) -> None:
        """Drops a transaction nobody heard of (its first record never became durable)."""
        self._txns.pop(txn.gid, None)
        self._set_live(txn, False)
        self._unkey(txn)

    def finish(self, txn: Txn) -> None:
        """``txn`` reached a final state: kept for look-ups until ``retain_finished``
        newer ones push it out."""
        txn.finished.set()
        txn.decided.set()
        self._set_live(txn, False)
        self._finished[txn.gid] = None
        while len(self._finished) > self._retain:
            old, _ = self._finished.popitem(last=False)
            gone = self._txns.pop(old, None)
            if gone is not None:
                self._unkey(gone)
