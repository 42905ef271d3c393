"""The participant methods the coordinator calls (participant.proto)."""

from __future__ import annotations

import enum


class Method(enum.StrEnum):
    """A participant RPC; the value is its name in ``accord.v1.Participant``."""

    PREPARE = "Prepare"
    COMMIT = "Commit"
    ABORT = "Abort"
    EXECUTE = "Execute"
    COMPENSATE = "Compensate"

    # Hash as the name does, so a member and its name are one dict key (test scripts,
    # and metric labels: a member is the str it names, used as one without ``.value``).
    __hash__ = str.__hash__
