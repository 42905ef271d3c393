"""The query service's HTTP side (``accord query --http ADDR``): ``/healthz`` here; the
web console adds its pages to the same application (``build_http_app(backend)`` then
its own routes).

``GET /healthz`` answers JSON: ``healthy``, ``reasons`` (why not), ``max_lag_events``
and per shard ``shard``, ``coordinator``, ``connected``, ``applied_lsn``,
``durable_lsn``, ``lag_events``, ``lag_seconds``; status 200 when every shard is
connected and behind by at most ``max_lag_events`` events, else 503.
"""

from __future__ import annotations

from aiohttp import web

from accord.query._backend import QueryBackend

#: The application key under which the backend is kept (for the console's handlers).
BACKEND: web.AppKey[QueryBackend] = web.AppKey("accord_query_backend", QueryBackend)


async def _healthz(request: web.Request) -> web.Response:
    health = request.app[BACKEND].health()
    return web.json_response(health.to_dict(), status=200 if health.healthy else 503)


def build_http_app(backend: QueryBackend) -> web.Application:
    """The aiohttp application with ``/healthz``; ``app[BACKEND]`` is the backend."""
    app = web.Application()
    app[BACKEND] = backend
    app.router.add_get("/healthz", _healthz)
    return app
