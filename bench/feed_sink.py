"""A feed subscriber for the ``2pc-subscribed`` row: it subscribes to a coordinator's
event feed (``AccordClient.subscribe``) from LSN 0 and counts what it gets, checking
that LSNs only go up (resubscribing from the last one if the stream breaks).

    python -m bench.feed_sink --coordinator HOST:PORT

Prints ``subscribed to HOST:PORT`` once its stream is open, then a progress line every
second (``events N batches B last_lsn L out_of_order K resubscribed R``) and once more
on SIGTERM, then exits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence

from accord.client import AccordClient, AccordClientError
from accord.common import runner

#: Resubscriptions after a broken stream before giving up.
MAX_RESUBSCRIBE = 20


async def run(address: str, max_batch: int) -> None:
    events = batches = last = disorder = resubscribed = 0

    def report() -> None:
        print(
            f"events {events} batches {batches} last_lsn {last} out_of_order {disorder} "
            f"resubscribed {resubscribed}",
            flush=True,
        )

    async def consume(client: AccordClient) -> None:
        nonlocal events, batches, last, disorder, resubscribed
        announced = False
        next_report = time.monotonic() + 1
        for _ in range(MAX_RESUBSCRIBE):
            feed = client.subscribe(last, max_batch=max_batch)
            try:
                if not announced:
                    print(f"subscribed to {address}", flush=True)
                    announced = True
                async for batch in feed:
                    batches += 1
                    for ev in batch.events:
                        if ev.lsn <= last:
                            disorder += 1
                        last = ev.lsn
                    events += len(batch.events)
                    if time.monotonic() >= next_report:
                        report()
                        next_report = time.monotonic() + 1
            except AccordClientError as e:
                print(f"stream broke: {e}", flush=True)
                resubscribed += 1
                await asyncio.sleep(0.2)
            finally:
                await feed.aclose()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AccordClient(address) as client:
        await client.wait_ready(timeout_s=30)
        task = loop.create_task(consume(client))
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    report()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feed_sink")
    parser.add_argument("--coordinator", required=True, help="HOST:PORT")
    parser.add_argument("--max-batch", type=int, default=0)
    args = parser.parse_args(argv)
    runner.run(run(args.coordinator, args.max_batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
