"""The rules, and the client that drives a participant through them over its gRPC port."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

import accord.v1 as pb
from accord.tools.conformance._report import (
    CONTRACT_CODES,
    MALFORMED_CODES,
    Exchange,
    Report,
    RuleResult,
)

ADD = "conformance.add"
GET = "conformance.get"
#: Each call's deadline (s).
CALL_TIMEOUT_S = 10.0

_METHODS = {
    "Prepare": pb.BRANCH_METHOD_PREPARE,
    "Commit": pb.BRANCH_METHOD_COMMIT,
    "Abort": pb.BRANCH_METHOD_ABORT,
    "Execute": pb.BRANCH_METHOD_EXECUTE,
    "Compensate": pb.BRANCH_METHOD_COMPENSATE,
}


class RuleFailed(Exception):
    """A rule cannot go on (an expectation it depends on failed)."""


def add_payload(key: str, amount: int, vote: str = "yes") -> bytes:
    return json.dumps({"key": key, "amount": amount, "vote": vote}).encode()


def get_payload(key: str) -> bytes:
    return json.dumps({"key": key}).encode()


@dataclass
class Call:
    """A call to make: the method and its BranchRequest fields."""

    method: str
    gid: str
    operation: str = ADD
    payload: bytes = b""
    branch_id: str = "b1"
    shard: str = ""
    epoch: int = 0
    one_phase: bool = False
    malformed: bool = False
    #: Stream only: the BranchMethod number to send instead of ``method``'s.
    raw_method: int | None = None

    def request(self) -> pb.BranchRequest:
        return pb.BranchRequest(
            gid=self.gid,
            branch_id=self.branch_id,
            operation=self.operation,
            payload=self.payload,
            shard=self.shard,
            epoch=self.epoch,
            one_phase=self.one_phase,
        )

    def describe(self) -> dict[str, Any]:
        try:
            payload: Any = self.payload.decode()
        except UnicodeDecodeError:
            payload = self.payload.hex()
        d: dict[str, Any] = {
            "gid": self.gid,
            "branch_id": self.branch_id,
            "operation": self.operation,
            "payload": payload,
        }
        if self.shard or self.epoch:
            d["shard"], d["epoch"] = self.shard, self.epoch
        if self.one_phase:
            d["one_phase"] = True
        if self.raw_method is not None:
            d["stream_method"] = self.raw_method
        return d


def _result_text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data.hex()


class Probe:
    """One rule being checked: its calls (the evidence) and its failed expectations."""

    def __init__(self, kit: Kit, result: RuleResult) -> None:
        self.kit = kit
        self.result = result

    def fail(self, message: str) -> None:
        self.result.failures.append(message)

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.fail(message)
        return ok

    async def call(self, c: Call) -> Exchange:
        ex = await self.kit.unary(c)
        self.result.evidence.append(ex)
        return ex

    async def expect_code(self, c: Call, *codes: str, why: str = "") -> Exchange:
        ex = await self.call(c)
        if ex.code not in codes:
            want = " or ".join(codes)
            self.fail(
                f"{ex.brief()}: expected {want}{f' ({why})' if why else ''}"
                + (f"; details {ex.details!r}" if ex.details else "")
            )
        return ex

    async def value(self, key: str) -> int:
        """The committed value of counter ``key``, by a ``conformance.get`` Execute with a
        fresh gid; a rule cannot go on without it."""
        ex = await self.call(Call("Execute", self.kit.gid(), GET, get_payload(key)))
        if ex.code != "OK":
            raise RuleFailed(f"{ex.brief()}: conformance.get must answer OK; {ex.details!r}")
        try:
            data = json.loads(ex.result)
            value = data["value"]
            if type(value) is not int:
                raise TypeError("value is not an integer")
        except (ValueError, KeyError, TypeError) as e:
            raise RuleFailed(
                f"conformance.get answered {ex.result!r}: expected"
                f' {{"key": {key!r}, "value": <integer>}} ({e})'
            ) from None
        return int(value)

    async def expect_value(self, key: str, want: int, when: str) -> None:
        got = await self.value(key)
        self.expect(got == want, f"{when}: counter {key!r} is {got}, expected {want}")

    def same(self, first: Exchange, dup: Exchange) -> None:
        self.expect(
            first.answer() == dup.answer(),
            f"duplicate {dup.method} answered {dup.answer()}, the first {first.answer()}"
            " (code, read_only, result)",
        )


class Kit:
    """Drives the participant at ``address`` through the rules."""

    def __init__(self, channel: aio.Channel, *, service: str = "", run: str = "") -> None:
        self.channel = channel
        self.service = service
        self.run = run or secrets.token_hex(4)
        self.stub = pb.ParticipantStub(channel)
        self._n = 0

    def gid(self) -> str:
        """A gid unique to this run: ``conf:<run>:<n>``."""
        self._n += 1
        return f"conf:{self.run}:{self._n}"

    def key(self, rule: str) -> str:
        """The counter of one rule in this run (starts at 0)."""
        return f"conf:{self.run}:{rule}"

    async def unary(self, c: Call) -> Exchange:
        ex = Exchange(c.method, c.describe(), malformed=c.malformed)
        rpc = getattr(self.stub, c.method)
        try:
            resp = await rpc(c.request(), timeout=CALL_TIMEOUT_S)
        except aio.AioRpcError as e:
            ex.code, ex.details = e.code().name, e.details() or ""
            return ex
        ex.code = "OK"
        ex.read_only = resp.read_only
        ex.result = _result_text(resp.result)
        ex.details = resp.message
        return ex


Rule = Callable[[Probe], Awaitable[None]]


@dataclass(frozen=True)
class RuleSpec:
    name: str
    description: str
    check: Rule
    required: bool = True


# -- the rules ---------------------------------------------------------------------------


async def yes_commit(p: Probe) -> None:
    k, g = p.kit.key("yes-commit"), p.kit.gid()
    await p.expect_value(k, 0, "before")
    ex = await p.expect_code(Call("Prepare", g, ADD, add_payload(k, 7)), "OK", why="a yes vote")
    p.expect(not ex.read_only, "a yes vote must not be read-only")
    await p.expect_value(k, 0, "after Prepare (held until phase two)")
    await p.expect_code(Call("Commit", g, ADD, add_payload(k, 7)), "OK")
    await p.expect_value(k, 7, "after Commit")


async def no_abort(p: Probe) -> None:
    k, g = p.kit.key("no-abort"), p.kit.gid()
    await p.expect_code(
        Call("Prepare", g, ADD, add_payload(k, 7, "no")), "ABORTED", why="a no vote"
    )
    await p.expect_code(Call("Abort", g, ADD, add_payload(k, 7, "no")), "OK")
    await p.expect_value(k, 0, "after the no vote and Abort")


async def read_only(p: Probe) -> None:
    k, g = p.kit.key("read-only"), p.kit.gid()
    ex = await p.expect_code(Call("Prepare", g, ADD, add_payload(k, 7, "read-only")), "OK")
    p.expect(ex.code != "OK" or ex.read_only, "a read-only vote must set read_only")
    await p.expect_value(k, 0, "after a read-only vote (it leaves phase two)")


async def one_phase(p: Probe) -> None:
    k = p.kit.key("one-phase")
    await p.expect_code(Call("Commit", p.kit.gid(), ADD, add_payload(k, 5), one_phase=True), "OK")
    await p.expect_value(k, 5, "after a one-phase Commit")
    await p.expect_code(
        Call("Commit", p.kit.gid(), ADD, add_payload(k, 5, "no"), one_phase=True),
        "ABORTED",
        why="a one-phase Commit whose vote is no: the refusal is the outcome",
    )
    await p.expect_value(k, 5, "after a refused one-phase Commit")


async def duplicate_prepare_commit(p: Probe) -> None:
    k, g = p.kit.key("dup-2pc"), p.kit.gid()
    c = Call("Prepare", g, ADD, add_payload(k, 3))
    first = await p.expect_code(c, "OK")
    p.same(first, await p.call(c))
    c = Call("Commit", g, ADD, add_payload(k, 3))
    first = await p.expect_code(c, "OK")
    p.same(first, await p.call(c))
    await p.expect_value(k, 3, "after Prepare, Prepare, Commit, Commit")
    # A duplicate of a one-phase Commit, and of a no vote.
    c = Call("Commit", p.kit.gid(), ADD, add_payload(k, 4), one_phase=True)
    first = await p.expect_code(c, "OK")
    p.same(first, await p.call(c))
    await p.expect_value(k, 7, "after a one-phase Commit and its duplicate")
    c = Call("Prepare", p.kit.gid(), ADD, add_payload(k, 4, "no"))
    first = await p.expect_code(c, "ABORTED")
    p.same(first, await p.call(c))


async def duplicate_abort(p: Probe) -> None:
    k, g = p.kit.key("dup-abort"), p.kit.gid()
    await p.expect_code(Call("Prepare", g, ADD, add_payload(k, 3)), "OK")
    c = Call("Abort", g, ADD, add_payload(k, 3))
    first = await p.expect_code(c, "OK")
    p.same(first, await p.call(c))
    await p.expect_value(k, 0, "after Prepare, Abort, Abort")


async def duplicate_execute_compensate(p: Probe) -> None:
    k, g = p.kit.key("dup-saga"), p.kit.gid()
    c = Call("Execute", g, ADD, add_payload(k, 6))
    first = await p.expect_code(c, "OK")
    p.same(first, await p.call(c))
    await p.expect_value(k, 6, "after Execute, Execute")
    c = Call("Compensate", g, ADD, add_payload(k, 6))
    first = await p.expect_code(c, "OK")
    p.same(first, await p.call(c))
    await p.expect_value(k, 0, "after Compensate, Compensate")
    # A refused Execute's duplicate is refused again.
    c = Call("Execute", p.kit.gid(), ADD, add_payload(k, 6, "no"))
    first = await p.expect_code(c, "ABORTED")
    p.same(first, await p.call(c))
    await p.expect_value(k, 0, "after a refused Execute and its duplicate")


async def abort_before_prepare(p: Probe) -> None:
    k, g = p.kit.key("abort-first"), p.kit.gid()
    await p.expect_code(
        Call("Abort", g, ADD, add_payload(k, 9)), "OK", why="an Abort before its Prepare: no-op"
    )
    ex = await p.expect_code(
        Call("Prepare", g, ADD, add_payload(k, 9)),
        "ABORTED",
        why="the Prepare after its Abort must be refused",
    )
    if ex.code == "OK" and not ex.read_only:  # leave nothing held
        await p.call(Call("Abort", g, ADD, add_payload(k, 9)))
    await p.expect_value(k, 0, "after Abort then Prepare")


async def compensate_before_execute(p: Probe) -> None:
    k, g = p.kit.key("compensate-first"), p.kit.gid()
    await p.expect_code(
        Call("Compensate", g, ADD, add_payload(k, 9)),
        "OK",
        why="a Compensate before its Execute: recorded no-op",
    )
    await p.expect_code(
        Call("Execute", g, ADD, add_payload(k, 9)),
        "ABORTED",
        why="the Execute after its Compensate must be refused",
    )
    await p.expect_value(k, 0, "after Compensate then Execute")


async def fencing(p: Probe) -> None:
    k, shard = p.kit.key("fencing"), f"conf-{p.kit.run}"
    g1, g2, g3 = p.kit.gid(), p.kit.gid(), p.kit.gid()
    await p.expect_code(Call("Prepare", g1, ADD, add_payload(k, 2), shard=shard, epoch=5), "OK")
    await p.expect_code(Call("Commit", g1, ADD, add_payload(k, 2), shard=shard, epoch=5), "OK")
    why = "epoch 4 after epoch 5 of the same shard: fenced"
    stale = await p.expect_code(
        Call("Prepare", g2, ADD, add_payload(k, 3), shard=shard, epoch=4),
        "FAILED_PRECONDITION",
        why=why,
    )
    await p.expect_code(
        Call("Execute", g3, ADD, add_payload(k, 4), shard=shard, epoch=4),
        "FAILED_PRECONDITION",
        why=why,
    )
    if stale.code == "OK":  # leave nothing held
        await p.call(Call("Abort", g2, ADD, add_payload(k, 3), shard=shard, epoch=5))
    await p.expect_value(k, 2, "after the fenced calls")


async def malformed(p: Probe) -> None:
    k = p.kit.key("malformed")
    for method in ("Prepare", "Execute"):
        await p.expect_code(
            Call(method, "", ADD, add_payload(k, 1), malformed=True),
            "INVALID_ARGUMENT",
            why="empty gid",
        )
        await p.expect_code(
            Call(method, p.kit.gid(), "conformance.no-such-operation", b"{}", malformed=True),
            *sorted(MALFORMED_CODES),
            why="unknown operation",
        )
        for bad in (b"not json", json.dumps({"key": k}).encode()):
            await p.expect_code(
                Call(method, p.kit.gid(), ADD, bad, malformed=True),
                *sorted(MALFORMED_CODES),
                why="bad payload",
            )
    await p.expect_value(k, 0, "after the malformed calls")


async def health(p: Probe) -> None:
    stub = health_pb2_grpc.HealthStub(p.kit.channel)
    name = p.kit.service
    ex = Exchange("Health/Check", {"service": name})
    p.result.evidence.append(ex)
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    except aio.AioRpcError as e:
        ex.code, ex.details = e.code().name, e.details() or ""
        p.fail(f"health Check({name!r}) -> {ex.code}: expected OK, SERVING")
        return
    ex.code = "OK"
    ex.result = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    p.expect(resp.status == health_pb2.HealthCheckResponse.SERVING, f"health is {ex.result}")


async def stream(p: Probe) -> None:
    kit = p.kit
    # One counter per branch: calls of one batch run concurrently, and a participant may
    # answer "not yet" to a call waiting on a lock another holds.
    k1, k2, k3 = kit.key("stream-2pc"), kit.key("stream-saga"), kit.key("stream-no")
    g1, g2, g3 = kit.gid(), kit.gid(), kit.gid()
    first = [
        Call("Prepare", g1, ADD, add_payload(k1, 3)),
        Call("Execute", g2, ADD, add_payload(k2, 4)),
        Call("Prepare", kit.gid(), ADD, add_payload(k3, 1), malformed=True, raw_method=0),
        Call("Prepare", "", ADD, add_payload(k3, 1), malformed=True),
        Call("Prepare", g3, ADD, add_payload(k3, 5, "no")),
    ]
    second = [
        Call("Commit", g1, ADD, add_payload(k1, 3)),
        Call("Execute", g2, ADD, add_payload(k2, 4)),
        Call("Abort", g3, ADD, add_payload(k3, 5, "no")),
        Call("Prepare", g1, ADD, add_payload(k1, 3)),
    ]
    want = ["OK", "OK", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "ABORTED"]
    want += ["OK", "OK", "OK", "OK"]
    # Is Stream implemented? A stream that sends nothing and half-closes at once: a
    # participant without the method answers UNIMPLEMENTED (probing with a batch instead
    # races the sending with that answer, which grpc then reports as INTERNAL).
    probe = kit.stub.Stream(_nothing(), timeout=CALL_TIMEOUT_S)
    probe_code = await probe.code()
    if probe_code == grpc.StatusCode.UNIMPLEMENTED:
        ex = Exchange("Stream", {"calls": []}, code="UNIMPLEMENTED")
        ex.details = await probe.details() or ""
        p.result.evidence.append(ex)
        p.result.skipped = True
        p.result.note = "Stream is not implemented (UNIMPLEMENTED): optional, skipped"
        return
    # Batches go through a queue to a request iterator (not call.write(), which can fail
    # locally with INTERNAL when the server has already ended the call: the iterator
    # leaves the real status, e.g. UNIMPLEMENTED, to read).
    queue: asyncio.Queue[pb.BranchBatch | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.BranchBatch]:
        while (batch := await queue.get()) is not None:
            yield batch

    session = kit.stub.Stream(requests(), timeout=CALL_TIMEOUT_S * 2)
    got: dict[int, Exchange] = {}
    order: list[int] = []
    next_id = 1

    async def send(calls: list[Call]) -> list[int]:
        nonlocal next_id
        batch = pb.BranchBatch()
        ids = []
        for c in calls:
            method = c.raw_method if c.raw_method is not None else _METHODS[c.method]
            batch.calls.add(id=next_id, method=method, request=c.request())
            ex = Exchange(f"Stream/{c.method}", c.describe(), malformed=c.malformed)
            ex.stream_id = next_id
            got[next_id] = ex
            p.result.evidence.append(ex)
            ids.append(next_id)
            next_id += 1
        queue.put_nowait(batch)
        return ids

    async def receive(ids: list[int]) -> None:
        pending = set(ids)
        while pending:
            msg = await session.read()
            if msg is aio.EOF:
                raise RuleFailed(f"the stream ended with calls {sorted(pending)} unanswered")
            for r in msg.results:
                ex = got.get(r.id)
                if ex is None or r.id not in pending:
                    p.fail(f"a result for id {r.id}, not a call pending on the stream")
                    continue
                pending.discard(r.id)
                order.append(r.id)
                status = _code(r.code)
                ex.code = status.name if status is not None else str(r.code)
                ex.details = r.message
                ex.read_only = r.response.read_only
                ex.result = _result_text(r.response.result)

    try:
        ids = await send(first)
        await receive(ids)
        ids += await send(second)
        await receive(ids[len(first) :])
        queue.put_nowait(None)  # half-close
        end = await session.read()
        p.expect(end is aio.EOF, "the stream sent more after the last result")
        code = await session.code()
        p.expect(code == grpc.StatusCode.OK, f"the stream ended {code.name} after half-close")
    except (aio.AioRpcError, aio.UsageError, asyncio.InvalidStateError) as e:
        code = await session.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            p.result.skipped = True
            p.result.note = "Stream is not implemented (UNIMPLEMENTED): optional, skipped"
            for ex in p.result.evidence:
                ex.code, ex.details = "UNIMPLEMENTED", await session.details() or ""
            return
        raise RuleFailed(
            f"the stream failed: {code.name}: {await session.details()} ({e!r})"
        ) from None
    finally:
        session.cancel()
    for i, code in enumerate(want, start=1):
        ex = got[i]
        p.expect(ex.code == code, f"{ex.brief()}: expected {code}")
    p.same(got[2], got[7])
    p.same(got[1], got[9])
    # The same calls again as unary RPCs: the answers the stream gave (one barrier).
    for i in (2, 6, 9):
        c = (first + second)[i - 1]
        p.same(got[i], await p.call(c))
    await p.expect_value(k1, 3, "after the stream's Prepare and Commit of 3")
    await p.expect_value(k2, 4, "after the stream's Execute of 4 and its duplicate")
    await p.expect_value(k3, 0, "after the stream's no vote and malformed calls")
    if order != sorted(order):
        p.result.note = f"results came out of order: {order}"


async def _nothing() -> AsyncIterator[pb.BranchBatch]:
    return
    yield


def _code(number: int) -> grpc.StatusCode | None:
    for c in grpc.StatusCode:
        if c.value[0] == number:
            return c
    return None


RULES: tuple[RuleSpec, ...] = (
    RuleSpec("health", "the standard health service answers SERVING", health),
    RuleSpec("2pc.yes-commit", "a yes vote holds +N until Commit applies it once", yes_commit),
    RuleSpec("2pc.no-abort", "a no vote is ABORTED; its Abort changes nothing", no_abort),
    RuleSpec("2pc.read-only", "a read-only vote sets read_only and changes nothing", read_only),
    RuleSpec("2pc.one-phase", "a one-phase Commit applies at once; a no is ABORTED", one_phase),
    RuleSpec(
        "duplicate.prepare-commit",
        "duplicate Prepare / Commit / one-phase Commit answer as the first, one effect",
        duplicate_prepare_commit,
    ),
    RuleSpec(
        "duplicate.abort", "a duplicate Abort answers as the first, one effect", duplicate_abort
    ),
    RuleSpec(
        "duplicate.execute-compensate",
        "duplicate Execute / Compensate answer as the first, one effect",
        duplicate_execute_compensate,
    ),
    RuleSpec(
        "abort-before-prepare",
        "an Abort before its Prepare is a recorded no-op; the late Prepare is refused",
        abort_before_prepare,
    ),
    RuleSpec(
        "compensate-before-execute",
        "a Compensate before its Execute is a recorded no-op; the late Execute is refused",
        compensate_before_execute,
    ),
    RuleSpec(
        "fencing",
        "a lower epoch than one seen for the shard is refused FAILED_PRECONDITION",
        fencing,
    ),
    RuleSpec(
        "malformed",
        "empty gid: INVALID_ARGUMENT; unknown operation, bad payload: INVALID_ARGUMENT or"
        " ABORTED; no effect",
        malformed,
    ),
    RuleSpec(
        "stream",
        "Stream answers each call as the unary RPC would, in any order, past malformed calls",
        stream,
        required=False,
    ),
)
#: Computed from every other rule's calls.
RESULT_CODES = ("result-codes", "every answer is a code the result contract allows")


def check_codes(rules: list[RuleResult]) -> RuleResult:
    """The ``result-codes`` rule over the calls of ``rules``: a well-formed call is
    answered OK, ABORTED, FAILED_PRECONDITION, UNAVAILABLE or DEADLINE_EXCEEDED; a
    malformed one INVALID_ARGUMENT or ABORTED; (Stream) UNIMPLEMENTED when not
    implemented."""
    out = RuleResult(*RESULT_CODES)
    checked = 0
    for r in rules:
        for ex in r.evidence:
            if ex.method.startswith("Health/"):
                continue
            allowed = MALFORMED_CODES if ex.malformed else CONTRACT_CODES
            if not ex.code or (r.skipped and ex.code == "UNIMPLEMENTED"):
                continue  # no answer, or an optional method not implemented
            checked += 1
            if ex.code not in allowed:
                out.evidence.append(ex)
                out.failures.append(
                    f"[{r.name}] {ex.brief()}: not in the contract ({', '.join(sorted(allowed))})"
                )
    out.passed = not out.failures
    out.note = f"{checked} answers checked"
    return out


async def run_rules(
    channel: aio.Channel,
    *,
    participant: str,
    service: str = "",
    run: str = "",
    rules: tuple[RuleSpec, ...] = RULES,
) -> Report:
    """Every rule against the participant on ``channel``, in order."""
    kit = Kit(channel, service=service, run=run)
    report = Report(participant=participant, service=service, run=kit.run)
    for spec in rules:
        result = RuleResult(spec.name, spec.description, required=spec.required)
        probe = Probe(kit, result)
        try:
            await spec.check(probe)
        except RuleFailed as e:
            result.failures.append(str(e))
        except aio.AioRpcError as e:
            result.failures.append(f"{e.code().name}: {e.details()}")
        except (TimeoutError, OSError) as e:
            result.failures.append(f"{type(e).__name__}: {e}")
        result.passed = not result.skipped and not result.failures
        report.rules.append(result)
    report.rules.append(check_codes(report.rules))
    return report


async def run_conformance(
    address: str, *, service: str = "", run: str = "", connect_timeout_s: float = 10.0
) -> Report:
    """Connects to the participant at ``address`` (secured like every Accord link:
    ``ACCORD_TLS_*``) and runs every rule. Raises ``ConnectionError`` when it cannot be
    reached within ``connect_timeout_s``."""
    from accord.common.transport import make_channel

    async with make_channel(address) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), connect_timeout_s)
        except TimeoutError:
            raise ConnectionError(
                f"participant at {address} not reachable within {connect_timeout_s:g}s"
            ) from None
        return await run_rules(channel, participant=address, service=service, run=run)
