"""Domain errors of the coordinator. The gRPC layer maps them to status codes in one
place (``accord.coordinator._server``); nothing else knows about status codes."""

from __future__ import annotations


class AccordError(Exception):
    """Base of every error the coordinator reports to a client."""


class InvalidArgument(AccordError):
    """Malformed request: nothing was logged or kept."""


class NotFound(AccordError):
    """Unknown gid."""


class FailedPrecondition(AccordError):
    """Illegal state change (e.g. Enlist after Commit)."""


class AlreadyExists(AccordError):
    """An idempotency key (or branch id) reused with a different request."""


class ResourceExhausted(AccordError):
    """A documented limit is reached: the coordinator sheds load."""


class Unavailable(AccordError):
    """A decision cannot be made durable, or a participant service has no live instance."""


class IllegalTransition(FailedPrecondition):
    """A state change the state table forbids."""
