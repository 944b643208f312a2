"""How the compatible APIs answer besides plain JSON: server-sent events, and errors in each
API's own shape (what its client package parses into an exception), plus the house `detail`."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.errors import describe_error

Endpoint = Callable[[Request], Awaitable[Response]]
ErrorBody = Callable[[int, str], dict[str, Any]]
"""(status, detail) -> the API's error object."""


def with_error_body(error_body: ErrorBody) -> Callable[[Endpoint], Endpoint]:
    """Answer the refusals the app would answer as `{"detail": ...}` (`describe_error`) as
    `error_body(status, detail)` with `detail` kept; bugs still reach the app's 500 handler."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def wrapped(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Exception as exc:
                described = describe_error(exc)
                if described is None:
                    raise
                status, detail = described
                return JSONResponse({**error_body(status, detail), "detail": detail}, status_code=status)

        return wrapped

    return wrap


def sse_event(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: `data` (a Struct or plain JSON value) encoded, or a raw string."""
    payload = data.encode() if isinstance(data, str) else msgspec.json.encode(data)
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + payload + b"\n\n"


def sse_response(events: Iterable[bytes]) -> StreamingResponse:
    return StreamingResponse(iter(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
