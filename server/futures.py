"""Results of asynchronous requests, fetched by the SDK with long-polling `retrieve_future`.

The SDK re-polls at once after `try_again`, so `wait` holds each poll until the result is
ready or the hold expires. Results are encoded once on completion (JSON, or protobuf for
forward/sample outputs) and kept for a TTL, since the SDK never acknowledges them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from server.errors import NotFound
from server.wire.types import RequestFailedResponse
from tuft_jax.errors import InputError

logger = logging.getLogger(__name__)

JSON = "application/json"
PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class FutureResult:
    """An encoded result body and its media type, as `retrieve_future` returns it."""

    body: bytes
    media_type: str


@dataclass
class _Entry:
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: FutureResult | None = None
    completed_at: float = 0.0


class FutureRegistry:
    def __init__(self, *, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: dict[str, _Entry] = {}
        self._ttl_s = ttl_s
        self._clock = clock

    def create(self) -> str:
        request_id = str(uuid.uuid4())
        self._entries[request_id] = _Entry()
        return request_id

    def complete(self, request_id: str, result: msgspec.Struct | bytes) -> None:
        """Store a success: protobuf `bytes`, or a JSON response Struct."""
        if isinstance(result, bytes):
            self._finish(request_id, FutureResult(result, PROTOBUF))
        else:
            self._finish(request_id, FutureResult(msgspec.json.encode(result), JSON))

    def fail(self, request_id: str, exc: BaseException) -> None:
        """Store a failure; bad input is the user's fault, anything else is ours (and logged)."""
        if isinstance(exc, InputError):
            failure = RequestFailedResponse(error=str(exc), category="user")
        else:
            logger.error("request %s failed", request_id, exc_info=exc)
            failure = RequestFailedResponse(error=f"{type(exc).__name__}: {exc}", category="server")
        self._finish(request_id, FutureResult(msgspec.json.encode(failure), JSON))

    def settle_from(self, request_id: str, outcome: asyncio.Future[msgspec.Struct | bytes]) -> None:
        """Complete or fail `request_id` when `outcome` finishes."""

        def settle(fut: asyncio.Future[msgspec.Struct | bytes]) -> None:
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is None:
                self.complete(request_id, fut.result())
            else:
                self.fail(request_id, exc)

        outcome.add_done_callback(settle)

    async def wait(self, request_id: str, hold_s: float) -> FutureResult | None:
        """The result, or None if it is still pending after `hold_s` seconds."""
        entry = self._entries.get(request_id)
        if entry is None:
            raise NotFound(f"unknown request_id {request_id!r} (it may have expired)")
        if entry.result is not None:
            return entry.result
        try:
            await asyncio.wait_for(entry.done.wait(), hold_s)
        except TimeoutError:
            return None
        return entry.result

    def collect_garbage(self) -> int:
        """Drop results completed more than the TTL ago; returns how many were dropped."""
        cutoff = self._clock() - self._ttl_s
        expired = [rid for rid, e in self._entries.items() if e.result is not None and e.completed_at < cutoff]
        for request_id in expired:
            del self._entries[request_id]
        return len(expired)

    def _finish(self, request_id: str, result: FutureResult) -> None:
        entry = self._entries.get(request_id)
        if entry is None or entry.result is not None:
            return
        entry.result = result
        entry.completed_at = self._clock()
        entry.done.set()
