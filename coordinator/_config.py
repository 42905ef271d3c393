"""Coordinator settings and limits. Every limit here is documented in the README."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter for participant calls."""

    initial_s: float = 0.02
    multiplier: float = 2.0
    max_s: float = 2.0

    def delay(self, attempt: int, rand: float) -> float:
        """Delay before retry number ``attempt`` (1-based); rand in [0, 1)."""
        cap = min(self.max_s, self.initial_s * self.multiplier ** (attempt - 1))
        return cap * (0.5 + rand / 2)


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_branches: int = 64
    max_payload_bytes: int = 256 * 1024
    max_inflight: int = 10_000
    max_timeout_ms: int = 10 * 60 * 1000
    max_key_chars: int = 128
    max_name_chars: int = 128
    max_list: int = 1000
    watch_queue: int = 1024


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
    retry: RetryPolicy = RetryPolicy()
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
