"""The registration sidecar: runs next to a participant that does not embed the SDK (any
language that implements ``accord.v1.Participant``) and keeps it in etcd while, and only
while, its standard gRPC health status is SERVING.

It asks the target's ``grpc.health.v1.Health/Check`` every ``interval_s`` (a deadline of
its own, so a hung target counts as down). SERVING registers the target under
``/accord/v1/services/<service>/<instance>`` on a lease; anything else (NOT_SERVING, an
error, no answer) revokes the lease at once. If the sidecar itself dies, the lease ends
within its TTL. Either way the key is gone within one TTL of the target going down.

At start it waits for etcd's first answer for at most ``etcd_wait_s`` seconds, then
gives up (:class:`~accord.registry._etcd.EtcdUnreachableError`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accord.common.transport import TransportSettings, make_channel, parse_address
from accord.registry._etcd import (
    DEFAULT_ETCD_WAIT_S,
    DEFAULT_TTL_S,
    Etcd,
    Registration,
    service_key,
    service_value,
)

log = logging.getLogger("accord.registry.sidecar")


@dataclass(frozen=True, kw_only=True)
class SidecarSettings:
    service: str
    target: str
    etcd: str
    instance_id: str = ""
    #: The address participants are dialled on; defaults to ``target``.
    advertise: str = ""
    #: The health-checked service name ("" = the whole server).
    health_service: str = ""
    operations: tuple[str, ...] = ()
    ttl_s: int = DEFAULT_TTL_S
    interval_s: float = 1.0
    #: How long to wait at start for etcd's first answer before giving up.
    etcd_wait_s: float = DEFAULT_ETCD_WAIT_S

    @property
    def key(self) -> str:
        instance = self.instance_id or f"{self.service}-{self.target.replace(':', '-')}"
        return service_key(self.service, instance)


class Sidecar:
    """``await Sidecar(settings).run(stop)`` until ``stop`` is set (or the task is
    cancelled); then deregisters."""

    def __init__(self, settings: SidecarSettings, *, transport: TransportSettings | None = None):
        if settings.interval_s <= 0:
            raise ValueError("interval must be > 0")
        parse_address(settings.target)  # AddressError (a ValueError) when malformed
        self.settings = settings
        self._transport = transport
        self.registration: Registration | None = None
        #: The last health status seen ("" before the first answer).
        self.status = ""

    async def check(self, stub: health_pb2_grpc.HealthStub) -> str:
        s = self.settings
        try:
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(service=s.health_service),
                timeout=max(0.2, min(s.interval_s, s.ttl_s / 3)),
            )
        except aio.AioRpcError as e:
            return "NOT_FOUND" if e.code() == grpc.StatusCode.NOT_FOUND else e.code().name
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        value = service_value(s.advertise or s.target, s.operations)
        channel = make_channel(s.target, self._transport)
        stub = health_pb2_grpc.HealthStub(channel)
        async with Etcd(s.etcd) as etcd:
            try:
                await etcd.wait_reachable(s.etcd_wait_s)
                while not stop.is_set():
                    status = await self.check(stub)
                    if status != self.status:
                        log.info(
                            "event=health service=%s target=%s status=%s",
                            s.service,
                            s.target,
                            status,
                        )
                        self.status = status
                    if status == "SERVING" and self.registration is None:
                        self.registration = Registration(etcd, s.key, value, ttl_s=s.ttl_s)
                        await self.registration.start()
                    elif status != "SERVING" and self.registration is not None:
                        await self.registration.close()
                        self.registration = None
                    try:
                        async with asyncio.timeout(s.interval_s):
                            await stop.wait()
                    except TimeoutError:
                        pass
            finally:
                if self.registration is not None:
                    await self.registration.close()
                    self.registration = None
                await channel.close()
