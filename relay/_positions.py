"""Where each shard's feed resumes after a restart: kept in JetStream itself.

The relay publishes a shard's events in LSN order and advances past an event only once
JetStream has acknowledged it, so the last message stored on a shard's subjects
(``accord.<shard>.>``) *is* the shard's position: read back with the stream's "last
message by subject" request, its ``Nats-Msg-Id`` (``<shard>:<lsn>``) gives the LSN to
resume after (:func:`accord.relay._subjects.position_of`). There is no second store
to keep in step with the stream, so a relay killed at any point resumes exactly after
the last event JetStream stored: nothing lost, nothing stored twice (an event whose
publication was under way is sent again with the same id, and JetStream drops it
within the duplicate window).

A shard with no message in the stream starts from LSN 0 (the start of the shard's
retained log). That is also what happens if limits on the stream (age, count) removed
every message of a shard: keep them above the duplicate window, or events older than
it are published again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from accord.relay._subjects import MSG_ID, Position, position_of, shard_subjects

#: ``(subject filter) -> the Nats-Msg-Id of the stream's last message matching it``,
#: or None when no message matches.
LastMessageId = Callable[[str], Awaitable[str | None]]


class StreamPositions:
    """The shards' positions read back from the stream (see the module's docs)."""

    def __init__(self, last_message_id: LastMessageId) -> None:
        self._last = last_message_id

    async def load(self, shard: str) -> int:
        """The LSN to subscribe after for ``shard``."""
        msg_id = await self._last(shard_subjects(shard))
        if msg_id is None:
            return 0
        position: Position = position_of(msg_id)
        if position.shard != shard:
            raise ValueError(
                f"the last message on {shard_subjects(shard)} has id {msg_id!r}, "
                f"which names shard {position.shard!r}"
            )
        return position.from_lsn


def js_last_message_id(js: object, stream: str) -> LastMessageId:
    """:data:`LastMessageId` for a nats-py JetStream context."""
    from nats.js import JetStreamContext
    from nats.js.errors import NotFoundError

    assert isinstance(js, JetStreamContext)

    async def last(subject: str) -> str | None:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        headers = msg.headers or {}
        msg_id = headers.get(MSG_ID)
        if msg_id is None:
            raise ValueError(
                f"stream {stream}: message {msg.seq} on {msg.subject} has no {MSG_ID} "
                "(not published by the relay)"
            )
        return str(msg_id)

    return last
