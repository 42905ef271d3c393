"""A thin synchronous wrapper over :class:`AccordClient` for code without an event loop.
It owns a private loop in a daemon thread; every method blocks until the call is done."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from accord.client._client import AccordClient, Branch, TxnResult
from accord.client._session import DEFAULT_THRESHOLD
from accord.common.transport import TransportSettings

T = TypeVar("T")


class SyncAccordClient:
    def __init__(
        self,
        address: str,
        *,
        transport: TransportSettings | None = None,
        timeout_s: float = 60.0,
        token: str = "",
        session: str = "auto",
        session_threshold: int = DEFAULT_THRESHOLD,
    ) -> None:
        """As :class:`AccordClient` (``session``: how calls travel). One thread calls
        one method at a time, so ``auto`` only uses the stream when several threads
        call at once."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="accord-client", daemon=True
        )
        self._thread.start()

        async def make() -> AccordClient:
            return AccordClient(
                address,
                transport=transport,
                timeout_s=timeout_s,
                token=token,
                session=session,
                session_threshold=session_threshold,
            )

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncAccordClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def execute(
        self, branches: Sequence[Branch], *, idempotency_key: str = "", timeout_ms: int = 0
    ) -> TxnResult:
        return self._run(
            self._client.execute(branches, idempotency_key=idempotency_key, timeout_ms=timeout_ms)
        )

    def begin(self, *, timeout_ms: int = 0, idempotency_key: str = "") -> str:
        tx = self._run(self._client.begin(timeout_ms=timeout_ms, idempotency_key=idempotency_key))
        return tx.gid

    def enlist(self, gid: str, branch: Branch) -> str:
        return self._run(self._client.enlist(gid, branch))

    def commit(self, gid: str) -> TxnResult:
        return self._run(self._client.commit(gid))

    def abort(self, gid: str, reason: str = "") -> TxnResult:
        return self._run(self._client.abort(gid, reason))

    def get(self, gid: str) -> TxnResult:
        return self._run(self._client.get(gid))

    def list(
        self, *, states: Sequence[str] = (), limit: int = 100, page_token: str = ""
    ) -> tuple[list[TxnResult], str]:
        return self._run(self._client.list(states=states, limit=limit, page_token=page_token))
