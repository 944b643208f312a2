"""`retrieve_future`: long-polls a request's result (JSON, protobuf, or a failure)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.futures import FutureResult
from server.http import json_response, read_json
from server.service import Service
from server.wire.types import FutureRetrieveRequest, TryAgainResponse


async def retrieve_future(request: Request) -> Response:
    body = await read_json(request, FutureRetrieveRequest)
    service = Service.of(request)
    poll = service.futures.wait(body.request_id, service.options.future_hold_s)
    result = await _unless_shutting_down(poll, request.app.state.shutting_down)
    if result is None:
        return json_response(TryAgainResponse(request_id=body.request_id, queue_state="active"))
    return Response(result.body, media_type=result.media_type)


async def _unless_shutting_down(
    poll: Coroutine[Any, Any, FutureResult | None], shutting_down: asyncio.Event
) -> FutureResult | None:
    """The poll's outcome, or None (try again) once the server begins to stop: the server
    waits for open requests before it stops, and a held poll would delay that."""
    polling = asyncio.ensure_future(poll)
    stopping = asyncio.ensure_future(shutting_down.wait())
    try:
        await asyncio.wait({polling, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        polling.cancel()
        stopping.cancel()
    return polling.result() if polling.done() else None


routes = [Route("/api/v1/retrieve_future", retrieve_future, methods=["POST"])]
