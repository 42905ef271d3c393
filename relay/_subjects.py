"""How a feed event becomes a NATS message: its subject, its message id, its payload,
and the way back from a message id to a shard's position.

Subjects (every token is a valid NATS token: no ``.``, ``*``, ``>`` or white space)::

    accord.<shard>.<protocol>.<state>     a state change
    accord.<shard>.snapshot               a snapshot's transactions and its end marker

- ``<shard>``: the shard name, whose characters are ``[A-Za-z0-9_.-]``
  (:func:`accord.common.gid.check_shard_name`). ``.`` would split the token, so it is
  written ``~`` (which no shard name contains: the mapping is one to one, and
  :func:`shard_of_token` reverses it). ``s1`` stays ``s1``; ``eu.1`` becomes ``eu~1``.
- ``<protocol>``: ``2pc`` or ``saga`` (``unspecified`` for an event without one).
- ``<state>``: the transaction's state *after* the event (``FeedEvent.state``), its
  ``TxnState`` name lower-cased without the ``TXN_STATE_`` prefix: ``active``,
  ``preparing``, ``committing``, ``aborting``, ``committed``, ``aborted``, ``running``,
  ``compensating``, ``completed``, ``compensated``, ``stuck``. So a 2PC's outcome is on
  ``accord.<shard>.2pc.committed`` / ``.aborted`` (its ENDED event), a saga's on
  ``accord.<shard>.saga.completed`` / ``.compensated`` / ``.stuck``, and each saga step's
  change on the saga's current state (``running`` or ``compensating``).

Message ids (header ``Nats-Msg-Id``; JetStream drops a second message with an id it
saw within the stream's duplicate window)::

    <shard>:<lsn>                         a state change (its WAL record's LSN)
    <shard>:<lsn>:snapshot:<gid>          one transaction of the snapshot taken at <lsn>
    <shard>:<lsn>:snapshot-end            that snapshot's end

A shard name never contains ``:``, so the shard is everything before the first one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from google.protobuf import json_format

import accord.v1 as pb
from accord.common.gid import check_shard_name

PREFIX = "accord"
#: What the relay's stream takes in.
STREAM_SUBJECTS = f"{PREFIX}.>"
MSG_ID = "Nats-Msg-Id"
CONTENT_TYPE = "Content-Type"

PROTOCOL_TOKENS: dict[int, str] = {
    pb.PROTOCOL_TWO_PHASE_COMMIT: "2pc",
    pb.PROTOCOL_SAGA: "saga",
}
SNAPSHOT_TOKEN = "snapshot"
_SNAPSHOT_KINDS = (pb.FEED_EVENT_KIND_SNAPSHOT, pb.FEED_EVENT_KIND_SNAPSHOT_END)


class Format(StrEnum):
    """The payload of a message: the ``FeedEvent`` in protobuf's binary form, or in its
    JSON mapping (field names as in the .proto, enums by name, bytes in base64)."""

    PROTO = "proto"
    JSON = "json"

    @property
    def content_type(self) -> str:
        if self is Format.JSON:
            return "application/json"
        return "application/protobuf; messageType=accord.v1.FeedEvent"


def shard_token(shard: str) -> str:
    """The subject token of a shard (``.`` written ``~``)."""
    return check_shard_name(shard).replace(".", "~")


def shard_of_token(token: str) -> str:
    return token.replace("~", ".")


def protocol_token(protocol: int) -> str:
    return PROTOCOL_TOKENS.get(protocol, "unspecified")


def state_token(state: int) -> str:
    try:
        name = pb.TxnState.Name(state)  # type: ignore[arg-type]
    except ValueError:
        return "unspecified"
    return name.removeprefix("TXN_STATE_").lower()


def is_snapshot(event: pb.FeedEvent) -> bool:
    return event.kind in _SNAPSHOT_KINDS


def subject(event: pb.FeedEvent) -> str:
    """The subject ``event`` is published on."""
    shard = shard_token(event.shard)
    if is_snapshot(event):
        return f"{PREFIX}.{shard}.{SNAPSHOT_TOKEN}"
    return f"{PREFIX}.{shard}.{protocol_token(event.protocol)}.{state_token(event.state)}"


def shard_subjects(shard: str) -> str:
    """Every subject of one shard (for reading its last message back)."""
    return f"{PREFIX}.{shard_token(shard)}.>"


def message_id(event: pb.FeedEvent) -> str:
    """The ``Nats-Msg-Id`` of ``event`` (see the module's documentation)."""
    if event.kind == pb.FEED_EVENT_KIND_SNAPSHOT:
        return f"{event.shard}:{event.lsn}:snapshot:{event.gid}"
    if event.kind == pb.FEED_EVENT_KIND_SNAPSHOT_END:
        return f"{event.shard}:{event.lsn}:snapshot-end"
    return f"{event.shard}:{event.lsn}"


def encode(event: pb.FeedEvent, fmt: Format) -> bytes:
    if fmt is Format.JSON:
        data = json_format.MessageToDict(event, preserving_proto_field_name=True)
        return json.dumps(data, separators=(",", ":")).encode()
    return event.SerializeToString()


def decode(payload: bytes, content_type: str = "") -> pb.FeedEvent:
    """A message's ``FeedEvent``, in either format (JSON when the content type says so
    or the payload starts with ``{``)."""
    if content_type.startswith("application/json") or payload[:1] == b"{":
        return json_format.Parse(payload, pb.FeedEvent())
    return pb.FeedEvent.FromString(payload)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a shard's feed resumes: ``Subscribe(from_lsn=...)``."""

    shard: str
    from_lsn: int


#: What to resume from after a snapshot cut short (its last message published is one of
#: its transactions, not its end): the LSN before the snapshot is not in the message,
#: but any LSN a checkpoint removed asks for a fresh snapshot, and a snapshot was sent
#: only because one was, so LSN 1 was too. The new snapshot's messages with the same
#: LSN are duplicates JetStream drops.
REDO_SNAPSHOT_LSN = 1


def position_of(msg_id: str) -> Position:
    """The position after the message with id ``msg_id``: ValueError if the relay did
    not make that id."""
    shard, sep, rest = msg_id.partition(":")
    lsn_text, _, tail = rest.partition(":")
    if not sep or not lsn_text.isdigit():
        raise ValueError(f"message id {msg_id!r} is not <shard>:<lsn>[:...]")
    check_shard_name(shard)
    lsn = int(lsn_text)
    if tail == "" or tail == "snapshot-end":
        return Position(shard, lsn)
    if tail.startswith("snapshot:"):
        return Position(shard, REDO_SNAPSHOT_LSN)
    raise ValueError(f"message id {msg_id!r}: unknown suffix {tail!r}")
