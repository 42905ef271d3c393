"""The web console's HTTP side against a real read model (QueryApp on SQLite, fed events
directly): pages and their security headers, the JSON API's validation (400 with a JSON
error where gRPC would say INVALID_ARGUMENT), filters that match what the SQL returns,
the timeline's Gantt lanes, Server-Sent Events, and the operator actions' guards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import accord.v1 as pb
from accord.query import ConsoleOptions, QueryApp, SqliteStore, _console, build_http_app
from tests.unit import _query_events as ev

Client = TestClient[web.Request, web.Application]

XSS = "<img src=x onerror=alert(1)>"


async def _feed(app: QueryApp) -> None:
    """2PC commits and aborts on two shards, a compensated saga and a STUCK one."""
    s1 = [
        *ev.two_pc("s1:c1", 1, ["bank-a", "bank-b"], t=0, key="key-1"),
        ev.preparing("s1:a1", 4, ["bank-a", "bank-b"], t=1000),
        ev.abort("s1:a1", 5, f"branch b1 refused: unknown account {XSS!r}", t=1010),
        ev.ended("s1:a1", 6, pb.TXN_STATE_ABORTED, t=1020, branches={"b1": 4}),
        ev.begun("s1:run", 7, t=2000),
    ]
    s2 = [
        ev.saga_started("s2:g1", 1, [("debit", "bank-a"), ("credit", "bank-b")], t=0),
        ev.step("s2:g1", 2, 0, pb.BRANCH_STATE_RUNNING, t=10),
        ev.step("s2:g1", 3, 0, pb.BRANCH_STATE_SUCCEEDED, t=20),
        ev.step("s2:g1", 4, 1, pb.BRANCH_STATE_RUNNING, t=30),
        ev.step("s2:g1", 5, 1, pb.BRANCH_STATE_RUNNING, attempts=2, error="UNAVAILABLE", t=40),
        ev.step("s2:g1", 6, 1, pb.BRANCH_STATE_FAILED, attempts=3, error="no such account", t=50),
        ev.saga_state("s2:g1", 7, pb.TXN_STATE_COMPENSATING, t=50),
        ev.step("s2:g1", 8, 0, pb.BRANCH_STATE_COMPENSATING, t=60),
        ev.step("s2:g1", 9, 0, pb.BRANCH_STATE_COMPENSATED, t=70),
        ev.saga_state("s2:g1", 10, pb.TXN_STATE_COMPENSATED, t=80),
        ev.saga_started("s2:stuck", 11, [("x", "bank-c")], t=3000),
        ev.step("s2:stuck", 12, 0, pb.BRANCH_STATE_FAILED, t=3010),
        ev.saga_state("s2:stuck", 13, pb.TXN_STATE_STUCK, reason="compensation of x", t=3020),
    ]
    for e in s2:
        e.shard = "s2"
    await app._apply("s1", s1)
    await app._apply("s2", s2)


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[QueryApp]:
    app = QueryApp(SqliteStore(tmp_path / "q.db"))
    await app.start()
    await _feed(app)
    try:
        yield app
    finally:
        await app.stop()


async def _client(backend: QueryApp, **options: Any) -> Client:
    client: Client = TestClient(
        TestServer(build_http_app(backend, console=ConsoleOptions(**options)))
    )
    await client.start_server()
    return client


@pytest.fixture
async def http(backend: QueryApp) -> AsyncIterator[Client]:
    client = await _client(backend, trace_url="http://jaeger:16686/trace/{trace_id}")
    try:
        yield client
    finally:
        await client.close()


async def _json(client: Client, url: str, status: int = 200) -> Any:
    resp = await client.get(url)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def test_pages_and_assets_carry_a_csp_and_no_inline_script(http: Client) -> None:
    for url in ("/", "/transaction?gid=s1:c1", "/static/console.js", "/static/console.css"):
        resp = await http.get(url)
        assert resp.status == 200, url
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        text = await resp.text()
        if url in ("/", "/transaction?gid=s1:c1"):
            assert '<script type="module" src="/static/console.js"></script>' in text
            assert text.count("<script") == 1  # nothing inline
    js = await (await http.get("/static/console.js")).text()
    assert "innerHTML" not in js.replace("never innerHTML", "")
    assert (await http.get("/static/../_http.py")).status in (403, 404)
    health = await http.get("/healthz")
    assert health.status in (200, 503) and "healthy" in await health.json()


async def test_list_filters_order_and_pages(http: Client) -> None:
    body = await _json(http, "/api/transactions?state=ABORTED")
    assert [t["gid"] for t in body["transactions"]] == ["s1:a1"]
    assert body["transactions"][0]["reason"].endswith(f"{XSS!r}")
    assert body["transactions"][0]["state"] == "ABORTED"
    body = await _json(http, "/api/transactions?state=committed,txn_state_stuck")
    assert {t["gid"] for t in body["transactions"]} == {"s1:c1", "s2:stuck"}
    body = await _json(http, "/api/transactions?protocol=saga&order=started_asc")
    assert [t["gid"] for t in body["transactions"]] == ["s2:g1", "s2:stuck"]
    body = await _json(http, "/api/transactions?stuck=true")
    assert [t["gid"] for t in body["transactions"]] == ["s2:stuck"]
    body = await _json(http, "/api/transactions?service=bank-c")
    assert [t["gid"] for t in body["transactions"]] == ["s2:stuck"]
    body = await _json(http, "/api/transactions?shard=s1&gid_prefix=s1:a")
    assert [t["gid"] for t in body["transactions"]] == ["s1:a1"]
    body = await _json(http, "/api/transactions?key_prefix=key-")
    assert [t["gid"] for t in body["transactions"]] == ["s1:c1"]
    after = ev.T0 + 2500
    body = await _json(http, f"/api/transactions?started_after={after}")
    assert [t["gid"] for t in body["transactions"]] == ["s2:stuck"]
    seen: list[str] = []
    token = ""
    for _ in range(10):
        url = "/api/transactions?page_size=2" + (f"&page_token={token}" if token else "")
        page = await _json(http, url)
        seen += [t["gid"] for t in page["transactions"]]
        token = page["next_page_token"]
        if not token:
            break
    everything = await _json(http, "/api/transactions")
    assert seen == [t["gid"] for t in everything["transactions"]] and len(seen) == 5


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("state=NOPE", "state: unknown value 'NOPE'"),
        ("state=UNSPECIFIED", "state: unknown value"),
        ("protocol=3pc", "protocol: unknown value"),
        ("page_size=5000", "page_size: 5000 is out of range"),
        ("page_size=-1", "page_size: -1 is out of range"),
        ("page_size=ten", "page_size: not an integer"),
        ("page_token=garbage", "page_token"),
        ("started_after=99999999999999999999999", "started_after"),
        ("stuck=maybe", "stuck: expected true or false"),
        ("order=sideways", "order: unknown value"),
        ("colour=red", "unknown parameter 'colour'"),
        ("gid_prefix=" + "x" * 300, "gid_prefix: longer than 256"),
        ("order=started_asc&order=started_desc", "order: given 2 times"),
        ("shard=" + ",".join(str(i) for i in range(101)), "shard: at most 100 values"),
    ],
)
async def test_bad_input_is_400_with_a_json_error(http: Client, query: str, needle: str) -> None:
    body = await _json(http, f"/api/transactions?{query}", status=400)
    assert body["code"] == "INVALID_ARGUMENT"
    assert needle in body["error"], body


async def test_bad_input_elsewhere(http: Client) -> None:
    assert (await _json(http, "/api/transaction", 400))["error"] == "gid: required"
    assert (await _json(http, "/api/transaction?gid=nope:1", 404))["code"] == "NOT_FOUND"
    assert (await _json(http, "/api/stats?since=-5", 400))["code"] == "INVALID_ARGUMENT"
    assert (await _json(http, "/api/events?order=x", 400))["code"] == "INVALID_ARGUMENT"


async def test_transaction_view_lanes_and_trace_link(http: Client) -> None:
    v = await _json(http, "/api/transaction?gid=s1:c1")
    assert v["summary"]["state"] == "COMMITTED"
    assert v["trace_link"] == ""  # no trace id recorded for it
    traced = await _json(http, "/api/transaction?gid=s1:run")
    assert traced["trace_link"] == "http://jaeger:16686/trace/" + "ab" * 16
    names = [lane["name"] for lane in v["lanes"]]
    assert names == ["transaction", "b1", "b2"]
    b1 = v["lanes"][1]["segments"]
    assert [s["phase"] for s in b1] == ["prepare", "phase_two"]
    assert b1[1]["state"] == "COMMITTED" and b1[0]["end_ms"] == b1[1]["start_ms"]

    v = await _json(http, "/api/transaction?gid=s1:a1")
    refused = v["lanes"][1]["segments"]
    assert [(s["phase"], s["state"]) for s in refused] == [("prepare", "REFUSED")]
    assert XSS in v["summary"]["reason"]

    v = await _json(http, "/api/transaction?gid=s2:g1")
    lanes = {lane["name"]: lane["segments"] for lane in v["lanes"]}
    assert [(s["phase"], s["state"]) for s in lanes["debit"]] == [
        ("action", "SUCCEEDED"),
        ("compensation", "COMPENSATED"),
    ]
    credit = lanes["credit"]
    assert [(s["phase"], s["state"], s["attempts"]) for s in credit] == [("action", "FAILED", 3)]
    assert credit[0]["error"] == "no such account"
    assert credit[0]["end_ms"] - credit[0]["start_ms"] == 20
    assert v["actions"] == {"retry": False, "cancel": False}
    assert [b["name"] for b in v["branches"]] == ["debit", "credit"]

    v = await _json(http, "/api/transaction?gid=s2:stuck")
    assert v["actions"] == {"retry": True, "cancel": False}


async def test_stats_counts_and_minutes(http: Client) -> None:
    stats = await _json(http, "/api/stats")
    assert stats["counts"] == {
        "ACTIVE": 1,
        "ABORTED": 1,
        "COMMITTED": 1,
        "COMPENSATED": 1,
        "STUCK": 1,
    }
    assert isinstance(stats["minutes"], list) and isinstance(stats["shards"], list)


async def _next_event(resp: Any, timeout_s: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        event = ""
        while True:
            line = (await resp.content.readline()).decode()
            if line.startswith("event: "):
                event = line[7:].strip()
            elif line.startswith("data: ") and event == "change":
                return dict(json.loads(line[6:]))


async def test_events_stream_changes_with_whether_they_match(
    http: Client, backend: QueryApp
) -> None:
    resp = await http.get("/api/events?state=ABORTED")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert (await resp.content.readline()).startswith(b"retry:")
    await backend._apply("s1", [ev.abort("s1:run", 8, "client said so", t=2100)])
    change = await _next_event(resp)
    assert change["txn"]["gid"] == "s1:run" and change["txn"]["state"] == "ABORTING"
    assert change["matches"] is False
    await backend._apply("s1", [ev.ended("s1:run", 9, pb.TXN_STATE_ABORTED, t=2200)])
    change = await _next_event(resp)
    assert change["txn"]["state"] == "ABORTED" and change["matches"] is True
    resp.close()


async def test_shutting_down_ends_open_event_streams(http: Client) -> None:
    resp = await http.get("/api/events")
    assert (await resp.content.readline()).startswith(b"retry:")
    assert http.app is not None
    await http.app.shutdown()  # what runner.cleanup() does before waiting for handlers
    async with asyncio.timeout(5):
        rest = await resp.content.read()
    assert b"event: change" not in rest
    resp.close()


FILTERS: list[dict[str, Any]] = [
    {},
    {"states": [pb.TXN_STATE_ABORTED]},
    {"states": [pb.TXN_STATE_COMMITTED, pb.TXN_STATE_STUCK]},
    {"stuck": True},
    {"stuck": True, "states": [pb.TXN_STATE_ABORTED]},
    {"phase_two_pending": True},
    {"protocols": [pb.PROTOCOL_SAGA]},
    {"services": ["bank-b"]},
    {"shards": ["s2"]},
    {"gid_prefix": "s1:"},
    {"idempotency_key_prefix": "key"},
    {"started_after_unix_ms": ev.T0 + 1000},
    {"started_before_unix_ms": ev.T0 + 1000},
    {"ended_after_unix_ms": ev.T0 + 70},
    {"ended_before_unix_ms": ev.T0 + 2000},
]


@pytest.mark.parametrize("kw", FILTERS)
async def test_live_matching_agrees_with_the_sql(backend: QueryApp, kw: dict[str, Any]) -> None:
    flt = pb.TransactionFilter(**kw)
    listed = await backend.list(pb.QueryListRequest(filter=flt, page_size=1000))
    everything = await backend.list(pb.QueryListRequest(page_size=1000))
    matched = [s.gid for s in everything.transactions if _console.matches(flt, s)]
    assert matched == [s.gid for s in listed.transactions]


async def test_actions_are_off_by_default(backend: QueryApp) -> None:
    client = await _client(backend)
    try:
        cfg = await _json(client, "/api/config")
        assert cfg["actions"] is False and "--console-actions" in cfg["actions_off_reason"]
        resp = await client.post(
            "/api/actions/retry",
            json={"gid": "s2:stuck"},
            headers={"X-CSRF-Token": cfg["csrf_token"]},
        )
        assert resp.status == 403 and "--console-actions" in (await resp.json())["error"]
    finally:
        await client.close()


async def test_actions_need_the_csrf_token_and_a_saga_in_the_right_state(
    backend: QueryApp,
) -> None:
    client = await _client(backend, actions=True)
    try:
        cfg = await _json(client, "/api/config")
        token = {"X-CSRF-Token": cfg["csrf_token"]}

        async def post(action: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
            resp = await client.post(f"/api/actions/{action}", json=body, headers=headers)
            return resp.status, await resp.json()

        assert (await post("retry", {"gid": "s2:stuck"}, {}))[0] == 403
        assert (await post("retry", {"gid": "s2:stuck"}, {"X-CSRF-Token": "x"}))[0] == 403
        other_origin = {**token, "Origin": "http://evil.example"}
        assert (await post("retry", {"gid": "s2:stuck"}, other_origin))[0] == 403
        status, body = await post("retry", {"gid": 5}, token)
        assert status == 400 and body["code"] == "INVALID_ARGUMENT"
        assert (await post("retry", {"gid": "nope:1"}, token))[0] == 404
        status, body = await post("retry", {"gid": "s1:c1"}, token)
        assert status == 409 and "not a saga" in body["error"]
        status, body = await post("retry", {"gid": "s2:g1"}, token)
        assert status == 409 and "only a STUCK saga" in body["error"]
        status, body = await post("cancel", {"gid": "s2:stuck"}, token)
        assert status == 409 and "only a RUNNING saga" in body["error"]
        # STUCK, but the backend follows no coordinator for s2 here.
        status, body = await post("retry", {"gid": "s2:stuck"}, token)
        assert status == 503 and "no coordinator known for shard 's2'" in body["error"]
        resp = await client.post("/api/actions/delete", json={"gid": "s2:stuck"}, headers=token)
        assert resp.status in (404, 405)
    finally:
        await client.close()


def test_trace_url_must_be_http_with_the_placeholder() -> None:
    ConsoleOptions(trace_url="https://tempo/trace/{trace_id}")
    for bad in ("jaeger/{trace_id}", "javascript:alert(1)//{trace_id}", "http://jaeger/trace"):
        with pytest.raises(ValueError, match="--trace-url"):
            ConsoleOptions(trace_url=bad)
    assert _console.trace_link("http://j/t/{trace_id}", "a/b") == "http://j/t/a%2Fb"
    assert _console.trace_link("", "abc") == ""
