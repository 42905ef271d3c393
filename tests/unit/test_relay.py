"""The relay's subjects, message ids, positions and publishing, without a NATS server:
JetStream is a fake that stores what it is sent (and drops ids it has seen), or fails
on a chosen message."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

import accord.v1 as pb
from accord.relay import (
    Format,
    Position,
    Publisher,
    PublishFailed,
    StreamPositions,
    decode,
    encode,
    message_id,
    position_of,
    shard_of_token,
    shard_subjects,
    shard_token,
    subject,
)


def event(
    lsn: int, *, shard: str = "s1", state: int = pb.TXN_STATE_COMMITTED, **kw
) -> pb.FeedEvent:
    kw.setdefault("kind", pb.FEED_EVENT_KIND_ENDED)
    kw.setdefault("protocol", pb.PROTOCOL_TWO_PHASE_COMMIT)
    kw["state"] = state
    return pb.FeedEvent(shard=shard, lsn=lsn, gid=f"{shard}:{lsn:028x}", **kw)


# ------------------------------------------------------------------ subjects and ids


@pytest.mark.parametrize(
    ("protocol", "state", "expected"),
    [
        (pb.PROTOCOL_TWO_PHASE_COMMIT, pb.TXN_STATE_COMMITTED, "accord.s1.2pc.committed"),
        (pb.PROTOCOL_TWO_PHASE_COMMIT, pb.TXN_STATE_ABORTED, "accord.s1.2pc.aborted"),
        (pb.PROTOCOL_TWO_PHASE_COMMIT, pb.TXN_STATE_PREPARING, "accord.s1.2pc.preparing"),
        (pb.PROTOCOL_TWO_PHASE_COMMIT, pb.TXN_STATE_ACTIVE, "accord.s1.2pc.active"),
        (pb.PROTOCOL_SAGA, pb.TXN_STATE_RUNNING, "accord.s1.saga.running"),
        (pb.PROTOCOL_SAGA, pb.TXN_STATE_COMPENSATED, "accord.s1.saga.compensated"),
        (pb.PROTOCOL_SAGA, pb.TXN_STATE_STUCK, "accord.s1.saga.stuck"),
        (pb.PROTOCOL_UNSPECIFIED, pb.TXN_STATE_UNSPECIFIED, "accord.s1.unspecified.unspecified"),
    ],
)
def test_subject_is_shard_protocol_state(protocol: int, state: int, expected: str) -> None:
    assert subject(event(7, protocol=protocol, state=state)) == expected


def test_every_state_is_one_lower_case_token() -> None:
    for state in pb.TxnState.values():
        tokens = subject(event(1, state=state)).split(".")
        assert len(tokens) == 4 and tokens[3] == tokens[3].lower() and tokens[3]


def test_a_dot_in_a_shard_name_is_written_tilde_one_to_one() -> None:
    assert shard_token("eu.west-1_a") == "eu~west-1_a"
    assert shard_of_token("eu~west-1_a") == "eu.west-1_a"
    assert subject(event(3, shard="eu.1")) == "accord.eu~1.2pc.committed"
    assert shard_subjects("eu.1") == "accord.eu~1.>"
    # The id carries the real name.
    assert message_id(event(3, shard="eu.1")) == "eu.1:3"
    with pytest.raises(ValueError):
        shard_token("bad:shard")
    with pytest.raises(ValueError):
        shard_token("")


def test_snapshot_events_go_to_the_snapshot_subject_with_their_own_ids() -> None:
    snap = event(50, kind=pb.FEED_EVENT_KIND_SNAPSHOT)
    end = pb.FeedEvent(shard="s1", lsn=50, kind=pb.FEED_EVENT_KIND_SNAPSHOT_END)
    assert subject(snap) == subject(end) == "accord.s1.snapshot"
    assert message_id(snap) == f"s1:50:snapshot:{snap.gid}"
    assert message_id(end) == "s1:50:snapshot-end"
    assert message_id(event(50)) == "s1:50"  # a real record at that LSN stays distinct


def test_positions_from_message_ids() -> None:
    assert position_of("s1:42") == Position("s1", 42)
    assert position_of("s1:50:snapshot-end") == Position("s1", 50)
    # A snapshot cut short: ask for a fresh one.
    assert position_of("s1:50:snapshot:s1:00ab") == Position("s1", 1)
    for bad in ("s1", "s1:", "s1:x", "s1:5:what", "b@d:5"):
        with pytest.raises(ValueError):
            position_of(bad)


@pytest.mark.parametrize("fmt", list(Format))
def test_payload_round_trip(fmt: Format) -> None:
    ev = event(9, branches=[pb.BranchStatus(branch=pb.Branch(service="bank", payload=b"\x00{"))])
    assert decode(encode(ev, fmt), fmt.content_type) == ev
    assert decode(encode(ev, fmt)) == ev  # told apart without the header too
    if fmt is Format.JSON:
        assert b'"state":"TXN_STATE_COMMITTED"' in encode(ev, fmt)


# ------------------------------------------------------------------ positions


async def test_position_is_the_last_message_of_the_shard() -> None:
    last = {"accord.s1.>": "s1:17", "accord.s2.>": "s2:40:snapshot-end"}

    async def lookup(subject: str) -> str | None:
        return last.get(subject)

    positions = StreamPositions(lookup)
    assert await positions.load("s1") == 17
    assert await positions.load("s2") == 40
    assert await positions.load("s3") == 0  # nothing published yet: from the start
    last["accord.s3.>"] = "s4:1"
    with pytest.raises(ValueError, match="names shard 's4'"):
        await positions.load("s3")


# ------------------------------------------------------------------ publishing


@dataclass
class Ack:
    seq: int
    duplicate: bool = False


class FakeJetStream:
    """Stores messages in order, drops a repeated Nats-Msg-Id (JetStream's duplicate
    window), fails the publish whose id is in ``fail`` (the message is not stored)."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.unanswered: set[str] = set()

    async def publish_async(self, subject, payload, *, headers, stream):
        assert stream == "ACCORD"
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        msg_id = headers["Nats-Msg-Id"]
        if msg_id in self.unanswered:
            return future
        if msg_id in self.fail:
            future.set_exception(RuntimeError("nats: no response from stream"))
        elif any(m == msg_id for _, m in self.stored):
            future.set_result(Ack(0, duplicate=True))
        else:
            self.stored.append((subject, msg_id))
            future.set_result(Ack(len(self.stored)))
        return future


async def test_publish_advances_through_the_acknowledged_events() -> None:
    js = FakeJetStream()
    pub = Publisher(js, stream="ACCORD", fmt=Format.PROTO, timeout_s=1)
    assert await pub.publish([event(1), event(2, state=pb.TXN_STATE_ABORTED)], 0) == 2
    assert js.stored == [("accord.s1.2pc.committed", "s1:1"), ("accord.s1.2pc.aborted", "s1:2")]
    # Published again (a restart that had not seen the acks): dropped, position the same.
    assert await pub.publish([event(1), event(2)], 0) == 2
    assert (pub.stored, pub.duplicates) == (2, 2)


async def test_a_failed_publish_keeps_the_position_before_it() -> None:
    js = FakeJetStream()
    js.fail = {"s1:3"}
    pub = Publisher(js, stream="ACCORD", fmt=Format.PROTO, timeout_s=1)
    with pytest.raises(PublishFailed) as failed:
        await pub.publish([event(2), event(3), event(4)], 1)
    assert failed.value.position == 2
    js.fail.clear()
    assert await pub.publish([event(3), event(4)], failed.value.position) == 4
    assert [m for _, m in js.stored] == ["s1:2", "s1:4", "s1:3"]  # the documented reorder


async def test_an_unanswered_publish_times_out_keeping_the_position() -> None:
    js = FakeJetStream()
    js.unanswered = {"s1:6"}
    pub = Publisher(js, stream="ACCORD", fmt=Format.PROTO, timeout_s=0.05)
    with pytest.raises(PublishFailed) as failed:
        await pub.publish([event(5), event(6)], 4)
    assert failed.value.position == 5


async def test_a_snapshot_moves_the_position_only_at_its_end() -> None:
    js = FakeJetStream()
    pub = Publisher(js, stream="ACCORD", fmt=Format.PROTO, timeout_s=1)
    snap = [
        event(90, kind=pb.FEED_EVENT_KIND_SNAPSHOT),
        pb.FeedEvent(shard="s1", lsn=90, gid="s1:x", kind=pb.FEED_EVENT_KIND_SNAPSHOT),
    ]
    assert await pub.publish(snap, 3) == 3
    end = pb.FeedEvent(shard="s1", lsn=90, kind=pb.FEED_EVENT_KIND_SNAPSHOT_END)
    assert await pub.publish([end, event(91)], 3) == 91
    assert [m for _, m in js.stored][-2:] == ["s1:90:snapshot-end", "s1:91"]
