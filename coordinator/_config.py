"""Coordinator settings and limits. Every limit here is documented in the README."""

from __future__ import annotations

from dataclasses import dataclass, field

from accord.common.retry import Backoff

#: The backoff of a 2PC branch call answered "retry later" (a saga step's comes from
#: its definition): 20 ms doubling to 2 s, half of each delay random.
RetryPolicy = Backoff


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask for (INVALID_ARGUMENT beyond, nothing logged or kept),
    and what the coordinator holds at once (RESOURCE_EXHAUSTED beyond). The README's
    "Limits and hostile input" lists each with its status code."""

    #: Branches of a 2PC transaction.
    max_branches: int = 64
    #: Steps of a saga definition.
    max_steps: int = 64
    #: A branch's or step's payload, and a step's compensation payload.
    max_payload_bytes: int = 256 * 1024
    #: Unfinished transactions.
    max_inflight: int = 10_000
    #: Unfinished transactions one caller may have (auth on only: with auth off every
    #: call is the caller "", and only ``max_inflight`` applies).
    max_inflight_per_caller: int = 1000
    #: WatchTransaction and Subscribe streams one caller may hold open (auth on only).
    max_watchers_per_caller: int = 64
    #: A transaction's timeout_ms, a step's timeout_ms and retry intervals.
    max_timeout_ms: int = 10 * 60 * 1000
    max_key_chars: int = 128
    #: Service, operation and compensation names.
    max_name_chars: int = 128
    #: An Abort's or CancelSaga's reason (it is logged in the WAL).
    max_reason_chars: int = 1024
    #: Status names in a step's retry policy's final_codes.
    max_final_codes: int = 16
    max_list: int = 1000
    watch_queue: int = 1024
    #: WatchTransaction streams open at once, over all callers.
    max_watchers: int = 1000
    #: Subscribe streams open at once, over all callers.
    max_subscribers: int = 64
    #: Calls in flight on one Session stream (RESOURCE_EXHAUSTED for a call beyond it).
    max_session_calls: int = 1024


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    coordinator_id: str = "accord-1"
    #: Address participants use to ask for outcomes (QueryOutcome).
    advertise_address: str = ""
    shard: str = "0"
    epoch: int = 0
    default_timeout_ms: int = 30_000
    #: Per-attempt deadline of a participant call.
    call_timeout_s: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    limits: Limits = Limits()
    #: How long Commit/Execute wait for phase two before answering with the decision.
    phase_two_wait_s: float = 10.0
    #: Finished transactions kept for GetTransaction and idempotency look-ups.
    retain_finished: int = 100_000
    #: A checkpoint is taken after this many WAL records.
    checkpoint_every: int = 100_000
    segment_size: int = 64 * 1024 * 1024
    #: A deliberately broken build, for the chaos checker's own test only: a "no" vote
    #: is ignored and the transaction commits anyway. Never set it otherwise.
    unsafe_ignore_no_votes: bool = False
