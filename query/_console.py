"""The web console's JSON: HTTP query parameters checked and turned into the
``accord.v1`` requests of query.proto, and answers turned into plain JSON for the
console's script (state names without their enum prefix, payloads as text, the
timeline laid out as lanes of a Gantt chart).

Every value read from a request is checked here; what is wrong is
:class:`~accord.query.InvalidArgument` naming the parameter (HTTP 400, the gRPC
INVALID_ARGUMENT of the same request). Nothing here builds HTML: the script puts every
string into the page as text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import accord.v1 as pb
from accord.query._errors import InvalidArgument
from accord.query._read import MAX_PAGE_SIZE

_INT64_MAX = 2**63 - 1
MAX_TEXT = 256
MAX_TOKEN = 4096
MAX_VALUES = 100

#: The filter parameters of ``/api/transactions`` (and ``/api/events``).
FILTER_PARAMS = frozenset(
    {
        "state",
        "protocol",
        "service",
        "shard",
        "stuck",
        "phase_two_pending",
        "started_after",
        "started_before",
        "ended_after",
        "ended_before",
        "gid_prefix",
        "key_prefix",
    }
)
LIST_PARAMS = FILTER_PARAMS | {"order", "page_size", "page_token"}
STATS_PARAMS = frozenset({"service", "since"})

_ORDERS = {
    "started_desc": pb.QUERY_ORDER_STARTED_DESC,
    "started_asc": pb.QUERY_ORDER_STARTED_ASC,
    "ended_desc": pb.QUERY_ORDER_ENDED_DESC,
    "duration_desc": pb.QUERY_ORDER_DURATION_DESC,
}
_PROTOCOL_ALIASES = {"2PC": "TWO_PHASE_COMMIT"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

FINAL_STATES = frozenset(
    {
        pb.TXN_STATE_COMMITTED,
        pb.TXN_STATE_ABORTED,
        pb.TXN_STATE_COMPLETED,
        pb.TXN_STATE_COMPENSATED,
    }
)


def short(enum: Any, value: int, prefix: str) -> str:
    """``TXN_STATE_ABORTED`` -> ``ABORTED`` (the number itself when unknown)."""
    try:
        name = str(enum.Name(value))
    except ValueError:
        return str(value)
    return name[len(prefix) :] if name.startswith(prefix) else name


def _state_name(v: int) -> str:
    return short(pb.TxnState, v, "TXN_STATE_")


def _branch_state_name(v: int) -> str:
    return short(pb.BranchState, v, "BRANCH_STATE_")


def _protocol_name(v: int) -> str:
    return short(pb.Protocol, v, "PROTOCOL_")


# ---------------------------------------------------------------- parameters


class Params:
    """A request's query string (``name -> every value given``), checked on reading."""

    def __init__(self, items: Sequence[tuple[str, str]], allowed: frozenset[str]) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in items:
            if name not in allowed:
                raise InvalidArgument(
                    f"unknown parameter {name[:40]!r} (known: {', '.join(sorted(allowed))})"
                )
            self._values.setdefault(name, []).append(value)

    def many(self, name: str) -> list[str]:
        """Every value of ``name``; a value may also list several, comma-separated."""
        out = [v.strip() for raw in self._values.get(name, ()) for v in raw.split(",")]
        out = [v for v in out if v]
        if len(out) > MAX_VALUES:
            raise InvalidArgument(f"{name}: at most {MAX_VALUES} values")
        for v in out:
            if len(v) > MAX_TEXT:
                raise InvalidArgument(f"{name}: a value is longer than {MAX_TEXT} characters")
        return out

    def one(self, name: str, *, limit: int = MAX_TEXT) -> str:
        values = self._values.get(name, [])
        if len(values) > 1:
            raise InvalidArgument(f"{name}: given {len(values)} times (once at most)")
        value = values[0] if values else ""
        if len(value) > limit:
            raise InvalidArgument(f"{name}: longer than {limit} characters")
        return value

    def integer(self, name: str, *, low: int = 0, high: int = _INT64_MAX) -> int:
        raw = self.one(name, limit=32).strip()
        if not raw:
            return 0
        try:
            value = int(raw, 10)
        except ValueError:
            raise InvalidArgument(f"{name}: not an integer: {raw!r}") from None
        if not low <= value <= high:
            raise InvalidArgument(f"{name}: {value} is out of range ({low}..{high})")
        return value

    def flag(self, name: str) -> bool:
        raw = self.one(name, limit=8).strip().lower()
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise InvalidArgument(f"{name}: expected true or false, not {raw!r}")


def _enum_values(
    values: Sequence[str], enum: Any, prefix: str, what: str, aliases: Mapping[str, str]
) -> list[int]:
    out = []
    for raw in values:
        name = raw.upper().replace("-", "_")
        name = aliases.get(name, name)
        full = name if name.startswith(prefix) else prefix + name
        try:
            value = int(enum.Value(full))
        except ValueError:
            value = 0
        if not value:
            known = [v.name[len(prefix) :] for v in enum.DESCRIPTOR.values if v.number]
            raise InvalidArgument(f"{what}: unknown value {raw!r} (known: {', '.join(known)})")
        out.append(value)
    return out


def parse_filter(p: Params) -> pb.TransactionFilter:
    return pb.TransactionFilter(
        states=_enum_values(p.many("state"), pb.TxnState, "TXN_STATE_", "state", {}),  # type: ignore[arg-type]
        protocols=_enum_values(  # type: ignore[arg-type]
            p.many("protocol"), pb.Protocol, "PROTOCOL_", "protocol", _PROTOCOL_ALIASES
        ),
        services=p.many("service"),
        shards=p.many("shard"),
        stuck=p.flag("stuck"),
        phase_two_pending=p.flag("phase_two_pending"),
        started_after_unix_ms=p.integer("started_after"),
        started_before_unix_ms=p.integer("started_before"),
        ended_after_unix_ms=p.integer("ended_after"),
        ended_before_unix_ms=p.integer("ended_before"),
        gid_prefix=p.one("gid_prefix"),
        idempotency_key_prefix=p.one("key_prefix"),
    )


def parse_list(items: Sequence[tuple[str, str]]) -> pb.QueryListRequest:
    """``GET /api/transactions``'s query string as a ListTransactions request."""
    p = Params(items, LIST_PARAMS)
    order = p.one("order").strip().lower()
    if order and order not in _ORDERS:
        raise InvalidArgument(f"order: unknown value {order!r} (known: {', '.join(_ORDERS)})")
    return pb.QueryListRequest(
        filter=parse_filter(p),
        order=_ORDERS.get(order, pb.QUERY_ORDER_STARTED_DESC),
        page_size=p.integer("page_size", high=MAX_PAGE_SIZE),
        page_token=p.one("page_token", limit=MAX_TOKEN),
    )


def parse_events(items: Sequence[tuple[str, str]]) -> pb.TransactionFilter:
    """``GET /api/events``'s query string: the filter each change is matched against."""
    return parse_filter(Params(items, FILTER_PARAMS))


def parse_stats(items: Sequence[tuple[str, str]]) -> pb.StatsRequest:
    p = Params(items, STATS_PARAMS)
    return pb.StatsRequest(service=p.one("service"), since_unix_ms=p.integer("since"))


_PHASE_TWO = frozenset({pb.TXN_STATE_COMMITTING, pb.TXN_STATE_ABORTING, pb.TXN_STATE_COMPENSATING})


def matches(flt: pb.TransactionFilter, s: pb.TransactionSummary) -> bool:
    """Whether ``s`` is one ListTransactions with ``flt`` would return (the same rules
    as the SQL of ``_read.filter_sql``), for live updates of a filtered page."""
    if flt.states and s.state not in flt.states:
        return False
    if flt.stuck and s.state != pb.TXN_STATE_STUCK:
        return False
    if flt.phase_two_pending and s.state not in _PHASE_TWO:
        return False
    if flt.protocols and s.protocol not in flt.protocols:
        return False
    if flt.shards and s.shard not in flt.shards:
        return False
    if flt.services and not set(flt.services) & set(s.services):
        return False
    created, ended = s.created_unix_ms, s.ended_unix_ms
    if flt.started_after_unix_ms and created < flt.started_after_unix_ms:
        return False
    if flt.started_before_unix_ms and created >= flt.started_before_unix_ms:
        return False
    if flt.ended_after_unix_ms and ended < flt.ended_after_unix_ms:
        return False
    if flt.ended_before_unix_ms and not (0 < ended < flt.ended_before_unix_ms):
        return False
    if flt.gid_prefix and not s.gid.startswith(flt.gid_prefix):
        return False
    return not (
        flt.idempotency_key_prefix and not s.idempotency_key.startswith(flt.idempotency_key_prefix)
    )


# ---------------------------------------------------------------- answers


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def summary_json(s: pb.TransactionSummary) -> dict[str, Any]:
    return {
        "gid": s.gid,
        "shard": s.shard,
        "protocol": _protocol_name(s.protocol),
        "state": _state_name(s.state),
        "final": s.state in FINAL_STATES,
        "idempotency_key": s.idempotency_key,
        "services": list(s.services),
        "created_ms": s.created_unix_ms,
        "ended_ms": s.ended_unix_ms,
        "duration_ms": s.duration_ms,
        "reason": s.reason,
        "trace_id": s.trace_id,
        "last_lsn": s.last_lsn,
        "branches": s.branches,
        "attempts": s.attempts,
    }


def list_json(resp: pb.QueryListResponse) -> dict[str, Any]:
    return {
        "transactions": [summary_json(s) for s in resp.transactions],
        "next_page_token": resp.next_page_token,
    }


def stats_json(resp: pb.StatsResponse) -> dict[str, Any]:
    return {
        "counts": {_state_name(c.state): c.count for c in resp.counts},
        "minutes": [
            {
                "minute_ms": m.minute_unix_ms,
                "service": m.service,
                "started": m.started,
                "ended": m.ended,
                "committed": m.committed,
                "aborted": m.aborted,
                "p50_ms": m.p50_ms,
                "p95_ms": m.p95_ms,
                "p99_ms": m.p99_ms,
            }
            for m in resp.minutes
        ],
        "shards": [
            {
                "shard": s.shard,
                "coordinator": s.coordinator,
                "connected": s.connected,
                "applied_lsn": s.applied_lsn,
                "durable_lsn": s.durable_lsn,
                "lag_events": s.lag_events,
                "lag_seconds": round(s.lag_seconds, 3),
            }
            for s in resp.shards
        ],
    }


def trace_link(template: str, trace_id: str) -> str:
    """The tracing UI's page of ``trace_id`` ("" without a template or a trace id)."""
    if not template or not trace_id:
        return ""
    return template.replace("{trace_id}", quote(trace_id, safe=""))


def check_trace_url(template: str) -> None:
    """``--trace-url``: an http(s) URL with ``{trace_id}`` in it (or "")."""
    if not template:
        return
    if not template.startswith(("http://", "https://")):
        raise ValueError(f"--trace-url must start with http:// or https://: {template!r}")
    if "{trace_id}" not in template:
        raise ValueError(f"--trace-url must contain {{trace_id}}: {template!r}")


def _timeline_entry(e: pb.TimelineEntry) -> dict[str, Any]:
    return {
        "lsn": e.lsn,
        "unix_ms": e.unix_ms,
        "kind": short(pb.FeedEventKind, e.kind, "FEED_EVENT_KIND_"),
        "state": _state_name(e.state),
        "branch": e.branch,
        "branch_state": _branch_state_name(e.branch_state) if e.branch_state else "",
        "attempts": e.attempts,
        "compensation_attempts": e.compensation_attempts,
        "error": e.error,
        "service": e.service,
    }


def _branches(t: pb.Transaction) -> list[dict[str, Any]]:
    if t.protocol == pb.PROTOCOL_SAGA or t.steps:
        return [
            {
                "name": st.step.name or f"step{i}",
                "service": st.step.service or st.step.address,
                "operation": st.step.action,
                "compensation": st.step.compensation,
                "payload": _text(st.step.payload),
                "state": _branch_state_name(st.state),
                "attempts": st.attempts,
                "compensation_attempts": st.compensation_attempts,
                "last_error": st.last_error,
                "address": st.resolved_address,
                "depends_on": list(st.step.depends_on),
                "pivot": st.step.pivot,
            }
            for i, st in enumerate(t.steps)
        ]
    return [
        {
            "name": b.branch.branch_id or f"b{i + 1}",
            "service": b.branch.service or b.branch.address,
            "operation": b.branch.operation,
            "compensation": "",
            "payload": _text(b.branch.payload),
            "state": _branch_state_name(b.state),
            "attempts": b.attempts,
            "compensation_attempts": 0,
            "last_error": b.last_error,
            "address": b.resolved_address,
            "depends_on": [],
            "pivot": False,
        }
        for i, b in enumerate(t.branches)
    ]


Segment = dict[str, Any]


def _segment(start: int, end: int, phase: str, state: str, **more: Any) -> Segment:
    return {"start_ms": start, "end_ms": max(end, start), "phase": phase, "state": state, **more}


def lanes(view: pb.TransactionView, *, now_ms: int) -> list[dict[str, Any]]:
    """The timeline as Gantt lanes: the transaction's own states first, then one lane per
    branch (2PC: prepare, then phase two) or saga step (each action attempt run and
    each compensation run as its own bar). A bar still open ends at ``now_ms``."""
    s = view.summary
    t = view.transaction
    entries = sorted(view.timeline, key=lambda e: (e.unix_ms, e.lsn))
    end_of_txn = s.ended_unix_ms or now_ms
    out: list[dict[str, Any]] = []

    own = [e for e in entries if not e.branch]
    txn_lane: list[Segment] = []
    for i, e in enumerate(own):
        nxt = own[i + 1].unix_ms if i + 1 < len(own) else end_of_txn
        state = _state_name(e.state)
        if i + 1 == len(own) and e.state in FINAL_STATES:
            nxt = e.unix_ms  # a final state is a point, not a span
        txn_lane.append(_segment(e.unix_ms, nxt, "state", state, error=e.error))
    out.append({"name": "transaction", "service": "", "segments": txn_lane})

    if t.protocol == pb.PROTOCOL_SAGA or t.steps:
        for i, st in enumerate(t.steps):
            name = st.step.name or f"step{i}"
            mine = [e for e in entries if e.branch == name]
            out.append(
                {
                    "name": name,
                    "service": st.step.service or st.step.address,
                    "segments": _step_segments(mine, end_of_txn),
                }
            )
        return out

    def first(kinds: set[int]) -> int:
        return next((e.unix_ms for e in own if e.kind in kinds), 0)

    K = pb.FeedEventKind
    prepared_at = first({K.FEED_EVENT_KIND_PREPARING})
    decided_at = first({K.FEED_EVENT_KIND_COMMIT, K.FEED_EVENT_KIND_ABORT})
    ended_at = first({K.FEED_EVENT_KIND_ENDED})
    for i, b in enumerate(t.branches):
        segs: list[Segment] = []
        state = _branch_state_name(b.state)
        if prepared_at:
            stop = decided_at or ended_at or end_of_txn
            prep_state = "REFUSED" if b.state == pb.BRANCH_STATE_REFUSED else "PREPARING"
            segs.append(
                _segment(prepared_at, stop, "prepare", prep_state, attempts=b.attempts, error="")
            )
            if decided_at and b.state != pb.BRANCH_STATE_REFUSED:
                segs.append(
                    _segment(
                        decided_at,
                        ended_at or end_of_txn,
                        "phase_two",
                        state,
                        attempts=b.attempts,
                        error=b.last_error,
                    )
                )
            elif b.last_error and segs:
                segs[-1]["error"] = b.last_error
        out.append(
            {
                "name": b.branch.branch_id or f"b{i + 1}",
                "service": b.branch.service or b.branch.address,
                "segments": segs,
            }
        )
    return out


_ACTION = {"RUNNING"}
_COMPENSATION = {"COMPENSATING"}


def _step_segments(mine: Sequence[pb.TimelineEntry], end_of_txn: int) -> list[Segment]:
    """A step's entries as bars: RUNNING -> its outcome is the action, COMPENSATING ->
    its outcome the compensation; a run still open at the end lasts until the
    transaction ended (or now). Attempt counts and errors are those of the bar's last
    entry."""
    segs: list[Segment] = []
    open_: tuple[str, pb.TimelineEntry] | None = None

    def close(at: int, outcome: str, last: pb.TimelineEntry) -> None:
        nonlocal open_
        assert open_ is not None
        phase, began = open_
        segs.append(
            _segment(
                began.unix_ms,
                at,
                phase,
                outcome,
                attempts=last.compensation_attempts if phase == "compensation" else last.attempts,
                error=last.error,
            )
        )
        open_ = None

    last_seen: pb.TimelineEntry | None = None
    for e in mine:
        state = _branch_state_name(e.branch_state)
        if open_ is not None:
            phase, _ = open_
            same = (phase == "action" and state in _ACTION) or (
                phase == "compensation" and state in _COMPENSATION
            )
            if same:  # another attempt of the same run: the bar goes on
                last_seen = e
                continue
            close(e.unix_ms, state, e)
            if state not in _ACTION and state not in _COMPENSATION:
                last_seen = e
                continue  # the outcome that ended the run
        if state in _ACTION:
            open_ = ("action", e)
        elif state in _COMPENSATION:
            open_ = ("compensation", e)
        else:  # an outcome with no run seen (e.g. SKIPPED, or a snapshot)
            segs.append(
                _segment(
                    e.unix_ms,
                    e.unix_ms,
                    "outcome",
                    state,
                    attempts=e.attempts,
                    error=e.error,
                )
            )
        last_seen = e
    if open_ is not None and last_seen is not None:
        phase, _ = open_
        close(end_of_txn, "RUNNING" if phase == "action" else "COMPENSATING", last_seen)
    return segs


def view_json(view: pb.TransactionView, *, trace_url: str, now_ms: int) -> dict[str, Any]:
    """``GET /api/transaction``: the summary, branches or steps, errors, timeline and its
    lanes, and the trace link."""
    t = view.transaction
    s = view.summary
    return {
        "summary": summary_json(s),
        "deadline_ms": t.deadline_unix_ms,
        "one_phase": t.one_phase,
        "branches": _branches(t),
        "timeline": [_timeline_entry(e) for e in view.timeline],
        "lanes": lanes(view, now_ms=now_ms),
        "trace_link": trace_link(trace_url, s.trace_id),
        "actions": {
            "retry": s.protocol == pb.PROTOCOL_SAGA and s.state == pb.TXN_STATE_STUCK,
            "cancel": s.protocol == pb.PROTOCOL_SAGA and s.state == pb.TXN_STATE_RUNNING,
        },
    }
