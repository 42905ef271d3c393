"""The engine's WAL record types (the WAL itself only sees opaque typed payloads)."""

from __future__ import annotations

import enum

from google.protobuf.message import Message

import accord.v1 as pb


class RecordType(enum.IntEnum):
    BEGIN = 16
    PREPARE = 17
    COMMIT = 18
    ABORT = 19
    END = 20
    SAGA_START = 21
    SAGA_STEP = 22
    SAGA_STATE = 23

    def decode(self, payload: bytes) -> Record:
        cls: type[Message] = _CLASSES[self]
        return cls.FromString(payload)  # type: ignore[return-value]


_CLASSES: dict[RecordType, type[Message]] = {
    RecordType.BEGIN: pb.WalBegin,
    RecordType.PREPARE: pb.WalPrepare,
    RecordType.COMMIT: pb.WalCommit,
    RecordType.ABORT: pb.WalAbort,
    RecordType.END: pb.WalEnd,
    RecordType.SAGA_START: pb.WalSagaStart,
    RecordType.SAGA_STEP: pb.WalSagaStep,
    RecordType.SAGA_STATE: pb.WalSagaState,
}

Record = (
    pb.WalBegin
    | pb.WalPrepare
    | pb.WalCommit
    | pb.WalAbort
    | pb.WalEnd
    | pb.WalSagaStart
    | pb.WalSagaStep
    | pb.WalSagaState
)

RT_BEGIN = RecordType.BEGIN
RT_PREPARE = RecordType.PREPARE
RT_COMMIT = RecordType.COMMIT
RT_ABORT = RecordType.ABORT
RT_END = RecordType.END
RT_SAGA_START = RecordType.SAGA_START
RT_SAGA_STEP = RecordType.SAGA_STEP
RT_SAGA_STATE = RecordType.SAGA_STATE
