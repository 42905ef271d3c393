"""The pure parts of a process's life cycle: addresses, the warning throttle, the stop
signals, the bounded telemetry shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from accord.common.exits import ExitCode, StartupError
from accord.common.runner import stop_on_signals
from accord.common.telemetry import Telemetry
from accord.common.transport import (
    AddressError,
    ListenError,
    PlainTextRefused,
    TlsFileError,
    TransportSettings,
    bind,
    parse_address,
)
from accord.registry._etcd import Throttle, _why


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:7070", ("127.0.0.1", 7070)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:80", ("::1", 80)),
        (" 0.0.0.0:1 ", ("0.0.0.0", 1)),
    ],
)
def test_addresses_parse(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["nonsense", "host:", ":7070", "h:99999", "h:-1", "h:x"])
def test_malformed_addresses_are_usage_errors(address: str) -> None:
    with pytest.raises(AddressError, match="expected HOST:PORT") as e:
        parse_address(address)
    assert isinstance(e.value, StartupError) and isinstance(e.value, ValueError)
    assert e.value.code is ExitCode.USAGE


async def test_bind_says_why_in_one_line() -> None:
    server = grpc.aio.server()
    plain = TransportSettings()
    with pytest.raises(AddressError):
        bind(server, "nonsense", plain)
    with pytest.raises(PlainTextRefused, match="non-loopback"):
        bind(server, "192.0.2.1:7070", plain)
    port = bind(server, "127.0.0.1:0", plain)
    other = grpc.aio.server()
    with pytest.raises(ListenError, match="the port is in use"):
        bind(other, f"127.0.0.1:{port}", plain)
    await server.stop(None)
    await other.stop(None)


async def test_an_unreadable_tls_file_is_one_line(tmp_path: Path) -> None:
    server = grpc.aio.server()
    settings = TransportSettings(cert=tmp_path / "cert.pem", key=tmp_path / "key.pem")
    with pytest.raises(TlsFileError, match=r"cannot read TLS file .*key\.pem: No such file"):
        bind(server, "127.0.0.1:0", settings)
    await server.stop(None)


def test_the_throttle_allows_one_call_per_period_and_counts_the_rest() -> None:
    t = Throttle(every_s=5)
    assert t.ready(100.0)
    assert not t.ready(101.0) and not t.ready(104.9)
    assert t.ready(105.0) and t.take_skipped() == 2
    assert t.take_skipped() == 0


def test_etcd_reasons_lose_the_client_library_wrapping() -> None:
    class Wrapped(OSError):
        pass

    e = Wrapped("KV.Range failed after 1 attempts: UNAVAILABLE (refused)")
    assert _why(e) == "UNAVAILABLE (refused)"
    assert _why(TimeoutError()) == "TimeoutError"


async def test_a_signal_cancels_the_block_wherever_it_waits_and_ends_there() -> None:
    cleaned: list[str] = []

    async def wait_for_ever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # the clean-up can still await
            cleaned.append("released")

    loop = asyncio.get_running_loop()
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    async with stop_on_signals() as signalled:
        await wait_for_ever()
    assert signalled.signal == "SIGTERM" and cleaned == ["released"]
    # The handlers are gone and this task is not left cancelled.
    await asyncio.sleep(0)
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


async def test_a_cancellation_that_is_not_a_signal_goes_through() -> None:
    async def body() -> None:
        async with stop_on_signals():
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class _HungExporter(SpanExporter):
    """A trace backend that never answers: export blocks until shutdown."""

    def __init__(self) -> None:
        self.stopped = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.stopped.wait(60)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.stopped.set()


def test_telemetry_shutdown_is_bounded_when_the_backend_hangs() -> None:
    exporter = _HungExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    tracer = provider.get_tracer("test")
    for _ in range(3):
        tracer.start_span("s").end()
    telemetry = Telemetry(tracer=tracer, tracing=True)
    telemetry._tracer_provider = provider
    telemetry._exporters.append(exporter)
    t0 = time.monotonic()
    telemetry.shutdown(timeout_s=0.3)
    assert exporter.stopped.is_set()
    assert time.monotonic() - t0 < 10  # the SDK alone waits 30 s
