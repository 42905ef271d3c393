"""Calls from the coordinator to participants: one channel per participant address,
reused; branch addresses resolved from the registry's local cache; the participant result
contract (DESIGN.md) turned into a three-way answer. Retrying is the engine's job.

Routing: a branch named by service keeps to the instance it started on while that
instance is live (registered) and answering; when its key is gone, or a call to it
fails as UNAVAILABLE, the next attempt goes to another live instance of the same
service. Instances registered under one service name must therefore share their state
(one database behind several processes): any phase of a branch may reach any of them.

Transport (``--participant-transport``): ``unary`` sends one RPC per call; ``stream``
multiplexes the calls to each address over one long-lived bidirectional stream
(:mod:`accord.coordinator._stream`); ``auto`` (the default) streams to every participant that
supports it and falls back to unary, for that address, when one answers UNIMPLEMENTED
(asking again after ``UNARY_RECHECK_S``). Both give the same :class:`CallResult`.

Sent or not: a failed call says whether its request can have reached the participant
(:attr:`CallResult.sent`), which decides whether a saga step whose attempts all failed
must be compensated. gRPC's UNAVAILABLE covers both a request never sent (no
connection) and one sent whose answer was lost, and its details text is not a contract,
so the answer comes from structure, not from that text: a unary call is issued only on
a channel that is READY (:func:`wait_connected`; until then gRPC would fail it as
UNAVAILABLE without sending it, or hold it), and a stream call counts as sent from the
moment its batch is handed to the stream, which happens only once the stream's channel
is READY (:mod:`accord.coordinator._stream`). A call with no live instance to go to was
not sent either. Everything else that fails (a deadline, UNAVAILABLE on a connected
channel, a broken stream with the call written, any other status) may have been sent."""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc import aio

import accord.v1 as pb
from accord.common.transport import TransportSettings, make_channel
from accord.coordinator._methods import Method
from accord.coordinator._stream import (
    METHOD_NUMBERS,
    CallNotSent,
    ParticipantStream,
    StreamUnsupported,
)
from accord.registry import Registry

log = logging.getLogger("accord.coordinator.calls")


class Verdict(enum.Enum):
    OK = "ok"  # yes / done
    NO = "no"  # ABORTED: a business no
    RETRY = "retry"  # not yet: try again later


@dataclass(frozen=True, slots=True)
class CallResult:
    verdict: Verdict
    read_only: bool = False
    detail: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    result: bytes = b""
    #: False only when the request certainly never left this process (see the module
    #: docstring): it cannot have taken effect at the participant.
    sent: bool = True


_EXPECTED_RETRY = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        # A participant's bound on calls in flight per stream.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

_STATUS: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

#: An address found without ``Stream`` (transport ``auto``) is called unary for this
#: long, then asked again (it may have been upgraded).
UNARY_RECHECK_S = 300.0


async def wait_connected(channel: aio.Channel, timeout_s: float) -> str | None:
    """Waits (at most ``timeout_s``) until ``channel`` is connected: None once it is
    READY, else why nothing may be sent on it now. A channel in TRANSIENT_FAILURE is
    answered at once, as gRPC itself fails a call there (without ``wait_for_ready``);
    IDLE is asked to connect. Nothing is sent while this waits."""
    state = channel.get_state(try_to_connect=True)
    if state is grpc.ChannelConnectivity.READY:
        return None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    return "cannot connect (channel in TRANSIENT_FAILURE)"
                if state is grpc.ChannelConnectivity.SHUTDOWN:
                    return "the channel is closed"
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
                if state is grpc.ChannelConnectivity.READY:
                    return None
    except TimeoutError:
        return f"not connected within {timeout_s:.3g} s (channel {state.name})"


class Transport(enum.StrEnum):
    AUTO = "auto"
    STREAM = "stream"
    UNARY = "unary"


class ParticipantCalls:
    """Sends branch requests; never raises for a participant's answer."""

    def __init__(
        self,
        *,
        registry: Registry,
        transport: TransportSettings | None = None,
        on_fenced: Callable[[str], None] | None = None,
        mode: Transport = Transport.AUTO,
        on_fallback: Callable[[str], None] | None = None,
        on_stream_open: Callable[[str], None] | None = None,
        may_act: Callable[[], bool] | None = None,
    ) -> None:
        """``may_act``: False while this coordinator is not sure to own its shard (see
        :meth:`accord.registry.ShardLease.may_act`); every call is then answered RETRY,
        unsent."""
        self._registry = registry
        self._may_act = may_act
        self._on_fenced = on_fenced
        self._transport = transport or TransportSettings.from_env()
        self.mode = mode
        self._on_fallback = on_fallback
        self._on_stream_open = on_stream_open
        self._stubs: dict[str, pb.ParticipantStub] = {}
        #: The service an address was resolved for (from the registry): with TLS, the
        #: certificate there must carry that name (the handshake checks it).
        self._service_at: dict[str, str] = {}
        self._channel_of: dict[str, aio.Channel] = {}
        self._channels: list[aio.Channel] = []
        self._streams: dict[str, ParticipantStream] = {}
        #: Addresses called unary (no Stream there), until a monotonic time.
        self._unary_until: dict[str, float] = {}
        #: Times an address was found without Stream and its calls went unary.
        self.fallbacks = 0
        #: Streams opened (first call to an address, or again after one broke).
        self.streams_opened = 0
        self._rr = itertools.count()

    def resolve(self, service: str, address: str) -> str:
        """The address to start a branch on: its own, or a live instance of its service
        (round robin), or "" when none is live right now."""
        return address or self._pick(service, "", "")

    def known(self, service: str) -> bool:
        return self._registry.known(service)

    def describe(self) -> str:
        return self._registry.describe()

    def _pick(self, service: str, current: str, avoid: str) -> str:
        instances = self._registry.instances(service)
        if not instances:
            return ""
        if current and not avoid:
            for inst in instances:
                if inst.address == current:
                    return current
        choices = [i for i in instances if i.address != avoid] or instances
        return choices[next(self._rr) % len(choices)].address

    async def send(
        self,
        method: Method,
        service: str,
        address: str,
        current: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> tuple[CallResult, str]:
        """One attempt of a branch call, routed as the module docstring says. Returns
        the answer and the address the next attempt should use."""
        # With no live instance known, the last address used is still worth a try: the
        # instance may be alive while the registry (etcd) is down or lagging.
        target = address or self._pick(service, current, "") or current
        if not target:
            detail = (
                f"no live instance of participant service {service!r} "
                f"(registry: {self._registry.describe()})"
            )
            return CallResult(
                Verdict.RETRY, detail=detail, code=grpc.StatusCode.UNAVAILABLE, sent=False
            ), ""
        if not address and service:
            # Resolved by service name: over TLS, the participant's certificate must name
            # the service (its channel is opened so, see _stub).
            self._service_at.setdefault(target, service)
        result = await self.call(method, target, request, attempt_s, metadata=metadata)
        if result.code == grpc.StatusCode.UNAVAILABLE and not address:
            other = self._pick(service, target, target)
            if other != target:
                log.info(
                    "event=failover gid=%s branch=%s service=%s from=%s to=%s",
                    request.gid,
                    request.branch_id,
                    service,
                    target,
                    other,
                )
            return result, other or target
        return result, target

    def _stub(self, address: str) -> pb.ParticipantStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = make_channel(
                address, self._transport, server_name=self._service_at.get(address, "")
            )
            self._channels.append(channel)
            self._channel_of[address] = channel
            stub = self._stubs[address] = pb.ParticipantStub(channel)
        return stub

    async def call(
        self,
        method: Method,
        address: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> CallResult:
        """``metadata``: the W3C trace context of the call's span (None: tracing off);
        over a stream it travels in the request's ``trace_context``."""
        if self._may_act is not None and not self._may_act():
            await asyncio.sleep(min(attempt_s, 0.2))  # the caller retries at once
            return CallResult(
                Verdict.RETRY,
                detail="not sent: this coordinator is not sure to own its shard (its lease "
                "was not renewed in time)",
                code=grpc.StatusCode.UNAVAILABLE,
                sent=False,
            )
        if self.mode is not Transport.UNARY and not self._unary_only(address):
            stream = self._stream(address, attempt_s)
            try:
                r = await stream.call(METHOD_NUMBERS[method], request, attempt_s, metadata)
            except CallNotSent as e:
                return self._answer(
                    method, address, request, e.code, f"not sent: {e.message}", None, sent=False
                )
            except StreamUnsupported:
                if self.mode is Transport.STREAM:
                    return self._answer(
                        method,
                        address,
                        request,
                        grpc.StatusCode.UNIMPLEMENTED,
                        "the participant has no Stream (transport: stream)",
                        None,
                    )
                # auto: this call (not yet handled by the participant) goes unary.
            else:
                code = _STATUS.get(r.code, grpc.StatusCode.UNKNOWN)
                return self._answer(method, address, request, code, r.message, r.response)
        stub = self._stub(address)
        why = await wait_connected(self._channel_of[address], attempt_s)
        if why is not None:
            return self._answer(
                method,
                address,
                request,
                grpc.StatusCode.UNAVAILABLE,
                f"not sent: {why}",
                None,
                sent=False,
            )
        rpc = getattr(stub, method.value)
        try:
            response: pb.BranchResponse = await rpc(request, timeout=attempt_s, metadata=metadata)
        except aio.AioRpcError as e:
            return self._answer(method, address, request, e.code(), e.details() or "", None)
        return CallResult(
            Verdict.OK,
            read_only=response.read_only,
            detail=response.message,
            result=response.result,
        )

    def _answer(
        self,
        method: Method,
        address: str,
        request: pb.BranchRequest,
        code: grpc.StatusCode,
        details: str,
        response: pb.BranchResponse | None,
        *,
        sent: bool = True,
    ) -> CallResult:
        """The result contract (DESIGN.md), the same for both transports."""
        if code == grpc.StatusCode.OK:
            if response is None:
                response = pb.BranchResponse()
            return CallResult(
                Verdict.OK,
                read_only=response.read_only,
                detail=response.message,
                result=response.result,
            )
        if code == grpc.StatusCode.ABORTED:
            return CallResult(Verdict.NO, detail=details or "aborted", code=code)
        detail = f"{method} {request.branch_id}@{address}: {code.name}: {details}"
        if not sent and code == grpc.StatusCode.UNAVAILABLE and self._transport.tls:
            name = self._service_at.get(address)
            detail += " (TLS: the participant must present a certificate from our CA" + (
                f" naming service {name!r})" if name else ")"
            )
        if (
            code == grpc.StatusCode.FAILED_PRECONDITION
            and details.startswith("fenced:")
            and self._on_fenced is not None
        ):
            # A participant has seen a newer owner of this shard.
            self._on_fenced(detail)
        if code not in _EXPECTED_RETRY and sent:
            log.warning(
                "event=unexpected_participant_status method=%s branch=%s address=%s code=%s "
                "detail=%r; will retry",
                method.value,
                request.branch_id,
                address,
                code.name,
                details,
            )
        return CallResult(Verdict.RETRY, detail=detail, code=code, sent=sent)

    def _unary_only(self, address: str) -> bool:
        until = self._unary_until.get(address)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._unary_until[address]
        return False

    def _stream(self, address: str, connect_s: float) -> ParticipantStream:
        """The open stream to ``address``, or a new one (its first batch waits up to
        ``connect_s`` for a connection)."""
        stream = self._streams.get(address)
        if stream is None or stream.broken is not None:
            stub = self._stub(address)
            stream = self._streams[address] = ParticipantStream(
                stub,
                address,
                on_unsupported=self._stream_unsupported,
                connect=functools.partial(wait_connected, self._channel_of[address], connect_s),
            )
            self.streams_opened += 1
            if self._on_stream_open is not None:
                self._on_stream_open(address)
        return stream

    def _stream_unsupported(self, stream: ParticipantStream) -> None:
        if self.mode is not Transport.AUTO:
            log.warning("event=stream_unsupported address=%s transport=stream", stream.address)
            return
        self._unary_until[stream.address] = time.monotonic() + UNARY_RECHECK_S
        self.fallbacks += 1
        log.info("event=stream_fallback address=%s transport=unary", stream.address)
        if self._on_fallback is not None:
            self._on_fallback(stream.address)

    async def close(self) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        await asyncio.gather(*(s.close() for s in streams))
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._channel_of.clear()
        self._stubs.clear()
