"""Rebuilding the transaction table from a checkpoint image and the WAL records after it.

Dispatch is by record type: each record type belongs to the mode that writes it
(``Mode.records``), which applies it to its transaction; what follows from the state it
enters (the decided/finished events, the table's bookkeeping) is the engine's, the same
as for a live state change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import accord.v1 as pb
from accord.coordinator._host import Mode
from accord.coordinator._model import Txn
from accord.coordinator._records import Record, RecordType
from accord.coordinator._states import TxnState
from accord.coordinator._table import TxnTable

log = logging.getLogger("accord.coordinator.engine")

_Field = Literal["begin", "prepare", "commit", "abort", "end", "saga", "steps", "saga_state"]

#: A checkpoint entry's fields, in the order their records were written; ``steps`` is
#: repeated (one record per saga step).
_CHECKPOINT_FIELDS: tuple[tuple[_Field, RecordType], ...] = (
    ("begin", RecordType.BEGIN),
    ("prepare", RecordType.PREPARE),
    ("commit", RecordType.COMMIT),
    ("abort", RecordType.ABORT),
    ("end", RecordType.END),
    ("saga", RecordType.SAGA_START),
    ("steps", RecordType.SAGA_STEP),
    ("saga_state", RecordType.SAGA_STATE),
)


class Replay:
    """Applies records to ``table``; ``enter(txn, state, lsn)`` is the engine's state
    change without the log (the record is already there), ``finish(txn)`` its end."""

    def __init__(
        self,
        table: TxnTable,
        modes: Iterable[Mode],
        *,
        enter: Callable[[Txn, TxnState, int], None],
        finish: Callable[[Txn], None],
    ) -> None:
        self._table = table
        self._by_type: dict[RecordType, Mode] = {rt: m for m in modes for rt in m.records}
        self._enter = enter
        self._finish = finish

    def checkpoint(self, image: bytes) -> None:
        cp = pb.CheckpointImage.FromString(image)
        lsn = cp.lsn
        for entry in cp.transactions:
            for name, rtype in _CHECKPOINT_FIELDS:
                if name == "steps":
                    for step in entry.steps:
                        self.apply(rtype, step, lsn)
                elif entry.HasField(name):
                    self.apply(rtype, getattr(entry, name), lsn)

    def records(self, records: Sequence[tuple[int, int, bytes]]) -> None:
        for lsn, rtype, payload in records:
            kind = RecordType(rtype)
            self.apply(kind, kind.decode(payload), lsn)

    def apply(self, rtype: RecordType, rec: Record, lsn: int) -> None:
        table = self._table
        txn = table.find(rec.gid)
        out = self._by_type[rtype].replay(rtype, rec, txn)
        if out is None:
            log.warning(
                "event=replay_unknown_gid record=%s lsn=%d gid=%s (ignored)",
                rtype.name,
                lsn,
                rec.gid,
            )
            return
        got, state = out
        if got is not txn:
            table.admit(got)
        else:
            table.index_key(got)
        if state is None:
            got.lsn = lsn
            return
        self._enter(got, state, lsn)
        if state.final:
            self._finish(got)
