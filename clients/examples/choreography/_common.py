"""What the example's services share: connecting to NATS, the shop's own stream, and
a consume loop that acknowledges a message only after it was handled."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError

log = logging.getLogger("accord.examples.choreography")

#: The shop's own events (shipments), beside the relay's ACCORD stream.
SHOP_STREAM = "SHOP"


async def connect(url: str) -> tuple[Client, JetStreamContext]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    js = nc.jetstream()
    try:
        await js.stream_info(SHOP_STREAM)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=SHOP_STREAM, subjects=["shop.>"]))
    return nc, js


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def consume(
    js: JetStreamContext,
    *,
    stream: str,
    subject: str,
    durable: str,
    handle: Callable[[Msg], Awaitable[None]],
    stop: asyncio.Event,
) -> None:
    """Handles every message of ``stream`` on ``subject`` through the durable consumer
    ``durable`` (created if missing; it keeps its place across restarts), in order,
    acknowledging each after ``handle`` returns. A message whose handling fails is
    refused with the rest of its batch: JetStream delivers them again a second later."""
    while not stop.is_set():  # the relay may not have made its stream yet
        try:
            await js.stream_info(stream)
            break
        except NotFoundError:
            await asyncio.sleep(0.5)
    sub = await js.pull_subscribe(
        subject,
        durable=durable,
        stream=stream,
        config=ConsumerConfig(ack_wait=10, max_ack_pending=64),
    )
    while not stop.is_set():
        try:
            msgs = await sub.fetch(32, timeout=1)
        except TimeoutError:
            continue
        for msg in msgs:
            try:
                await handle(msg)
            except Exception:
                log.exception("event=handle_failed subject=%s", msg.subject)
                for m in msgs[msgs.index(msg) :]:
                    await m.nak(delay=1)  # this one and the rest: all delivered again
                break
            await msg.ack()
