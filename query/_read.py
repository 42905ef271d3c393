"""The reads: ListTransactions (filters, orders, keyset pages), GetTransaction (the
timeline) and Stats, as SQL over a :class:`~accord.query._store.Store`.

Requests are checked before any SQL is built: an unknown enum value, a negative time, a
page size over :data:`MAX_PAGE_SIZE` or a bad page token is InvalidArgument with a
message that names the field.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import accord.v1 as pb
from accord.query import _cursor
from accord.query._errors import InvalidArgument, NotFound
from accord.query._project import FAILURE_STATES, PHASE_TWO_STATES, SUCCESS_STATES
from accord.query._store import Store, row_from

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: Stats' per-minute rows start this long ago by default.
DEFAULT_STATS_WINDOW_MS = 60 * 60_000
#: ... and go back at most this far (the rows are computed on each call).
MAX_STATS_WINDOW_MS = 24 * 60 * 60_000

_STATES = frozenset(v for v in pb.TxnState.values() if v)
_PROTOCOLS = frozenset(v for v in pb.Protocol.values() if v)
_ORDERS = frozenset(pb.QueryOrder.values())
_MAX_FILTER_ITEMS = 100

_ROW_COLS = "t.gid, t.shard, t.trace_id, t.ended_ms, t.last_lsn, t.txn"


def _name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def check_filter(flt: pb.TransactionFilter) -> None:
    for s in flt.states:
        if s not in _STATES:
            raise InvalidArgument(
                f"filter.states: unknown state {s} (known: "
                + ", ".join(f"{_name(pb.TxnState, v)}={v}" for v in sorted(_STATES))
                + ")"
            )
    for p in flt.protocols:
        if p not in _PROTOCOLS:
            raise InvalidArgument(
                f"filter.protocols: unknown protocol {p} (known: PROTOCOL_TWO_PHASE_COMMIT=1, "
                "PROTOCOL_SAGA=2)"
            )
    for name in ("states", "protocols", "services", "shards"):
        if len(getattr(flt, name)) > _MAX_FILTER_ITEMS:
            raise InvalidArgument(f"filter.{name}: at most {_MAX_FILTER_ITEMS} values")
    for name in (
        "started_after_unix_ms",
        "started_before_unix_ms",
        "ended_after_unix_ms",
        "ended_before_unix_ms",
    ):
        if getattr(flt, name) < 0:
            raise InvalidArgument(f"filter.{name} must be >= 0 (0: no bound)")
    for name in ("gid_prefix", "idempotency_key_prefix"):
        if len(getattr(flt, name)) > 256:
            raise InvalidArgument(f"filter.{name}: at most 256 characters")


def _prefix_end(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix`` (code point
    order, which is UTF-8 byte order); None when there is none."""
    p = prefix
    while p:
        last = ord(p[-1])
        if last < 0x10FFFF and not (0xD7FF <= last < 0xE000):
            return p[:-1] + chr(last + 1)
        p = p[:-1]
    return None


def _in(col: str, values: Sequence[Any], where: list[str], params: list[Any]) -> None:
    where.append(f"{col} IN ({','.join('?' * len(values))})")
    params.extend(values)


def _prefix(col: str, prefix: str, where: list[str], params: list[Any]) -> None:
    where.append(f"{col} >= ?")
    params.append(prefix)
    end = _prefix_end(prefix)
    if end is not None:
        where.append(f"{col} < ?")
        params.append(end)


def filter_sql(flt: pb.TransactionFilter) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    states: list[int] = list(dict.fromkeys(int(s) for s in flt.states))
    if flt.stuck:
        states = [pb.TXN_STATE_STUCK] if not states or pb.TXN_STATE_STUCK in states else [-1]
    if flt.phase_two_pending:
        pending = sorted(int(s) for s in PHASE_TWO_STATES)
        states = [s for s in states if s in PHASE_TWO_STATES] if states else pending
        states = states or [-1]
    if states:
        _in("t.state", states, where, params)
    if flt.protocols:
        _in("t.protocol", list(dict.fromkeys(int(p) for p in flt.protocols)), where, params)
    if flt.shards:
        _in("t.shard", list(dict.fromkeys(flt.shards)), where, params)
    if flt.services:
        svc = list(dict.fromkeys(flt.services))
        where.append(
            "t.gid IN (SELECT s.gid FROM txn_services s WHERE s.service IN "
            f"({','.join('?' * len(svc))}))"
        )
        params.extend(svc)
    if flt.started_after_unix_ms:
        where.append("t.created_ms >= ?")
        params.append(flt.started_after_unix_ms)
    if flt.started_before_unix_ms:
        where.append("t.created_ms < ?")
        params.append(flt.started_before_unix_ms)
    if flt.ended_after_unix_ms:
        where.append("t.ended_ms >= ?")
        params.append(flt.ended_after_unix_ms)
    if flt.ended_before_unix_ms:
        where.append("t.ended_ms > 0 AND t.ended_ms < ?")
        params.append(flt.ended_before_unix_ms)
    if flt.gid_prefix:
        _prefix("t.gid", flt.gid_prefix, where, params)
    if flt.idempotency_key_prefix:
        _prefix("t.idempotency_key", flt.idempotency_key_prefix, where, params)
    return where, params


def _order(order: int, now_ms: int) -> tuple[str, str, list[Any]]:
    """(sort key expression, direction, its params)."""
    if order in (pb.QUERY_ORDER_UNSPECIFIED, pb.QUERY_ORDER_STARTED_DESC):
        return "t.created_ms", "DESC", []
    if order == pb.QUERY_ORDER_STARTED_ASC:
        return "t.created_ms", "ASC", []
    if order == pb.QUERY_ORDER_ENDED_DESC:
        return "t.ended_ms", "DESC", []
    # Unfinished transactions: their age so far, as of the first page's "now".
    return (
        "(CASE WHEN t.ended_ms > 0 THEN t.duration_ms ELSE ? - t.created_ms END)",
        "DESC",
        [now_ms],
    )


def _sort_value(order: int, summary: pb.TransactionSummary, now_ms: int) -> int:
    if order in (
        pb.QUERY_ORDER_UNSPECIFIED,
        pb.QUERY_ORDER_STARTED_DESC,
        pb.QUERY_ORDER_STARTED_ASC,
    ):
        return int(summary.created_unix_ms)
    if order == pb.QUERY_ORDER_ENDED_DESC:
        return int(summary.ended_unix_ms)
    if summary.ended_unix_ms:
        return int(summary.duration_ms)
    return now_ms - int(summary.created_unix_ms)


async def list_transactions(
    store: Store, req: pb.QueryListRequest, *, now_ms: int | None = None
) -> pb.QueryListResponse:
    if req.order not in _ORDERS:
        raise InvalidArgument(
            f"order: unknown value {req.order} (known: "
            + ", ".join(f"{_name(pb.QueryOrder, v)}={v}" for v in sorted(_ORDERS))
            + ")"
        )
    if req.page_size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size {req.page_size} is over the limit of {MAX_PAGE_SIZE}")
    check_filter(req.filter)
    size = req.page_size or DEFAULT_PAGE_SIZE
    order = int(req.order) or pb.QUERY_ORDER_STARTED_DESC
    secret = await store.secret()
    cursor = None
    if req.page_token:
        cursor = _cursor.decode(req.page_token, req.filter, order, secret)
    now = cursor.now_ms if cursor is not None and cursor.now_ms else now_ms or _now_ms()
    where, params = filter_sql(req.filter)
    key, direction, key_params = _order(order, now)
    if cursor is not None:
        cmp = ">" if direction == "ASC" else "<"
        where.append(f"({key} {cmp} ? OR ({key} = ? AND t.gid {cmp} ?))")
        params.extend([*key_params, cursor.key, *key_params, cursor.key, cursor.gid])
    sql = (
        f"SELECT {_ROW_COLS} FROM transactions t"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY {key} {direction}, t.gid {direction} LIMIT ?"
    )
    rows = await store.fetch(sql, [*params, *key_params, size + 1])
    summaries = [row_from(r).summary() for r in rows[:size]]
    token = ""
    if len(rows) > size and summaries:
        last = summaries[-1]
        token = _cursor.encode(
            _cursor.Cursor(
                order=order,
                key=_sort_value(order, last, now),
                gid=last.gid,
                now_ms=now if order == pb.QUERY_ORDER_DURATION_DESC else 0,
            ),
            req.filter,
            secret,
        )
    return pb.QueryListResponse(transactions=summaries, next_page_token=token)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def get_transaction(store: Store, gid: str) -> pb.TransactionView:
    if not gid:
        raise InvalidArgument("gid is required")
    if len(gid) > 256:
        raise InvalidArgument("gid: at most 256 characters")
    got = await store.get(gid)
    if got is None:
        raise NotFound(f"transaction {gid} is not in the read model (unknown, or not seen yet)")
    row, timeline = got
    return pb.TransactionView(summary=row.summary(), transaction=row.txn, timeline=timeline)


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(round(q * len(sorted_values), 9)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


async def stats(
    store: Store, req: pb.StatsRequest, *, now_ms: int | None = None
) -> pb.StatsResponse:
    now = now_ms or _now_ms()
    if req.since_unix_ms < 0:
        raise InvalidArgument("since_unix_ms must be >= 0 (0: an hour ago)")
    since = req.since_unix_ms or now - DEFAULT_STATS_WINDOW_MS
    if now - since > MAX_STATS_WINDOW_MS:
        raise InvalidArgument(
            f"since_unix_ms is more than {MAX_STATS_WINDOW_MS // 3_600_000} hours ago"
        )
    since = since - since % 60_000
    if len(req.service) > 256:
        raise InvalidArgument("service: at most 256 characters")
    only = req.service
    svc_where = " WHERE gid IN (SELECT gid FROM txn_services WHERE service = ?)" if only else ""
    counts = await store.fetch(
        f"SELECT state, COUNT(*) FROM transactions{svc_where} GROUP BY state ORDER BY state",
        [only] if only else [],
    )
    out = pb.StatsResponse(
        counts=[pb.StateCount(state=int(s), count=int(n)) for s, n in counts]  # type: ignore[arg-type]
    )
    # Per minute: "" (every service, or the one asked for) and each service.
    started: dict[tuple[int, str], int] = defaultdict(int)
    ended: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)
    started_rows = await store.fetch(
        "SELECT t.created_ms - (t.created_ms % 60000), s.service, COUNT(*) "
        "FROM transactions t JOIN txn_services s ON s.gid = t.gid "
        "WHERE t.created_ms >= ? GROUP BY 1, 2",
        [since],
    )
    overall_started = await store.fetch(
        f"SELECT created_ms - (created_ms % 60000), COUNT(*) FROM transactions"
        f"{svc_where + ' AND' if only else ' WHERE'} created_ms >= ? GROUP BY 1",
        [*([only] if only else []), since],
    )
    for minute, service, n in started_rows:
        if not only or service == only:
            started[(int(minute), service)] += int(n)
    for minute, n in overall_started:
        started[(int(minute), "")] += int(n)
    ended_rows = await store.fetch(
        "SELECT t.gid, t.ended_ms, t.duration_ms, t.state, s.service FROM transactions t "
        "LEFT JOIN txn_services s ON s.gid = t.gid WHERE t.ended_ms >= ?",
        [since],
    )
    seen: set[tuple[str, int]] = set()
    for gid, ended_ms, duration, state, service in ended_rows:
        minute = int(ended_ms) - int(ended_ms) % 60_000
        if service and (not only or service == only):
            ended[(minute, service)].append((int(duration), int(state)))
        if (not only or service == only) and (gid, minute) not in seen:
            seen.add((gid, minute))
            ended[(minute, "")].append((int(duration), int(state)))
    for minute, service in sorted({*started, *ended}, key=lambda k: (k[0], k[1])):
        done = ended.get((minute, service), [])
        durations = sorted(d for d, _ in done)
        out.minutes.append(
            pb.MinuteStats(
                minute_unix_ms=minute,
                service=service,
                started=started.get((minute, service), 0),
                ended=len(done),
                committed=sum(1 for _, s in done if s in SUCCESS_STATES),
                aborted=sum(1 for _, s in done if s in FAILURE_STATES),
                p50_ms=percentile(durations, 0.50),
                p95_ms=percentile(durations, 0.95),
                p99_ms=percentile(durations, 0.99),
            )
        )
    return out
