"""`retrieve_future`: long-polls a request's result (JSON, protobuf, or a failure)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http import json_response, read_json
from server.service import Service
from server.wire.types import FutureRetrieveRequest, TryAgainResponse


async def retrieve_future(request: Request) -> Response:
    body = await read_json(request, FutureRetrieveRequest)
    service = Service.of(request)
    result = await service.futures.wait(body.request_id, service.options.future_hold_s)
    if result is None:
        return json_response(TryAgainResponse(request_id=body.request_id, queue_state="active"))
    return Response(result.body, media_type=result.media_type)


routes = [Route("/api/v1/retrieve_future", retrieve_future, methods=["POST"])]
