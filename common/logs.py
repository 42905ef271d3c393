"""Logging set-up for every Accord process: readable text by default, one JSON object
per line with ``--log-format json``. Every line carries ``gid`` where there is one (from
``extra`` or the task's transaction) and ``trace_id``/``span_id`` when a span is active
(:class:`accord.common.telemetry.TraceLogFilter`)."""

from __future__ import annotations

import json
import logging
import sys
import time
from enum import StrEnum

from accord.common.telemetry import TraceLogFilter


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class JsonFormatter(logging.Formatter):
    _SKIP = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in self._SKIP and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, then ``gid=`` (unless the message already says
    it) and ``trace_id=``/``span_id=`` when the record has them."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = []
        gid = getattr(record, "gid", None)
        if gid and "gid=" not in record.getMessage():
            extra.append(f"gid={gid}")
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            extra.append(f"trace_id={trace_id} span_id={getattr(record, 'span_id', '')}")
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays after the fields
        return f"{head} {' '.join(extra)}{sep}{tail}"


def configure(*, level: str = LogLevel.INFO, fmt: str = LogFormat.TEXT) -> None:
    """One handler on the root logger, to stderr, in ``fmt`` (a :class:`LogFormat`
    value); ``level`` is a :class:`LogLevel` value, in any case."""
    handler = logging.StreamHandler(sys.stderr)
    try:
        fmt = LogFormat(fmt)
    except ValueError:
        raise ValueError(f"log format must be text or json, not {fmt!r}") from None
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    handler.addFilter(TraceLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
