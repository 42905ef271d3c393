"""Transport security in one process: settings from options and the environment, the
allow-list interceptor on unary and streaming calls, the server name a channel checks,
certificate rotation, and etcd's TLS settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from accord.common.transport import (
    CallerAllowList,
    PlainTextRefused,
    TlsFileError,
    TransportSettings,
    bind,
    configured,
    make_channel,
    make_server,
    name_allowed,
)
from accord.registry import EtcdTls, parse_endpoints
from accord.tools._certs import CertDir, issue, make_certs

SERVICE = "test.Echo"


def _settings(d: CertDir, name: str) -> TransportSettings:
    return TransportSettings(cert=d.cert(name), key=d.key(name), ca=d.ca)


def _echo_handlers() -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def stream(requests: Any, context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )


async def _serve(settings: TransportSettings, allow: tuple[str, ...]) -> tuple[aio.Server, str]:
    guard = CallerAllowList(allow, [SERVICE], role="coordinator")
    server, _ = make_server(settings, interceptors=[guard] if allow else [])
    server.add_generic_rpc_handlers((_echo_handlers(),))
    port = bind(server, "127.0.0.1:0", settings)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _calls(address: str, settings: TransportSettings, server_name: str = "") -> list[str]:
    """The status of a unary and of a streaming call, by name."""
    out = []
    async with make_channel(address, settings, server_name=server_name) as ch:
        try:
            assert await ch.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5) == b"x"
            out.append("OK")
        except aio.AioRpcError as e:
            out.append(e.code().name)
        try:
            call = ch.stream_stream(f"/{SERVICE}/Stream")(iter([b"y"]), timeout=5)
            assert [r async for r in call] == [b"y"]
            out.append("OK")
        except aio.AioRpcError as e:
            out.append(e.code().name)
    return out


async def test_the_allow_list_admits_named_callers_only(tmp_path: Path) -> None:
    d = CertDir(tmp_path)
    make_certs(tmp_path, ["bank-a", "coordinator", "client"])
    server, address = await _serve(_settings(d, "bank-a"), ("coordinator",))
    try:
        assert await _calls(address, _settings(d, "coordinator")) == ["OK", "OK"]
        denied = ["PERMISSION_DENIED", "PERMISSION_DENIED"]
        assert await _calls(address, _settings(d, "client")) == denied
        # The server's certificate must name the service dialled for.
        assert await _calls(address, _settings(d, "coordinator"), "bank-a") == ["OK", "OK"]
        wrong = await _calls(address, _settings(d, "coordinator"), "bank-b")
        assert wrong == ["UNAVAILABLE", "UNAVAILABLE"]
    finally:
        await server.stop(0)


def test_names_match_as_such_or_as_accord_uris() -> None:
    assert name_allowed({"localhost", "accord:c1"}, ["c1"])
    assert name_allowed({"c2"}, ["c1", "c2"])
    assert not name_allowed({"accord:c10", "c10"}, ["c1"])
    assert not name_allowed(set(), ["c1"])


async def test_a_server_serves_rotated_files_to_new_connections(tmp_path: Path) -> None:
    d = CertDir(tmp_path)
    make_certs(tmp_path, ["srv", "cli"])
    server, address = await _serve(_settings(d, "srv"), ())
    try:
        assert await _calls(address, _settings(d, "cli")) == ["OK", "OK"]
        # A certificate of a new CA: only new connections of clients trusting it pass.
        for f in (d.ca, d.ca_key):
            f.unlink()
        issue(d, "srv")
        issue(d, "cli")
        assert await _calls(address, _settings(d, "cli")) == ["OK", "OK"]
    finally:
        await server.stop(0)


def test_settings_from_the_environment_and_their_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_certs(tmp_path, ["p"])
    d = CertDir(tmp_path)
    monkeypatch.setenv("ACCORD_TLS_CERT", str(d.cert("p")))
    monkeypatch.setenv("ACCORD_TLS_KEY", str(d.key("p")))
    monkeypatch.setenv("ACCORD_TLS_CA", str(d.ca))
    monkeypatch.setenv("ACCORD_ALLOW_COORDINATORS", "c1, c2,c1")
    monkeypatch.setenv("ACCORD_INSECURE", "1")
    s = TransportSettings.from_env()
    assert s.mutual and s.insecure and s.allow_coordinators == ("c1", "c2")
    s.check()
    assert TransportSettings(**{**s.__dict__}).env()["ACCORD_ALLOW_COORDINATORS"] == "c1,c2"
    # Explicit settings win over the environment for the process.
    with configured(TransportSettings()):
        assert TransportSettings.from_env() == TransportSettings()
    assert TransportSettings.from_env() == s
    with pytest.raises(TlsFileError, match="needs mutual TLS"):
        TransportSettings(cert=d.cert("p"), key=d.key("p"), allow_coordinators=("c",)).check()
    with pytest.raises(TlsFileError, match="both a certificate and a key"):
        TransportSettings(cert=d.cert("p")).check()


async def test_plain_text_off_loopback_only_with_insecure() -> None:
    server = aio.server()
    with pytest.raises(PlainTextRefused, match="--insecure"):
        bind(server, "192.0.2.1:0", TransportSettings())
    with pytest.raises(PlainTextRefused):
        make_channel("192.0.2.1:7070", TransportSettings())
    channel = make_channel("192.0.2.1:7070", TransportSettings(insecure=True))
    await channel.close()
    await server.stop(None)


def test_etcd_urls_and_tls_arguments(tmp_path: Path) -> None:
    make_certs(tmp_path, ["etcd-client"])
    d = CertDir(tmp_path)
    assert parse_endpoints("https://127.0.0.1:2379,https://localhost:2380") == [
        "127.0.0.1:2379",
        "localhost:2380",
    ]
    with pytest.raises(ValueError, match="mixes"):
        parse_endpoints("http://a:1,https://b:2")
    with pytest.raises(ValueError, match="only http:// and https://"):
        parse_endpoints("grpc://a:1")
    assert EtcdTls(ca=d.ca).client_args("http://127.0.0.1:2379") == {}
    args = EtcdTls(ca=d.ca, cert=d.cert("etcd-client"), key=d.key("etcd-client")).client_args(
        "https://localhost:2379"
    )
    assert args["ca_cert"] == d.ca.read_bytes() and args["tls_server_name"] == "localhost"
    with pytest.raises(Exception, match="needs the CA"):
        EtcdTls().client_args("https://127.0.0.1:2379")
    # Without etcd settings of its own, etcd's TLS is the transport's.
    with configured(
        TransportSettings(cert=d.cert("etcd-client"), key=d.key("etcd-client"), ca=d.ca)
    ):
        assert EtcdTls.from_env() == EtcdTls(
            ca=d.ca, cert=d.cert("etcd-client"), key=d.key("etcd-client")
        )


async def test_an_allow_list_refusal_runs_no_handler(tmp_path: Path) -> None:
    d = CertDir(tmp_path)
    make_certs(tmp_path, ["srv", "cli"])
    ran: list[bytes] = []

    async def unary(request: bytes, context: Any) -> bytes:
        ran.append(request)
        return request

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    settings = _settings(d, "srv")
    server, _ = make_server(
        settings, interceptors=[CallerAllowList(("coordinator",), [SERVICE], role="coordinator")]
    )
    server.add_generic_rpc_handlers((handler,))
    port = bind(server, "127.0.0.1:0", settings)
    await server.start()
    try:
        async with make_channel(f"127.0.0.1:{port}", _settings(d, "cli")) as ch:
            with pytest.raises(aio.AioRpcError) as e:
                await ch.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await asyncio.sleep(0)
        assert ran == []
    finally:
        await server.stop(0)
