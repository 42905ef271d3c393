"""The relay package: ``accord relay`` publishes every shard's event feed
(``Coordinator/Subscribe``) to a NATS JetStream stream, for choreography: services that
react to Accord's transactions as events instead of being called.

It owns the subjects and message ids (:mod:`._subjects`), the shards' positions kept in
the stream itself (:mod:`._positions`), and following the shards' owners
(:mod:`._relay`). It only reads from coordinators (their feed, etcd's shard map) and
writes only to its stream: it must not change a transaction.
"""

from accord.relay._positions import StreamPositions, js_last_message_id
from accord.relay._relay import (
    DEFAULT_DUPLICATE_WINDOW_S,
    DEFAULT_STREAM,
    READY_LINE,
    Publisher,
    PublishFailed,
    Relay,
    RelaySettings,
    ShardFollower,
    ensure_stream,
)
from accord.relay._subjects import (
    CONTENT_TYPE,
    MSG_ID,
    PREFIX,
    STREAM_SUBJECTS,
    Format,
    Position,
    decode,
    encode,
    message_id,
    position_of,
    protocol_token,
    shard_of_token,
    shard_subjects,
    shard_token,
    state_token,
    subject,
)

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_DUPLICATE_WINDOW_S",
    "DEFAULT_STREAM",
    "MSG_ID",
    "PREFIX",
    "READY_LINE",
    "STREAM_SUBJECTS",
    "Format",
    "Position",
    "PublishFailed",
    "Publisher",
    "Relay",
    "RelaySettings",
    "ShardFollower",
    "StreamPositions",
    "decode",
    "encode",
    "ensure_stream",
    "js_last_message_id",
    "message_id",
    "position_of",
    "protocol_token",
    "shard_of_token",
    "shard_subjects",
    "shard_token",
    "state_token",
    "subject",
]
