"""FeedEvent builders for the query service's unit tests (what a coordinator's feed
sends for each WAL record)."""

from __future__ import annotations

import accord.v1 as pb

K = pb.FeedEventKind
T0 = 1_699_999_980_000  # a whole minute


def begun(gid: str, lsn: int, *, key: str = "", shard: str = "s1", t: int = 0) -> pb.FeedEvent:
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_BEGUN,
        gid=gid,
        protocol=pb.PROTOCOL_TWO_PHASE_COMMIT,
        state=pb.TXN_STATE_ACTIVE,
        unix_ms=T0 + t,
        idempotency_key=key,
        created_unix_ms=T0 + t,
        trace_id="ab" * 16,
    )


def preparing(
    gid: str,
    lsn: int,
    services: list[str],
    *,
    one_phase: bool = False,
    key: str = "",
    shard: str = "s1",
    t: int = 0,
    created: int | None = None,
) -> pb.FeedEvent:
    e = pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_PREPARING,
        gid=gid,
        protocol=pb.PROTOCOL_TWO_PHASE_COMMIT,
        state=pb.TXN_STATE_PREPARING,
        unix_ms=T0 + t,
        idempotency_key=key,
        created_unix_ms=T0 + (t if created is None else created),
        one_phase=one_phase,
    )
    for i, s in enumerate(services):
        e.branches.add(
            branch=pb.Branch(service=s, operation="transfer", branch_id=f"b{i + 1}"),
            state=pb.BRANCH_STATE_PENDING,
            resolved_address=f"127.0.0.1:{7100 + i}",
        )
    return e


def commit(gid: str, lsn: int, ids: list[str], *, shard: str = "s1", t: int = 0) -> pb.FeedEvent:
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_COMMIT,
        gid=gid,
        protocol=pb.PROTOCOL_TWO_PHASE_COMMIT,
        state=pb.TXN_STATE_COMMITTING,
        unix_ms=T0 + t,
        commit_branch_ids=ids,
    )


def abort(gid: str, lsn: int, reason: str, *, shard: str = "s1", t: int = 0) -> pb.FeedEvent:
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_ABORT,
        gid=gid,
        protocol=pb.PROTOCOL_TWO_PHASE_COMMIT,
        state=pb.TXN_STATE_ABORTING,
        unix_ms=T0 + t,
        reason=reason,
    )


def ended(
    gid: str,
    lsn: int,
    state: int,
    *,
    branches: dict[str, int] | None = None,
    reason: str = "",
    shard: str = "s1",
    t: int = 0,
) -> pb.FeedEvent:
    e = pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_ENDED,
        gid=gid,
        protocol=pb.PROTOCOL_TWO_PHASE_COMMIT,
        state=state,  # type: ignore[arg-type]
        unix_ms=T0 + t,
        reason=reason,
    )
    for bid, st in (branches or {}).items():
        e.branches.add(branch=pb.Branch(branch_id=bid), state=st)
    return e


def saga_started(
    gid: str, lsn: int, steps: list[tuple[str, str]], *, shard: str = "s1", t: int = 0
) -> pb.FeedEvent:
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_SAGA_STARTED,
        gid=gid,
        protocol=pb.PROTOCOL_SAGA,
        state=pb.TXN_STATE_RUNNING,
        unix_ms=T0 + t,
        created_unix_ms=T0 + t,
        definition=pb.SagaDefinition(
            steps=[
                pb.SagaStep(name=n, service=s, action="do", compensation="undo") for n, s in steps
            ]
        ),
    )


def step(
    gid: str,
    lsn: int,
    index: int,
    state: int,
    *,
    attempts: int = 1,
    error: str = "",
    saga: int = pb.TXN_STATE_RUNNING,
    shard: str = "s1",
    t: int = 0,
) -> pb.FeedEvent:
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_STEP,
        gid=gid,
        protocol=pb.PROTOCOL_SAGA,
        state=saga,  # type: ignore[arg-type]
        unix_ms=T0 + t,
        step=index,
        step_status=pb.StepStatus(state=state, attempts=attempts, last_error=error),  # type: ignore[arg-type]
    )


def saga_state(
    gid: str, lsn: int, state: int, *, reason: str = "", shard: str = "s1", t: int = 0
) -> pb.FeedEvent:
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_SAGA_STATE,
        gid=gid,
        protocol=pb.PROTOCOL_SAGA,
        state=state,  # type: ignore[arg-type]
        unix_ms=T0 + t,
        reason=reason,
    )


def snapshot(txn: pb.Transaction, lsn: int, *, shard: str = "s1") -> pb.FeedEvent:
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=K.FEED_EVENT_KIND_SNAPSHOT,
        gid=txn.gid,
        protocol=txn.protocol,
        state=txn.state,
        transaction=txn,
    )


def snapshot_end(lsn: int, *, shard: str = "s1") -> pb.FeedEvent:
    return pb.FeedEvent(shard=shard, lsn=lsn, kind=K.FEED_EVENT_KIND_SNAPSHOT_END)


def two_pc(
    gid: str,
    lsn: int,
    services: list[str],
    *,
    t: int = 0,
    dur: int = 10,
    shard: str = "s1",
    key: str = "",
) -> list[pb.FeedEvent]:
    """A committed two-branch 2PC transaction: 3 events from ``lsn``."""
    ids = [f"b{i + 1}" for i in range(len(services))]
    return [
        preparing(gid, lsn, services, t=t, shard=shard, key=key),
        commit(gid, lsn + 1, ids, t=t + dur // 2, shard=shard),
        ended(gid, lsn + 2, pb.TXN_STATE_COMMITTED, t=t + dur, shard=shard),
    ]
