"""Every gRPC server and channel in Accord is built here, from one set of settings.

Transport security is switched on for every link at once: with a certificate and key,
servers serve TLS; with a CA as well, they demand client certificates (mTLS) and channels
present theirs. Plain text is allowed only when no certificate is configured, and then
only towards loopback addresses (refused otherwise, so a misconfiguration is loud).

Settings come from ``ACCORD_TLS_CERT``, ``ACCORD_TLS_KEY``, ``ACCORD_TLS_CA`` (file paths)
or are passed explicitly.

A server that cannot listen says why in one line (:class:`ListenError`: the port is in
use, the address is not on this machine, ...; :class:`AddressError`: not ``HOST:PORT``),
instead of gRPC's "Failed to bind ... set GRPC_VERBOSITY".
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from accord.common.exits import ExitCode, StartupError

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


@dataclass(frozen=True, kw_only=True)
class TransportSettings:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def from_env(cls) -> TransportSettings:
        def p(name: str) -> Path | None:
            v = os.environ.get(name)
            return Path(v) if v else None

        return cls(cert=p("ACCORD_TLS_CERT"), key=p("ACCORD_TLS_KEY"), ca=p("ACCORD_TLS_CA"))

    @property
    def tls(self) -> bool:
        return self.cert is not None and self.key is not None


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
    if not settings.tls and not is_loopback(address):
        raise PlainTextRefused(
            f"refusing to serve plain text on non-loopback address {address}: "
            "set ACCORD_TLS_CERT and ACCORD_TLS_KEY"
        )
    if wanted != 0:
        why = _why_not_bindable(address)
        if why is not None:
            raise ListenError(f"cannot listen on {address}: {why}")
    try:
        if settings.tls:
            assert settings.cert is not None and settings.key is not None
            creds = grpc.ssl_server_credentials(
                [(_read(settings.key), _read(settings.cert))],
                root_certificates=_read(settings.ca) if settings.ca else None,
                require_client_auth=settings.ca is not None,
            )
            port = int(server.add_secure_port(address, creds))
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
) -> aio.Channel:
    """A grpc.aio channel to address, secured like every other link."""
    settings = settings or TransportSettings.from_env()
    opts = [*_CHANNEL_OPTIONS, *options]
    if settings.tls or settings.ca is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=settings.ca.read_bytes() if settings.ca else None,
            private_key=settings.key.read_bytes() if settings.key and settings.ca else None,
            certificate_chain=settings.cert.read_bytes() if settings.cert and settings.ca else None,
        )
        return aio.secure_channel(address, creds, options=opts)
    if not is_loopback(address):
        raise PlainTextRefused(
            f"refusing a plain-text channel to non-loopback address {address}: "
            "set ACCORD_TLS_CA (and a client certificate for mTLS)"
        )
    return aio.insecure_channel(address, options=opts)
