"""The projection, kind by kind: FeedEvents -> the read model's row and timeline."""

from __future__ import annotations

import accord.v1 as pb
from accord.query._project import TxnRow, project
from tests.unit import _query_events as ev

NOW = ev.T0 + 999_999


def run(
    events: list[pb.FeedEvent], row: TxnRow | None = None
) -> tuple[TxnRow | None, list[pb.TimelineEntry]]:
    timeline = []
    for e in events:
        out = project(e, row, now_ms=NOW)
        if out is not None:
            row = out.row
            timeline.append(out.entry)
    return row, timeline


def branch_states(row: TxnRow) -> list[int]:
    return [b.state for b in row.txn.branches]


def test_2pc_commit():
    row, tl = run(
        [
            ev.begun("s1:a", 1, key="k1"),
            ev.preparing("s1:a", 2, ["bank-a", "bank-b"], t=1, created=0),
            ev.commit("s1:a", 3, ["b1", "b2"], t=5),
            ev.ended("s1:a", 4, pb.TXN_STATE_COMMITTED, t=12),
        ]
    )
    assert row is not None
    assert row.state == pb.TXN_STATE_COMMITTED
    assert branch_states(row) == [pb.BRANCH_STATE_COMMITTED] * 2
    assert row.ended_ms == ev.T0 + 12 and row.duration_ms == 12
    assert row.services == ("bank-a", "bank-b")
    assert row.txn.idempotency_key == "k1"
    assert row.trace_id == "ab" * 16
    assert row.last_lsn == 4 and row.txn.lsn == 4
    s = row.summary()
    assert s.branches == 2 and s.shard == "s1" and s.protocol == pb.PROTOCOL_TWO_PHASE_COMMIT
    assert [e.kind for e in tl] == [
        pb.FEED_EVENT_KIND_BEGUN,
        pb.FEED_EVENT_KIND_PREPARING,
        pb.FEED_EVENT_KIND_COMMIT,
        pb.FEED_EVENT_KIND_ENDED,
    ]
    assert [e.state for e in tl] == [
        pb.TXN_STATE_ACTIVE,
        pb.TXN_STATE_PREPARING,
        pb.TXN_STATE_COMMITTING,
        pb.TXN_STATE_COMMITTED,
    ]
    assert row.txn.branches[1].resolved_address == "127.0.0.1:7101"


def test_2pc_commit_decision_marks_read_only_branches():
    row, _ = run([ev.preparing("s1:a", 1, ["bank-a", "bank-b"]), ev.commit("s1:a", 2, ["b2"])])
    assert row is not None
    assert row.state == pb.TXN_STATE_COMMITTING
    assert branch_states(row) == [pb.BRANCH_STATE_READ_ONLY, pb.BRANCH_STATE_PREPARED]
    assert row.ended_ms == 0 and row.duration_ms == 0


def test_2pc_abort_with_no_vote():
    why = "branch b2 voted no: insufficient funds"
    row, tl = run(
        [
            ev.preparing("s1:a", 1, ["bank-a", "bank-b"]),
            ev.abort("s1:a", 2, why, t=3),
            ev.ended(
                "s1:a",
                3,
                pb.TXN_STATE_ABORTED,
                branches={"b1": pb.BRANCH_STATE_ABORTED, "b2": pb.BRANCH_STATE_REFUSED},
                reason=why,
                t=4,
            ),
        ]
    )
    assert row is not None
    assert row.state == pb.TXN_STATE_ABORTED and row.txn.reason == why
    assert branch_states(row) == [pb.BRANCH_STATE_ABORTED, pb.BRANCH_STATE_REFUSED]
    assert tl[1].error == why and tl[1].state == pb.TXN_STATE_ABORTING


def test_2pc_one_phase_and_read_only():
    row, _ = run(
        [
            ev.preparing("s1:a", 1, ["bank-a"], one_phase=True),
            ev.ended("s1:a", 2, pb.TXN_STATE_COMMITTED),
        ]
    )
    assert row is not None and row.txn.one_phase
    assert branch_states(row) == [pb.BRANCH_STATE_COMMITTED]
    # All read-only: COMMITTED straight from PREPARING, the branches say READ_ONLY.
    row, _ = run(
        [
            ev.preparing("s1:b", 3, ["bank-a", "bank-b"]),
            ev.ended(
                "s1:b",
                4,
                pb.TXN_STATE_COMMITTED,
                branches={"b1": pb.BRANCH_STATE_READ_ONLY, "b2": pb.BRANCH_STATE_READ_ONLY},
            ),
        ]
    )
    assert row is not None and row.state == pb.TXN_STATE_COMMITTED
    assert branch_states(row) == [pb.BRANCH_STATE_READ_ONLY] * 2
    # An END that lists no branch: pending ones take the outcome (as the coordinator's
    # replay does).
    row, _ = run([ev.preparing("s1:c", 5, ["bank-a"]), ev.ended("s1:c", 6, pb.TXN_STATE_ABORTED)])
    assert row is not None and branch_states(row) == [pb.BRANCH_STATE_ABORTED]


def test_saga_completes():
    row, tl = run(
        [
            ev.saga_started("s1:g", 1, [("debit", "bank-a"), ("credit", "bank-b")]),
            ev.step("s1:g", 2, 0, pb.BRANCH_STATE_RUNNING),
            ev.step("s1:g", 3, 0, pb.BRANCH_STATE_SUCCEEDED),
            ev.step("s1:g", 4, 1, pb.BRANCH_STATE_RUNNING, attempts=1),
            ev.step("s1:g", 5, 1, pb.BRANCH_STATE_RUNNING, attempts=2, error="UNAVAILABLE"),
            ev.step("s1:g", 6, 1, pb.BRANCH_STATE_SUCCEEDED, attempts=2),
            ev.saga_state("s1:g", 7, pb.TXN_STATE_COMPLETED, t=40),
        ]
    )
    assert row is not None
    assert row.state == pb.TXN_STATE_COMPLETED and row.txn.protocol == pb.PROTOCOL_SAGA
    assert [st.state for st in row.txn.steps] == [pb.BRANCH_STATE_SUCCEEDED] * 2
    assert row.txn.steps[1].attempts == 2 and row.txn.steps[1].last_error == "UNAVAILABLE"
    assert row.attempts == 3 and row.branch_count == 2
    assert row.services == ("bank-a", "bank-b")
    assert row.duration_ms == 40
    assert tl[4].branch == "credit" and tl[4].error == "UNAVAILABLE" and tl[4].attempts == 2
    assert tl[4].service == "bank-b"


def test_saga_compensates_then_stuck_then_retried():
    row, _ = run(
        [
            ev.saga_started("s1:g", 1, [("debit", "bank-a"), ("credit", "bank-b")]),
            ev.step("s1:g", 2, 0, pb.BRANCH_STATE_SUCCEEDED),
            ev.step("s1:g", 3, 1, pb.BRANCH_STATE_FAILED, error="no such account"),
            ev.saga_state("s1:g", 4, pb.TXN_STATE_COMPENSATING, reason="step credit failed"),
            ev.step(
                "s1:g",
                5,
                0,
                pb.BRANCH_STATE_COMPENSATING,
                attempts=0,
                saga=pb.TXN_STATE_COMPENSATING,
            ),
            ev.saga_state("s1:g", 6, pb.TXN_STATE_STUCK, reason="compensation failed", t=30),
        ]
    )
    assert row is not None
    assert row.state == pb.TXN_STATE_STUCK
    assert row.ended_ms == ev.T0 + 30  # STUCK counts as ended (until an operator retries)
    assert row.txn.steps[0].state == pb.BRANCH_STATE_COMPENSATING
    assert row.txn.steps[0].attempts == 1  # a compensation record never lowers it
    assert row.txn.reason == "compensation failed"
    row, _ = run(
        [
            ev.saga_state("s1:g", 7, pb.TXN_STATE_COMPENSATING, reason="retried", t=50),
        ],
        row,
    )
    assert row is not None and row.ended_ms == 0 and row.duration_ms == 0
    row, _ = run(
        [
            ev.step("s1:g", 8, 0, pb.BRANCH_STATE_COMPENSATED, saga=pb.TXN_STATE_COMPENSATING),
            ev.saga_state("s1:g", 9, pb.TXN_STATE_COMPENSATED, t=60),
        ],
        row,
    )
    assert row is not None and row.state == pb.TXN_STATE_COMPENSATED
    assert row.ended_ms == ev.T0 + 60


def test_snapshot_upserts_whole_transaction():
    txn = pb.Transaction(
        gid="s1:x",
        protocol=pb.PROTOCOL_TWO_PHASE_COMMIT,
        state=pb.TXN_STATE_COMMITTING,
        created_unix_ms=ev.T0,
        idempotency_key="k",
        branches=[pb.BranchStatus(branch=pb.Branch(service="bank-a", branch_id="b1"))],
    )
    row, tl = run([ev.snapshot(txn, 50)])
    assert row is not None and row.state == pb.TXN_STATE_COMMITTING and row.last_lsn == 50
    assert row.services == ("bank-a",) and tl[0].kind == pb.FEED_EVENT_KIND_SNAPSHOT
    # The same snapshot again (a resumed snapshot): applied again, same result.
    again, _ = run([ev.snapshot(txn, 50)], row)
    assert again == row
    # It replaces whatever the row held before.
    old, _ = run([ev.preparing("s1:x", 10, ["bank-z"])])
    row, _ = run([ev.snapshot(txn, 50)], old)
    assert row is not None and row.services == ("bank-a",)
    assert run([ev.snapshot_end(50)])[0] is None


def test_duplicates_and_older_events_are_skipped():
    row, _ = run(ev.two_pc("s1:a", 1, ["bank-a"]))
    assert row is not None and row.last_lsn == 3
    for e in ev.two_pc("s1:a", 1, ["bank-a"]):
        assert project(e, row, now_ms=NOW) is None
    # An ABORT older than what the row holds cannot undo the commit.
    assert project(ev.abort("s1:a", 2, "late"), row, now_ms=NOW) is None


def test_event_for_unknown_gid_makes_a_partial_row():
    row, _ = run([ev.commit("s1:q", 7, ["b1"])])
    assert row is not None
    assert row.state == pb.TXN_STATE_COMMITTING and row.shard == "s1"
    assert row.created_ms == ev.T0  # the event's time stands in for the creation time
    row, _ = run([ev.step("s1:r", 8, 2, pb.BRANCH_STATE_RUNNING)])
    assert row is not None and len(row.txn.steps) == 3
