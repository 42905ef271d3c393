"""The chaos history: what the harness saw, one JSON object per line (JSONL).

Times are ``time.monotonic_ns()`` of the harness process (``time``), plus ``wall``, the
epoch seconds at the same moment, to line history events up with the participants'
audit rows (``accord_audit.at``, wall clock of the same machine).

Client operations are an ``invoke`` followed by exactly one completion from the same
``process`` (a worker: one operation in flight at a time)::

    {"type": "invoke", "process": 3, "op": "transfer", "key": "k-17",
     "request": {...}, "time": 123, "wall": 1764000000.5}
    {"type": "ok"|"fail"|"info", "process": 3, "op": "transfer", "key": "k-17",
     "gid": "..."|null, "result": {"state": ..., "reason": ...}|null,
     "error": "..."|null, "time": 456, "wall": 1764000000.7}

``ok``: definitely happened (2PC COMMITTED or COMMITTING; saga COMPLETED). ``fail``:
definitely did not happen (2PC ABORTED; saga COMPENSATED — every executed step undone;
or a request refused before anything was logged). ``info``: unknown (timeout,
UNAVAILABLE, a reset connection, a saga left STUCK or still running). A history may end
with invocations that never completed; they count as ``info``.

``request`` for ``transfer`` (2PC) is ``{"branches": [{"service", "branch_id", "operation",
"account", "amount"}, ...]}`` (``branch_id`` optional: the coordinator then names branch
*i* ``b<i+1>``); for ``saga``, ``{"steps": [{"name", "service", "action", "compensation",
"account", "amount", "depends_on": [...], "pivot": bool}, ...]}``.

Faults: ``{"type": "fault", "fault": "kill"|"restart"|"pause"|"resume"|"etcd-stop"|
"etcd-start"|"power-loss"|"heal"|..., "target": "coordinator-1"|"bank-2"|"etcd", "time",
"wall", "detail": {...}}`` (:data:`FAULTS`: the network faults of ``accord chaos --net``
too, each ended by a ``net-heal`` of the same target). The end: ``{"type": "quiescent", "time", "wall",
"after_heal_s"}`` once nothing was in doubt any more.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from accord.client._client import Branch, SagaStep, TxnResult
from accord.client._errors import AlreadyExistsError, InvalidArgumentError

CompletionType = Literal["ok", "fail", "info"]

OPS: frozenset[str] = frozenset({"transfer", "saga"})
COMPLETIONS: frozenset[str] = frozenset({"ok", "fail", "info"})
FAULTS: frozenset[str] = frozenset(
    {"kill", "restart", "pause", "resume", "etcd-stop", "etcd-start", "power-loss", "heal"}
    # Network faults (accord chaos --net) and an etcd cluster's; "net-heal" ends one.
    | {"partition", "partition-one-way", "cut-etcd", "cut-prepared", "latency", "loss"}
    | {"kill-etcd-member", "partition-etcd-member", "net-heal"}
)

#: Transaction states a client may be told, by what they mean for the history.
_OK_STATES = {"transfer": {"COMMITTED", "COMMITTING"}, "saga": {"COMPLETED"}}
_FAIL_STATES = {"transfer": {"ABORTED", "ABORTING"}, "saga": {"COMPENSATED"}}
#: Errors that prove nothing was done (nothing logged, nothing kept).
_DEFINITE_ERRORS = (InvalidArgumentError, AlreadyExistsError)


class HistoryError(ValueError):
    """chaos: a history line is malformed."""


@dataclass(frozen=True, kw_only=True)
class Invoke:
    """A client operation starts."""

    process: int
    op: str
    key: str
    request: Mapping[str, Any]
    time: int
    wall: float
    #: 1-based line number in the file it was read from (0: built in memory).
    line: int = field(default=0, compare=False)

    @property
    def type(self) -> str:
        return "invoke"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "invoke",
            "process": self.process,
            "op": self.op,
            "key": self.key,
            "request": dict(self.request),
            "time": self.time,
            "wall": self.wall,
        }


@dataclass(frozen=True, kw_only=True)
class Completion:
    """How a client operation ended: ``ok``, ``fail`` or ``info`` (unknown)."""

    type: str
    process: int
    op: str
    key: str
    gid: str | None
    result: Mapping[str, Any] | None
    error: str | None
    time: int
    wall: float
    line: int = field(default=0, compare=False)

    @property
    def state(self) -> str | None:
        """The transaction state the client was told, if any."""
        if self.result is None:
            return None
        state = self.result.get("state")
        return str(state) if state is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "process": self.process,
            "op": self.op,
            "key": self.key,
            "gid": self.gid,
            "result": None if self.result is None else dict(self.result),
            "error": self.error,
            "time": self.time,
            "wall": self.wall,
        }


@dataclass(frozen=True, kw_only=True)
class Fault:
    """A fault the harness injected (or healed)."""

    fault: str
    target: str
    time: int
    wall: float
    detail: Mapping[str, Any] = field(default_factory=dict)
    line: int = field(default=0, compare=False)

    @property
    def type(self) -> str:
        return "fault"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "fault",
            "fault": self.fault,
            "target": self.target,
            "time": self.time,
            "wall": self.wall,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True, kw_only=True)
class Quiescent:
    """The harness saw nothing in doubt, ``after_heal_s`` seconds after the last heal."""

    time: int
    wall: float
    after_heal_s: float
    line: int = field(default=0, compare=False)

    @property
    def type(self) -> str:
        return "quiescent"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "quiescent",
            "time": self.time,
            "wall": self.wall,
            "after_heal_s": self.after_heal_s,
        }


Event = Invoke | Completion | Fault | Quiescent


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TransferBranch:
    """One branch of a ``transfer`` request."""

    service: str
    operation: str
    account: str
    amount: int
    branch_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "service": self.service,
            "operation": self.operation,
            "account": self.account,
            "amount": self.amount,
        }
        if self.branch_id:
            out["branch_id"] = self.branch_id
        return out

    def to_client(self) -> Branch:
        return Branch(
            service=self.service,
            operation=self.operation,
            payload={"account": self.account, "amount": self.amount},
            branch_id=self.branch_id,
        )


@dataclass(frozen=True, kw_only=True)
class SagaStepSpec:
    """One step of a ``saga`` request."""

    name: str
    service: str
    action: str
    compensation: str
    account: str
    amount: int
    depends_on: tuple[str, ...] = ()
    pivot: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "service": self.service,
            "action": self.action,
            "compensation": self.compensation,
            "account": self.account,
            "amount": self.amount,
            "depends_on": list(self.depends_on),
            "pivot": self.pivot,
        }

    def to_client(self, **policy: Any) -> SagaStep:
        """The client SDK's step; ``policy`` passes retry/timeout fields through."""
        return SagaStep(
            name=self.name,
            service=self.service,
            action=self.action,
            compensation=self.compensation,
            payload={"account": self.account, "amount": self.amount},
            depends_on=self.depends_on,
            pivot=self.pivot,
            **policy,
        )


def transfer_request(branches: Sequence[TransferBranch]) -> dict[str, Any]:
    return {"branches": [b.to_dict() for b in branches]}


def saga_request(steps: Sequence[SagaStepSpec]) -> dict[str, Any]:
    return {"steps": [s.to_dict() for s in steps]}


def parse_transfer(request: Mapping[str, Any]) -> tuple[TransferBranch, ...]:
    """The branches of a ``transfer`` request (raises :class:`HistoryError`)."""
    try:
        return tuple(
            TransferBranch(
                service=str(b["service"]),
                operation=str(b["operation"]),
                account=str(b["account"]),
                amount=int(b["amount"]),
                branch_id=str(b.get("branch_id") or ""),
            )
            for b in request["branches"]
        )
    except (KeyError, TypeError, ValueError) as err:
        raise HistoryError(f"chaos: bad transfer request {dict(request)!r}: {err!r}") from err


def parse_saga(request: Mapping[str, Any]) -> tuple[SagaStepSpec, ...]:
    """The steps of a ``saga`` request (raises :class:`HistoryError`)."""
    try:
        return tuple(
            SagaStepSpec(
                name=str(s["name"]),
                service=str(s["service"]),
                action=str(s["action"]),
                compensation=str(s.get("compensation") or ""),
                account=str(s["account"]),
                amount=int(s["amount"]),
                depends_on=tuple(str(d) for d in s.get("depends_on") or ()),
                pivot=bool(s.get("pivot", False)),
            )
            for s in request["steps"]
        )
    except (KeyError, TypeError, ValueError) as err:
        raise HistoryError(f"chaos: bad saga request {dict(request)!r}: {err!r}") from err


# -- reading and writing -------------------------------------------------------------------


def event_from_dict(d: Mapping[str, Any], *, line: int = 0) -> Event:
    """One history line, checked (raises :class:`HistoryError` naming the line)."""
    where = f"history line {line}" if line else "history event"
    try:
        kind = d["type"]
        if kind == "invoke":
            if d["op"] not in OPS:
                raise HistoryError(f"chaos: {where}: unknown op {d['op']!r}")
            return Invoke(
                process=int(d["process"]),
                op=str(d["op"]),
                key=str(d["key"]),
                request=dict(d["request"]),
                time=int(d["time"]),
                wall=float(d["wall"]),
                line=line,
            )
        if kind in COMPLETIONS:
            gid, result, error = d.get("gid"), d.get("result"), d.get("error")
            return Completion(
                type=str(kind),
                process=int(d["process"]),
                op=str(d["op"]),
                key=str(d["key"]),
                gid=None if gid in (None, "") else str(gid),
                result=None if result is None else dict(result),
                error=None if error is None else str(error),
                time=int(d["time"]),
                wall=float(d["wall"]),
                line=line,
            )
        if kind == "fault":
            return Fault(
                fault=str(d["fault"]),
                target=str(d["target"]),
                time=int(d["time"]),
                wall=float(d["wall"]),
                detail=dict(d.get("detail") or {}),
                line=line,
            )
        if kind == "quiescent":
            return Quiescent(
                time=int(d["time"]),
                wall=float(d["wall"]),
                after_heal_s=float(d["after_heal_s"]),
                line=line,
            )
    except HistoryError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise HistoryError(f"chaos: {where}: {err!r} in {dict(d)!r}") from err
    raise HistoryError(f"chaos: {where}: unknown type {kind!r}")


def parse_history(lines: Iterable[str]) -> list[Event]:
    events: list[Event] = []
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except ValueError as err:
            raise HistoryError(f"chaos: history line {n}: not JSON ({err})") from err
        if not isinstance(data, dict):
            raise HistoryError(f"chaos: history line {n}: expected a JSON object")
        events.append(event_from_dict(data, line=n))
    return events


def read_history(path: Path | str) -> list[Event]:
    """Every event of a JSONL history file. A last line cut short (the harness died
    mid-write) is ignored; any other bad line raises :class:`HistoryError`."""
    text = Path(path).read_text()
    lines = text.split("\n")
    if lines and lines[-1].strip():
        try:
            json.loads(lines[-1])
        except ValueError:
            lines = lines[:-1]  # a torn tail: not a complete event
    return parse_history(lines)


def write_history(path: Path | str, events: Iterable[Event]) -> None:
    with Path(path).open("w") as f:
        for event in events:
            f.write(_line(event.to_dict()))


def _line(d: Mapping[str, Any]) -> str:
    return json.dumps(d, separators=(",", ":"), sort_keys=False) + "\n"


def classify(op: str, result: TxnResult) -> CompletionType:
    """What a transaction state the client was told means for the history."""
    if result.state in _OK_STATES.get(op, ()):
        return "ok"
    if result.state in _FAIL_STATES.get(op, ()):
        return "fail"
    return "info"


class HistoryWriter:
    """Appends history events to a JSONL file, one flushed line per event (so a killed
    harness leaves every event it recorded, at worst with a torn last line, which
    :func:`read_history` drops). With ``fsync`` every line is also fsynced.

    Use from one thread (the harness's event loop); as a context manager or
    :meth:`close` it. The clocks are injectable for tests."""

    def __init__(
        self,
        path: Path | str,
        *,
        fsync: bool = False,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = self.path.open("a")
        self._fsync = fsync
        self._monotonic_ns = monotonic_ns
        self._wall = wall
        #: How many events were written, by type.
        self.counts: dict[str, int] = {}

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def write(self, event: Event) -> Event:
        """Appends an already built event."""
        self._f.write(_line(event.to_dict()))
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())
        self.counts[event.type] = self.counts.get(event.type, 0) + 1
        return event

    def _now(self) -> tuple[int, float]:
        return self._monotonic_ns(), self._wall()

    def invoke(self, process: int, op: str, key: str, request: Mapping[str, Any]) -> Invoke:
        if op not in OPS:
            raise ValueError(f"chaos: unknown op {op!r} (expected one of {sorted(OPS)})")
        t, w = self._now()
        event = Invoke(process=process, op=op, key=key, request=request, time=t, wall=w)
        self.write(event)
        return event

    def complete(
        self,
        type: str,
        process: int,
        op: str,
        key: str,
        *,
        gid: str | None = None,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> Completion:
        if type not in COMPLETIONS:
            raise ValueError(f"chaos: unknown completion {type!r}")
        t, w = self._now()
        event = Completion(
            type=type,
            process=process,
            op=op,
            key=key,
            gid=gid or None,
            result=result,
            error=error,
            time=t,
            wall=w,
        )
        self.write(event)
        return event

    def ok(
        self,
        process: int,
        op: str,
        key: str,
        *,
        gid: str,
        result: Mapping[str, Any] | None = None,
    ) -> Completion:
        return self.complete("ok", process, op, key, gid=gid, result=result)

    def fail(
        self,
        process: int,
        op: str,
        key: str,
        *,
        gid: str | None = None,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> Completion:
        return self.complete("fail", process, op, key, gid=gid, result=result, error=error)

    def info(
        self,
        process: int,
        op: str,
        key: str,
        *,
        gid: str | None = None,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> Completion:
        return self.complete("info", process, op, key, gid=gid, result=result, error=error)

    def result(self, process: int, op: str, key: str, result: TxnResult) -> Completion:
        """The completion for a transaction result the client got (ok, fail or info by
        its state: :func:`classify`)."""
        return self.complete(
            classify(op, result),
            process,
            op,
            key,
            gid=result.gid,
            result={"state": result.state, "reason": result.reason},
        )

    def error(
        self, process: int, op: str, key: str, exc: BaseException, *, gid: str | None = None
    ) -> Completion:
        """The completion for a call that raised: ``fail`` when the error proves nothing
        was done (INVALID_ARGUMENT, ALREADY_EXISTS), ``info`` otherwise (a timeout or a
        lost connection says nothing about the outcome)."""
        kind = "fail" if isinstance(exc, _DEFINITE_ERRORS) else "info"
        text = str(exc) or type(exc).__name__
        return self.complete(kind, process, op, key, gid=gid, error=text)

    def fault(self, fault: str, target: str, detail: Mapping[str, Any] | None = None) -> Fault:
        if fault not in FAULTS:
            raise ValueError(f"chaos: unknown fault {fault!r} (expected one of {sorted(FAULTS)})")
        t, w = self._now()
        event = Fault(fault=fault, target=target, time=t, wall=w, detail=dict(detail or {}))
        self.write(event)
        return event

    def quiescent(self, after_heal_s: float) -> Quiescent:
        t, w = self._now()
        event = Quiescent(time=t, wall=w, after_heal_s=after_heal_s)
        self.write(event)
        return event
