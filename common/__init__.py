"""What every Accord process shares, and nothing about transactions.

- :mod:`accord.common.transport`: every gRPC server and channel is built here, from one
  set of settings (TLS when given; plain text only on loopback).
- :mod:`accord.common.telemetry`: OpenTelemetry set-up (traces, metrics), the trace
  context in gRPC metadata, and the ``gid``/trace ids on log lines.
- :mod:`accord.common.logs`: logging set-up (text or one JSON object per line).
- :mod:`accord.common.gid`: the gid format (``<shard>:<hex>``) and shard placement.
- :mod:`accord.common.runner`: the event-loop runner (uvloop where available).
- :mod:`accord.common.retry`: the one retry/backoff schedule.
- :mod:`accord.common.exits`: the exit codes of every Accord command.

It depends only on grpcio, protobuf and opentelemetry-api at import time, so the client
SDK can use it; the OpenTelemetry SDK and exporters are imported only when a process
turns them on."""
