"""Results of asynchronous requests, fetched by the SDK with long-polling `retrieve_future`.

The SDK re-polls at once after `try_again`, so `wait` holds each poll until the result is
ready or the hold expires. Results are encoded once on completion (JSON, or protobuf for
forward/sample outputs) and kept for a TTL, since the SDK never acknowledges them.

With a `journal` (the store), every future's owner and status are also written to the
database, with the body of JSON results and failures. After a restart a future that was
still pending reads as failed ("server restarted"), a JSON result is still served, and a
protobuf result (memory only) reads as lost, so no client polls forever. A future is only
visible to the owner that created it.

Every training and sampling request passes through here, so with `traces` a future created
for a session's request is also recorded in that session's trace (server.session_trace),
from acceptance to its stored outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from server.auth import current_owner, visible_to_caller
from server.errors import NotFound
from server.session_trace import SessionTraces, TracedRequest
from server.store import Store
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


RESTARTED = RequestFailedResponse(
    error="the server restarted while this request was running; submit it again", category="server"
)
LOST = RequestFailedResponse(
    error="the result of this request was lost when the server restarted; submit it again", category="server"
)


@dataclass
class _Entry:
    owner: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: FutureResult | None = None
    completed_at: float = 0.0


class FutureRegistry:
    def __init__(
        self,
        *,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        journal: Store | None = None,
        traces: SessionTraces | None = None,
    ) -> None:
        self._entries: dict[str, _Entry] = {}
        self._ttl_s = ttl_s
        self._clock = clock
        self._journal = journal
        self._traces = traces

    def create(self, owner: str | None = None, *, traced: TracedRequest | None = None) -> str:
        """A new pending request, owned by `owner` (default: the caller of this request), and
        recorded in the trace of `traced.session_id` if given."""
        request_id = str(uuid.uuid4())
        owner = owner if owner is not None else current_owner() or ""
        self._entries[request_id] = _Entry(owner=owner)
        if self._journal is not None:
            self._journal.add_future(request_id, owner, datetime.now(UTC))
        if self._traces is not None and traced is not None:
            self._traces.started(request_id, traced)
        return request_id

    def recover(self) -> int:
        """At startup: fail the futures a previous process left pending; returns how many."""
        if self._journal is None:
            return 0
        return self._journal.fail_pending_futures(msgspec.json.encode(RESTARTED), datetime.now(UTC))

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
        self._finish(request_id, FutureResult(msgspec.json.encode(failure), JSON), error=failure.error)

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
            return self._from_journal(request_id)
        if not visible_to_caller(entry.owner):
            raise NotFound(f"unknown request_id {request_id!r} (it may have expired)")
        if entry.result is not None:
            return entry.result
        try:
            await asyncio.wait_for(entry.done.wait(), hold_s)
        except TimeoutError:
            return None
        return entry.result

    def _from_journal(self, request_id: str) -> FutureResult | None:
        """A request this process does not hold: recorded by an earlier one, or unknown."""
        record = None if self._journal is None else self._journal.get_future(request_id)
        if record is None or not visible_to_caller(record.owner):
            raise NotFound(f"unknown request_id {request_id!r} (it may have expired)")
        if record.status == "pending":
            return None  # another server process sharing the database is still running it
        if record.body is None or record.media_type != JSON:
            return FutureResult(msgspec.json.encode(LOST), JSON)
        return FutureResult(record.body, record.media_type)

    def collect_garbage(self) -> int:
        """Drop results completed more than the TTL ago; returns how many were dropped."""
        cutoff = self._clock() - self._ttl_s
        expired = [rid for rid, e in self._entries.items() if e.result is not None and e.completed_at < cutoff]
        for request_id in expired:
            del self._entries[request_id]
        if self._journal is not None:
            self._journal.delete_futures_before(datetime.now(UTC) - timedelta(seconds=self._ttl_s))
        return len(expired)

    def _finish(self, request_id: str, result: FutureResult, *, error: str | None = None) -> None:
        """Store a result; `error` is the message of a failure."""
        entry = self._entries.get(request_id)
        if entry is None or entry.result is not None:
            return
        entry.result = result
        entry.completed_at = self._clock()
        entry.done.set()
        failed = error is not None
        if self._traces is not None:
            self._traces.finished(request_id, "failed" if failed else "done", error)
        if self._journal is not None:
            body = result.body if result.media_type == JSON else None
            try:
                self._journal.finish_future(
                    request_id, "failed" if failed else "done", result.media_type, body, datetime.now(UTC)
                )
            except Exception:
                logger.exception("recording the outcome of request %s failed", request_id)
