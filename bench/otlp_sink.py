"""A minimal OTLP/gRPC trace sink for the ``2pc-traced`` row: it accepts
``opentelemetry.proto.collector.trace.v1.TraceService/Export`` and answers at once,
without decoding the spans (a collector's work is not what the row measures; the sink's
CPU is reported like a server's).

    python -m bench.otlp_sink --listen 127.0.0.1:0

Prints ``listening on HOST:PORT`` once it serves; on SIGTERM prints how many export
requests and bytes it received, then exits."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import grpc
from grpc import aio

from accord.common import runner

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


async def serve(listen: str) -> None:
    requests = 0
    received = 0

    async def export(request: bytes, _context: object) -> bytes:
        nonlocal requests, received
        requests += 1
        received += len(request)
        return b""  # an empty ExportTraceServiceResponse: everything accepted

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(export)}
    )
    server = aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    print(f"export requests {requests}, bytes {received}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink")
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args(argv)
    runner.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
