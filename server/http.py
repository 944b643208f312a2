"""Reading request bodies (size-limited, msgspec-typed JSON) and writing JSON responses."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLarge, error_response

T = TypeVar("T")

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in a request (the SDK's bodies nest at most
5 deep). msgspec, and the stdlib json that stores `user_metadata`, recurse once per level,
also through unknown fields and `Any` values: a body nested near Python's recursion limit
(1000) fails as a RecursionError, or decodes here and fails wherever it is read back from
a deeper stack."""

_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
"""Opening brackets to +1 and closing ones to -1, as int8."""


def decode_json(raw: bytes, body_type: type[T], *, limit_depth: bool = True) -> T:
    """Decode request JSON as `body_type`; anything malformed raises `msgspec.DecodeError` (a 400),
    and so (as a `msgspec.ValidationError`) does nesting deeper than `MAX_JSON_DEPTH`, unless
    `limit_depth` is false."""
    try:
        body = msgspec.json.decode(raw, type=body_type)
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply to decode") from None
    if limit_depth and raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _nesting_depth(raw) > MAX_JSON_DEPTH:
        raise msgspec.ValidationError(f"JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def _nesting_depth(valid_json: bytes) -> int:
    """How deep arrays and objects nest, brackets inside strings aside; in C and numpy, since
    a body may hold millions of brackets."""
    brackets = _JSON_STRING.sub(b"", valid_json).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    steps = np.frombuffer(brackets, dtype=np.int8)
    depth = deepest = 0
    for start in range(0, len(steps), 1 << 20):
        running = np.cumsum(steps[start : start + (1 << 20)], dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
    return deepest


async def read_json(request: Request, body_type: type[T]) -> T:
    """Decode the body as `body_type` (see `decode_json`)."""
    return decode_json(await request.body(), body_type)


def json_response(content: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(content), status_code=status, media_type="application/json")


class LimitBodySize:
    """Refuses a request body over its route's limit with a 413, never holding more than the limit.

    A declared Content-Length is checked before anything is read; since a chunked body
    declares none, the bytes are also counted as the app reads them, and reading fails as
    soon as the count passes the limit.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await error_response(413, _too_large(declared, limit))(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(_too_large(received, limit))
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    value = next((v for name, v in scope["headers"] if name == b"content-length"), None)
    return int(value) if value is not None and value.isdigit() else None


def _too_large(size: int, limit: int) -> str:
    return f"request body of at least {size} bytes exceeds this route's limit of {limit} bytes"
