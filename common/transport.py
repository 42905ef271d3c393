"""Every gRPC server and channel in Accord is built here, from one set of settings.

Transport security is switched on for every link at once: with a certificate and key,
servers serve TLS; with a CA as well, they demand client certificates (mTLS) and channels
present theirs. Plain text is allowed only when no certificate is configured, and then
only towards loopback addresses (refused otherwise, so a misconfiguration is loud).

Settings come from ``ACCORD_TLS_CERT``, ``ACCORD_TLS_KEY``, ``ACCORD_TLS_CA`` (file paths),
``ACCORD_INSECURE`` and ``ACCORD_ALLOW_COORDINATORS``, or from the command line's options
(:func:`configure`, which the CLI calls once per process), or are passed explicitly.

Identities: a certificate names its holder in its subject alternative names (DNS name
``NAME`` and URI ``accord:NAME``, as ``accord certs`` issues them). A channel opened with
``server_name`` verifies that the server's certificate carries that name (the TLS
handshake itself checks it, through ``grpc.ssl_target_name_override``): the coordinator
dials a participant it resolved by service name so. A server given an allow-list
(:class:`CallerAllowList`) accepts calls to the listed services only from peers whose
certificate carries an allowed name (PERMISSION_DENIED otherwise, before any handler runs).

Rotation: a server re-reads its certificate, key and CA files when they change (their
size or modification time; checked at each new TLS handshake, through gRPC's dynamic
server credentials); a channel reads them when it is opened.

A server that cannot listen says why in one line (:class:`ListenError`: the port is in
use, the address is not on this machine, ...; :class:`AddressError`: not ``HOST:PORT``),
instead of gRPC's "Failed to bind ... set GRPC_VERBOSITY".
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import ipaddress
import logging
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from accord.common.exits import ExitCode, StartupError

log = logging.getLogger("accord.transport")

#: Limit on any single gRPC message, in both directions (documented in the README).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),
    # A participant that restarts must be reachable again within a second, not after
    # gRPC's default reconnect backoff (up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def split_names(values: Iterable[str]) -> tuple[str, ...]:
    """Names given repeatedly and/or comma- or space-separated, in order, without blanks
    or repeats."""
    out: list[str] = []
    for v in values:
        for name in v.replace(",", " ").split():
            if name not in out:
                out.append(name)
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class TransportSettings:
    """Every link's security: a certificate and key (TLS), a CA (then mutual TLS: each
    side verifies the other's certificate), ``insecure`` (plain text allowed off
    loopback) and, for participants, the coordinators allowed to make branch calls."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    #: Plain text allowed on and towards non-loopback addresses (``--insecure``).
    insecure: bool = False
    #: Certificate names (SAN DNS or URI, or the subject's CN) of the coordinators a
    #: participant accepts branch calls from; empty: any certificate the CA signed.
    allow_coordinators: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> TransportSettings:
        """The process's settings: those given to :func:`configure` (the CLI's options),
        else the ``ACCORD_TLS_*``, ``ACCORD_INSECURE`` and ``ACCORD_ALLOW_COORDINATORS``
        environment variables."""
        if _configured is not None:
            return _configured

        def p(name: str) -> Path | None:
            v = os.environ.get(name)
            return Path(v) if v else None

        return cls(
            cert=p("ACCORD_TLS_CERT"),
            key=p("ACCORD_TLS_KEY"),
            ca=p("ACCORD_TLS_CA"),
            insecure=_truthy(os.environ.get("ACCORD_INSECURE")),
            allow_coordinators=split_names([os.environ.get("ACCORD_ALLOW_COORDINATORS", "")]),
        )

    @property
    def tls(self) -> bool:
        return self.cert is not None and self.key is not None

    @property
    def mutual(self) -> bool:
        """Mutual TLS: a certificate, a key and a CA."""
        return self.tls and self.ca is not None

    def check(self) -> None:
        """:class:`TlsFileError` (one line) unless the settings make sense and every file
        named is readable."""
        if (self.cert is None) != (self.key is None):
            raise TlsFileError("TLS needs both a certificate and a key (--tls-cert, --tls-key)")
        for f in (self.cert, self.key, self.ca):
            if f is not None:
                _read(f)
        if self.allow_coordinators and not self.mutual:
            raise TlsFileError(
                "--allow-coordinator needs mutual TLS (--tls-cert, --tls-key and --tls-ca): "
                "callers are identified by their certificates"
            )

    def env(self) -> dict[str, str]:
        """The environment variables that give a child process these settings."""
        out: dict[str, str] = {}
        for name, f in (
            ("ACCORD_TLS_CERT", self.cert),
            ("ACCORD_TLS_KEY", self.key),
            ("ACCORD_TLS_CA", self.ca),
        ):
            if f is not None:
                out[name] = str(f)
        if self.insecure:
            out["ACCORD_INSECURE"] = "1"
        if self.allow_coordinators:
            out["ACCORD_ALLOW_COORDINATORS"] = ",".join(self.allow_coordinators)
        return out


_configured: TransportSettings | None = None


@contextlib.contextmanager
def configured(settings: TransportSettings | None) -> Iterator[None]:
    """:func:`configure` for the duration of a ``with`` block (then the previous one)."""
    previous = _configured
    configure(settings)
    try:
        yield
    finally:
        configure(previous)


def configure(settings: TransportSettings | None) -> None:
    """Makes ``settings`` this process's default (what :meth:`TransportSettings.from_env`
    and every server and channel built without explicit settings use); None goes back
    to the environment. Called once by each command of the CLI, from its options."""
    global _configured
    _configured = settings


class AddressError(StartupError, ValueError):
    """An address that is not ``HOST:PORT``."""

    code = ExitCode.USAGE


class ListenError(StartupError, OSError):
    """A server cannot listen on its address (the message says why)."""


class PlainTextRefused(StartupError, ValueError):
    """Plain text towards an address off loopback, with no TLS configured."""


class TlsFileError(StartupError, OSError):
    """A certificate, key or CA file named in the TLS settings cannot be read."""


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → host and port; :class:`AddressError`
    otherwise. Port 0 is allowed (a server then picks a free port)."""
    host, sep, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise AddressError(f"malformed address {address!r}: expected HOST:PORT")
    return host, int(port)


def _why_not_bindable(address: str) -> str | None:
    """Why ``address`` cannot be bound, found by binding a plain socket to it the way
    gRPC does (``SO_REUSEADDR``), or None when it can. Asked before gRPC binds (which
    would log a multi-line error of its own) and after it failed (it only says "Failed
    to bind")."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"unknown host {host!r} ({e.strerror})"
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as e:
        reasons = {
            errno.EADDRINUSE: "the port is in use",
            errno.EACCES: "permission denied (a port below 1024 needs privileges)",
            errno.EADDRNOTAVAIL: "the address is not one of this machine's",
        }
        return reasons.get(e.errno or 0, e.strerror or str(e))
    return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsFileError(f"cannot read TLS file {path}: {e.strerror or e}") from None


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),
        *extra,
    ]


def make_server(
    settings: TransportSettings | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[aio.ServerInterceptor] = (),
) -> tuple[aio.Server, TransportSettings]:
    """A grpc.aio server with Accord's limits; bind it with :func:`bind`."""
    settings = settings or TransportSettings.from_env()
    server = aio.server(options=server_options(options), interceptors=list(interceptors))
    return server, settings


def bind(server: aio.Server, address: str, settings: TransportSettings) -> int:
    """Binds the address (port 0 picks a free one) and returns the port. Raises
    :class:`AddressError`, :class:`PlainTextRefused` or :class:`ListenError`."""
    _, wanted = parse_address(address)
    if not settings.tls and not settings.insecure and not is_loopback(address):
        raise PlainTextRefused(
            f"refusing to serve plain text on non-loopback address {address}: "
            "give --tls-cert and --tls-key (ACCORD_TLS_CERT, ACCORD_TLS_KEY), or --insecure"
        )
    if wanted != 0:
        why = _why_not_bindable(address)
        if why is not None:
            raise ListenError(f"cannot listen on {address}: {why}")
    try:
        if settings.tls:
            port = int(server.add_secure_port(address, server_credentials(settings)))
        else:
            port = int(server.add_insecure_port(address))
    except RuntimeError:  # grpc: "Failed to bind to address ..."
        port = 0
    if not port:
        why = _why_not_bindable(address) or "gRPC could not bind it (GRPC_VERBOSITY=debug)"
        raise ListenError(f"cannot listen on {address}: {why}")
    return port


def make_channel(
    address: str,
    settings: TransportSettings | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    server_name: str = "",
) -> aio.Channel:
    """A grpc.aio channel to address, secured like every other link. With TLS and a
    ``server_name``, the server's certificate must name it (a SAN DNS name; the TLS
    handshake checks it, and a server without it is UNAVAILABLE); without one, the
    certificate must name the host dialled (``localhost``, ``127.0.0.1``, ...)."""
    settings = settings or TransportSettings.from_env()
    opts = [*_CHANNEL_OPTIONS, *options]
    if settings.tls or settings.ca is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(settings.ca) if settings.ca else None,
            private_key=_read(settings.key) if settings.key and settings.ca else None,
            certificate_chain=_read(settings.cert) if settings.cert and settings.ca else None,
        )
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        return aio.secure_channel(address, creds, options=opts)
    if not settings.insecure and not is_loopback(address):
        raise PlainTextRefused(
            f"refusing a plain-text channel to non-loopback address {address}: "
            "give --tls-ca (and --tls-cert, --tls-key for mutual TLS), or --insecure"
        )
    return aio.insecure_channel(address, options=opts)


def https_context(settings: TransportSettings) -> ssl.SSLContext:
    """A server-side SSL context for an HTTP server of Accord's (the query console):
    the process's certificate and key; client certificates are not asked for."""
    assert settings.cert is not None and settings.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except (ssl.SSLError, OSError) as e:
        raise TlsFileError(f"TLS files {settings.cert}, {settings.key}: {e}") from None
    return context


def https_client_context(settings: TransportSettings) -> ssl.SSLContext:
    """A client-side SSL context towards Accord's HTTPS servers: verified against the CA
    (the system's roots without one), presenting the certificate when there is one."""
    context = ssl.create_default_context(cafile=str(settings.ca) if settings.ca else None)
    if settings.cert is not None and settings.key is not None:
        context.load_cert_chain(settings.cert, settings.key)
    return context


# ---------------------------------------------------------------- rotation


class _CertFiles:
    """The server's certificate, key and CA files, re-read when one changes (size or
    modification time). Used by gRPC's dynamic server credentials: :meth:`fetch` runs at
    each new TLS handshake (on one of gRPC's threads) and returns a new configuration
    only when the files changed; a file that cannot be read then (a rotation half done)
    keeps the previous configuration until the next handshake."""

    def __init__(self, settings: TransportSettings) -> None:
        assert settings.cert is not None and settings.key is not None
        self._files = [f for f in (settings.cert, settings.key, settings.ca) if f is not None]
        self._settings = settings
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._config()
        #: Times the files were found changed and loaded again.
        self.reloads = 0

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for f in self._files:
            try:
                st = f.stat()
            except OSError:
                return ()
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _config(self) -> Any:
        s = self._settings
        assert s.cert is not None and s.key is not None
        key, cert = _read(s.key), _read(s.cert)
        ca = _read(s.ca) if s.ca else None
        try:  # a key that does not match the certificate (a rotation half done)
            ssl.create_default_context().load_cert_chain(s.cert, s.key)
        except (ssl.SSLError, OSError) as e:
            raise TlsFileError(f"TLS files {s.cert}, {s.key}: {e}") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        with self._lock:
            stamp = self._stat()
            if not stamp or stamp == self._stamp:
                return None
            try:
                config = self._config()
            except (TlsFileError, ValueError) as e:
                log.warning("event=tls_reload_failed error=%r", str(e))
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("event=tls_reloaded cert=%s", self._settings.cert)
            return config


def server_credentials(settings: TransportSettings) -> grpc.ServerCredentials:
    """TLS server credentials that follow the files (see :class:`_CertFiles`); with a CA,
    client certificates are required and verified against it."""
    files = _CertFiles(settings)
    return grpc.dynamic_ssl_server_credentials(
        files.initial,
        files.fetch,
        require_client_authentication=settings.ca is not None,
    )


# ---------------------------------------------------------------- identities


def peer_names(context: Any) -> set[str]:
    """The names in the calling peer's certificate (SAN DNS, URI, ... and the subject's
    CN), from a servicer context; empty without a verified client certificate."""
    auth = context.auth_context() or {}
    names: set[str] = set()
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for value in auth.get(key, ()):
            names.add(value.decode(errors="replace") if isinstance(value, bytes) else value)
    return names


def name_allowed(names: set[str], allowed: Sequence[str]) -> bool:
    """True when one of ``allowed`` is among ``names``, as such or as ``accord:NAME``."""
    return any(a in names or f"accord:{a}" in names for a in allowed)


class CallerAllowList(aio.ServerInterceptor):  # type: ignore[misc]
    """Calls to ``services`` (full gRPC service names) are let through only from peers
    whose certificate carries one of ``allowed`` (:func:`name_allowed`); any other is
    answered PERMISSION_DENIED before its handler runs. Calls to other services (health,
    reflection, an admin API) are not checked here."""

    def __init__(self, allowed: Sequence[str], services: Iterable[str], *, role: str) -> None:
        self.allowed = tuple(allowed)
        self.services = frozenset(services)
        self.role = role
        #: Calls refused so far.
        self.refused = 0

    async def _check(self, context: Any, method: str) -> None:
        names = peer_names(context)
        if name_allowed(names, self.allowed):
            return
        self.refused += 1
        who = ",".join(sorted(names)) or "no client certificate"
        log.warning("event=caller_refused method=%s peer=%s names=%s", method, context.peer(), who)
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"caller not allowed: its certificate ({who}) names no {self.role} on the allow-list",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.lstrip("/").split("/")[0] not in self.services:
            return handler
        return self._guard(handler, method)

    def _guard(self, h: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        check = self._check
        kw = {
            "request_deserializer": h.request_deserializer,
            "response_serializer": h.response_serializer,
        }
        if h.unary_unary is not None:
            inner_uu = h.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                await check(context, method)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if h.unary_stream is not None:
            inner_us = h.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await check(context, method)
                async for r in _results(inner_us(request, context)):
                    yield r

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        if h.stream_unary is not None:
            inner_su = h.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                await check(context, method)
                return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        inner_ss = h.stream_stream

        async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            await check(context, method)
            async for r in _results(inner_ss(requests, context)):
                yield r

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


async def _results(out: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses: an async generator's items, or nothing from a
    coroutine that writes with ``context.write``."""
    if inspect.isasyncgen(out) or hasattr(out, "__aiter__"):
        async for r in out:
            yield r
    elif inspect.isawaitable(out):
        await out
