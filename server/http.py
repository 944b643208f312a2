"""Reading msgspec-typed JSON request bodies and writing JSON responses."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

T = TypeVar("T")


async def read_json(request: Request, body_type: type[T]) -> T:
    """Decode the body as `body_type`; malformed bodies raise `msgspec.DecodeError` (a 400)."""
    return msgspec.json.decode(await request.body(), type=body_type)


def json_response(content: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(content), status_code=status, media_type="application/json")
