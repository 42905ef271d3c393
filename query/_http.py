"""The query service's HTTP side (``accord query --http ADDR``): ``/healthz`` and the web
console, both on one aiohttp application (``build_http_app(backend, console=...)``).

``GET /healthz`` answers JSON: ``healthy``, ``reasons`` (why not), ``max_lag_events``
and per shard ``shard``, ``coordinator``, ``connected``, ``applied_lsn``,
``durable_lsn``, ``lag_events``, ``lag_seconds``; status 200 when every shard is
connected and behind by at most ``max_lag_events`` events, else 503.

The console (pages and script under ``static/``, no CDN, no framework):

- ``GET /`` the transactions page, ``GET /transaction?gid=GID`` one transaction.
- ``GET /api/config``: the trace URL template in use, whether operator actions are on,
  and the CSRF token the actions need.
- ``GET /api/transactions?state=..&protocol=..&service=..&shard=..&stuck=..
  &phase_two_pending=..&started_after=..&started_before=..&ended_after=..&ended_before=..
  &gid_prefix=..&key_prefix=..&order=..&page_size=..&page_token=..`` (ListTransactions),
  ``GET /api/transaction?gid=GID`` (GetTransaction, with the timeline's Gantt lanes),
  ``GET /api/stats?service=..&since=..`` (Stats).
- ``GET /api/events?<filter>``: Server-Sent Events, one ``change`` event per change the
  read model applies (the summary and whether it matches the filter); the stream ends
  when the backend drops a slow subscriber, and the browser reconnects.
- ``POST /api/actions/retry`` and ``/api/actions/cancel`` with JSON ``{"gid": ..}`` and
  header ``X-CSRF-Token``: RetryTransaction of a STUCK saga, CancelSaga of a running one,
  sent to the coordinator owning the saga's shard; the coordinator answers once the saga
  has settled, and after ``action_timeout_s`` the console answers 202 (still settling).
  Off (403) unless the service runs with ``--console-actions``.

With auth on (``--auth-tokens``/``--auth-jwt-key``, ``accord.common.auth``), every
``/api/`` request (and ``/rebuild``) needs a bearer token, in an ``Authorization:
Bearer`` header or an ``accord_token`` cookie (a browser's EventSource sends no headers):
reads need the reader (or admin) role, the operator actions admin, and the action is
sent to the coordinator with the same token. 401 without a valid token, 403 for a role
that does not allow it. The pages and static files hold no data and stay open.

Bad input (an unknown parameter or value, a page size over 1000, a bad cursor) is 400
with ``{"error": ..., "code": "INVALID_ARGUMENT"}``, as gRPC would say INVALID_ARGUMENT;
an unknown gid is 404. Every response carries a Content-Security-Policy that allows
scripts from this origin only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

import accord.v1 as pb
from accord.common.auth import (
    Authenticator,
    PermissionDenied,
    Role,
    Unauthenticated,
    bearer_metadata,
    http_authorization,
)
from accord.common.transport import TransportSettings, make_channel
from accord.query import _console
from accord.query._backend import QueryBackend
from accord.query._errors import InvalidArgument, NotFound

log = logging.getLogger("accord.query.console")

#: The application key under which the backend is kept (for the console's handlers).
BACKEND: web.AppKey[QueryBackend] = web.AppKey("accord_query_backend", QueryBackend)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: An SSE stream sends a comment this often, so proxies and the browser keep it open.
SSE_PING_S = 15.0
#: A client further behind than this many changes is dropped (it reconnects).
SSE_BUFFER = 1024
MAX_BODY = 4096
#: Why the operator actions are disabled, as the console's tooltip says it.
_OFF = "off: start accord query with --console-actions (and, with auth on, use an admin token)"


@dataclass(frozen=True, kw_only=True)
class ConsoleOptions:
    """``trace_url``: ``--trace-url`` (``{trace_id}`` is replaced; "" = no link).
    ``actions``: ``--console-actions`` (retry/cancel call the coordinator)."""

    trace_url: str = ""
    actions: bool = False
    transport: TransportSettings | None = None
    action_timeout_s: float = 10.0
    #: Auth on: the verifier of the callers' tokens (None: open, as without auth).
    auth: Authenticator | None = None

    def __post_init__(self) -> None:
        _console.check_trace_url(self.trace_url)


@dataclass
class _Console:
    options: ConsoleOptions
    csrf: str
    #: Set when the application shuts down: event streams end at once, so stopping the
    #: service does not wait out aiohttp's shutdown timeout for open browsers.
    closing: asyncio.Event


CONSOLE: web.AppKey[_Console] = web.AppKey("accord_query_console", _Console)


def _static_dir() -> Path:
    return Path(str(resources.files("accord.query") / "static"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The one place where the console's errors become HTTP statuses."""
    try:
        return await handler(request)
    except InvalidArgument as e:
        return _error(400, "INVALID_ARGUMENT", str(e))
    except NotFound as e:
        return _error(404, "NOT_FOUND", str(e))
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("event=console_error path=%s", request.path)
        return _error(500, "INTERNAL", "internal error (see the query service's log)")


#: The paths that need a token when auth is on, and the roles that may use them.
_ADMIN_PATHS = ("/api/actions/", "/rebuild")


@web.middleware
async def _authorize(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """With auth on: ``/api/`` needs a reader's token, the actions and ``/rebuild`` an
    admin's (the pages, static files and /healthz are open). Nothing is logged."""
    auth = request.app[CONSOLE].options.auth
    path = request.path
    admin = path.startswith(_ADMIN_PATHS)
    if auth is None or not (admin or path.startswith("/api/")):
        return await handler(request)
    try:
        principal = auth.authenticate(http_authorization(request.headers, request.cookies))
        principal.require(Role.ADMIN if admin else Role.READER)
    except Unauthenticated as e:
        return _error(401, "UNAUTHENTICATED", str(e))
    except PermissionDenied as e:
        return _error(403, "PERMISSION_DENIED", str(e))
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"


async def _healthz(request: web.Request) -> web.Response:
    health = request.app[BACKEND].health()
    return web.json_response(health.to_dict(), status=200 if health.healthy else 503)


# ---------------------------------------------------------------- pages


def _page(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(_static_dir() / name, headers={"Cache-Control": "no-cache"})

    return handler


# ---------------------------------------------------------------- reads


def _query(request: web.Request) -> list[tuple[str, str]]:
    return list(request.query.items())


async def _config(request: web.Request) -> web.Response:
    c = request.app[CONSOLE]
    return web.json_response(
        {
            "trace_url": c.options.trace_url,
            "actions": c.options.actions,
            "actions_off_reason": "" if c.options.actions else _OFF,
            "csrf_token": c.csrf,
        },
        headers={"Cache-Control": "no-store"},
    )


async def _list(request: web.Request) -> web.Response:
    req = _console.parse_list(_query(request))
    resp = await request.app[BACKEND].list(req)
    return web.json_response(_console.list_json(resp))


def _gid(request: web.Request) -> str:
    p = _console.Params(_query(request), frozenset({"gid"}))
    gid = p.one("gid")
    if not gid:
        raise InvalidArgument("gid: required")
    return gid


async def _get(request: web.Request) -> web.Response:
    view = await request.app[BACKEND].get(_gid(request))
    c = request.app[CONSOLE]
    return web.json_response(
        _console.view_json(view, trace_url=c.options.trace_url, now_ms=_now_ms())
    )


async def _stats(request: web.Request) -> web.Response:
    req = _console.parse_stats(_query(request))
    resp = await request.app[BACKEND].stats(req)
    return web.json_response(_console.stats_json(resp))


async def _events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: ``event: change`` with ``{"txn": summary, "matches": bool}``
    for each change; a comment every :data:`SSE_PING_S` seconds."""
    flt = _console.parse_events(_query(request))
    backend = request.app[BACKEND]
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    await resp.write(b"retry: 2000\n: connected\n\n")
    changes = backend.changes(buffer=SSE_BUFFER)
    # One pending read at a time, never cancelled by a ping: cancelling the generator's
    # __anext__ would end the subscription.
    nxt: asyncio.Future[Any] = asyncio.ensure_future(anext(changes))
    closing: asyncio.Future[Any] = asyncio.ensure_future(request.app[CONSOLE].closing.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {nxt, closing}, timeout=SSE_PING_S, return_when=asyncio.FIRST_COMPLETED
            )
            if closing in done:
                break
            if not done:
                await resp.write(b": ping\n\n")
                continue
            try:
                s = nxt.result()
            except StopAsyncIteration:  # dropped as too slow: the browser reconnects
                break
            data = {"txn": _console.summary_json(s), "matches": _console.matches(flt, s)}
            payload = json.dumps(data, separators=(",", ":"))
            await resp.write(f"event: change\ndata: {payload}\n\n".encode())
            nxt = asyncio.ensure_future(anext(changes))
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the browser went away (or the server is stopping)
    finally:
        for fut in (nxt, closing):
            fut.cancel()
            with contextlib.suppress(BaseException):
                await fut
        await changes.aclose()  # type: ignore[attr-defined]
    return resp


# ---------------------------------------------------------------- operator actions

_GRPC_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return origin == f"{request.scheme}://{request.host}"


async def _action(request: web.Request) -> web.Response:
    kind = request.match_info["action"]
    c = request.app[CONSOLE]
    if not c.options.actions:
        return _error(403, "PERMISSION_DENIED", f"operator actions are off: {_OFF}")
    token = request.headers.get("X-CSRF-Token", "")
    if not hmac.compare_digest(token.encode(), c.csrf.encode()) or not _same_origin(request):
        return _error(403, "PERMISSION_DENIED", "missing or wrong CSRF token, or another origin")
    if request.content_type != "application/json":
        raise InvalidArgument("the body must be JSON (Content-Type: application/json)")
    if (request.content_length or 0) > MAX_BODY:
        raise InvalidArgument(f"the body is over {MAX_BODY} bytes")
    try:
        body = json.loads(await request.text())
    except ValueError:
        raise InvalidArgument("the body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("gid"), str) or not body["gid"]:
        raise InvalidArgument('the body must be {"gid": "..."}')
    gid: str = body["gid"]
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > _console.MAX_TEXT:
        raise InvalidArgument(f"reason: a string of at most {_console.MAX_TEXT} characters")
    backend = request.app[BACKEND]
    view = await backend.get(gid)
    s = view.summary
    if s.protocol != pb.PROTOCOL_SAGA:
        return _error(409, "FAILED_PRECONDITION", f"{gid} is not a saga")
    state = _console.short(pb.TxnState, s.state, "TXN_STATE_")
    if kind == "retry" and s.state != pb.TXN_STATE_STUCK:
        return _error(409, "FAILED_PRECONDITION", f"only a STUCK saga is retried ({state} now)")
    if kind == "cancel" and s.state != pb.TXN_STATE_RUNNING:
        return _error(409, "FAILED_PRECONDITION", f"only a RUNNING saga is cancelled ({state})")
    address = backend.coordinator_for(s.shard)
    if not address:
        return _error(503, "UNAVAILABLE", f"no coordinator known for shard {s.shard!r} now")
    log.info("event=console_action action=%s gid=%s coordinator=%s", kind, gid, address)
    channel = make_channel(address, c.options.transport)
    # The operator's own token goes on to the coordinator (auth on: an admin's, checked
    # by the middleware and again by the coordinator).
    md: tuple[tuple[str, str], ...] = ()
    if c.options.auth is not None:
        value = http_authorization(request.headers, request.cookies) or ""
        md = bearer_metadata(value.partition(" ")[2].strip())
    try:
        stub = pb.CoordinatorStub(channel)
        timeout = c.options.action_timeout_s
        if kind == "retry":
            resp = await stub.RetryTransaction(
                pb.RetryTransactionRequest(gid=gid), timeout=timeout, metadata=md
            )
        else:
            resp = await stub.CancelSaga(
                pb.CancelSagaRequest(gid=gid, reason=reason or "cancelled from the console"),
                timeout=timeout,
                metadata=md,
            )
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            # The coordinator answers once the saga has settled (final or STUCK), and a
            # compensation being retried can take longer than any page should wait.
            log.info("event=console_action_pending action=%s gid=%s", kind, gid)
            return web.json_response(
                {
                    "gid": gid,
                    "state": "",
                    "pending": True,
                    "coordinator": address,
                    "message": f"sent; no answer within {timeout:g} s: the saga is still "
                    "settling (this page follows it live)",
                },
                status=202,
            )
        status = _GRPC_HTTP.get(e.code(), 502)
        log.info("event=console_action_failed gid=%s code=%s", gid, e.code().name)
        return _error(status, e.code().name, f"coordinator {address}: {e.details()}")
    finally:
        await channel.close()
    t = resp.transaction
    return web.json_response(
        {
            "gid": t.gid,
            "state": _console.short(pb.TxnState, t.state, "TXN_STATE_"),
            "reason": t.reason,
            "coordinator": address,
        }
    )


def build_http_app(
    backend: QueryBackend, *, console: ConsoleOptions | None = None
) -> web.Application:
    """The aiohttp application with ``/healthz`` and the console; ``app[BACKEND]`` is
    the backend."""
    app = web.Application(middlewares=[_authorize, _errors], client_max_size=MAX_BODY * 4)
    app[BACKEND] = backend
    state = _Console(
        options=console or ConsoleOptions(),
        csrf=secrets.token_urlsafe(32),
        closing=asyncio.Event(),
    )
    app[CONSOLE] = state

    async def close_streams(_: web.Application) -> None:
        state.closing.set()

    app.on_shutdown.append(close_streams)
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/transaction", _page("transaction.html"))
    app.router.add_static("/static/", _static_dir(), follow_symlinks=False)
    app.router.add_get("/api/config", _config)
    app.router.add_get("/api/transactions", _list)
    app.router.add_get("/api/transaction", _get)
    app.router.add_get("/api/stats", _stats)
    app.router.add_get("/api/events", _events)
    app.router.add_post(r"/api/actions/{action:retry|cancel}", _action)
    return app
