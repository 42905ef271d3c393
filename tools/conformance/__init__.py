"""The participant conformance kit: ``accord conformance --participant ADDR [--service
NAME] [--json]``.

It drives any implementation of ``accord.v1.Participant`` (whatever its language)
through the contract as a coordinator would, over its real gRPC port, and reports
pass/fail per rule with the evidence (each request sent and the answer got). Exit code
0 only when every required rule passes; the optional rule (``stream``) is reported
apart. Every gid and counter key of a run is ``conf:<run>:...`` with a random ``<run>``,
so the kit can run again and again against the same participant.

The operations a participant must expose for the kit (so that it observes effects
without reaching into the participant's database):

- ``conformance.add``, payload JSON ``{"key": K, "amount": N, "vote": "yes"|"no"|
  "read-only"}`` (``vote`` defaults to ``"yes"``).
  2PC: Prepare stages +N on counter K, held until phase two (``"no"``: refuse,
  ABORTED; ``"read-only"``: a read-only vote, no change); Commit applies it; Abort
  drops it; a one-phase Commit (``one_phase`` set on the Commit, no Prepare before)
  applies it at once, or answers ABORTED for ``"no"``.
  Saga: Execute applies +N (``"no"``: refuse, ABORTED); Compensate applies -N.
- ``conformance.get``, payload ``{"key": K}``: Execute answers the result bytes JSON
  ``{"key": K, "value": V}`` (the committed value, 0 if none) and changes nothing;
  Compensate is a no-op. The kit reads with a fresh gid each time.

The rules (``RULES`` in :mod:`._kit`; their names are the ``name`` of ``--json``'s
``rules[]``):

- ``health``: ``grpc.health.v1.Health/Check`` for ``--service NAME`` (default ``""``)
  answers SERVING.
- ``2pc.yes-commit``: Prepare (yes) is OK, not read-only, the value unchanged until
  Commit, which moves it by N.
- ``2pc.no-abort``: Prepare with ``"no"`` is ABORTED; the Abort that follows is OK; no
  change.
- ``2pc.read-only``: Prepare with ``"read-only"`` is OK with ``read_only``; no change.
- ``2pc.one-phase``: a one-phase Commit applies N; a one-phase Commit with ``"no"`` is
  ABORTED and changes nothing.
- ``duplicate.prepare-commit``, ``duplicate.abort``, ``duplicate.execute-compensate``:
  every call sent twice (Prepare yes and no, Commit, one-phase Commit, Abort, Execute OK
  and refused, Compensate) gets the same answer (code, ``read_only``, result bytes) and
  has one effect.
- ``abort-before-prepare``: an Abort of a branch never prepared is OK (a recorded
  no-op); its late Prepare is refused (ABORTED) and changes nothing.
- ``compensate-before-execute``: likewise, Compensate first is OK, the late Execute
  ABORTED.
- ``fencing``: after calls with epoch 5 for a shard (``BranchRequest.shard``), calls
  with epoch 4 for the same shard are refused FAILED_PRECONDITION, with no effect.
- ``malformed``: an empty gid is INVALID_ARGUMENT; an unknown operation or a payload
  that does not decode is INVALID_ARGUMENT or ABORTED (a final no: both are accepted,
  the Python SDK answers ABORTED, which a coordinator never retries, where it would
  retry INVALID_ARGUMENT); never an effect.
- ``stream`` (optional): over ``Stream``, one batch with two good calls, two malformed
  ones (method UNSPECIFIED, empty gid) and a no vote, then a batch finishing them and
  repeating two: each answered by id (in any order) as the unary RPC would be, the
  malformed ones INVALID_ARGUMENT and the stream going on; the same calls repeated as
  unary RPCs get the same answers (one barrier). UNIMPLEMENTED: skipped.
- ``result-codes``: over every call above, a well-formed call is answered OK, ABORTED,
  FAILED_PRECONDITION, UNAVAILABLE or DEADLINE_EXCEEDED (participant.proto's result
  contract; INTERNAL or UNKNOWN is a failure here: the kit's calls are all legal), a
  malformed one INVALID_ARGUMENT or ABORTED.
"""

from accord.tools.conformance._kit import (
    ADD,
    GET,
    RULES,
    Kit,
    RuleSpec,
    check_codes,
    run_conformance,
    run_rules,
)
from accord.tools.conformance._report import Exchange, Report, RuleResult, render

__all__ = [
    "ADD",
    "GET",
    "RULES",
    "Exchange",
    "Kit",
    "Report",
    "RuleResult",
    "RuleSpec",
    "check_codes",
    "render",
    "run_conformance",
    "run_rules",
]
