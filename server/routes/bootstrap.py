"""Client bootstrap, sessions and service-level endpoints."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http import json_response, read_json
from server.service import Service
from server.wire.types import (
    CreateSessionRequest,
    CreateSessionResponse,
    GetServerCapabilitiesResponse,
    SessionFinishRequest,
    SessionHeartbeatRequest,
    SessionHeartbeatResponse,
    SupportedModel,
)

CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "proto_compress_fwdbwd": True,
}
"""Feature flags for `/client/config`: plain API keys, zstd-compressed forward_backward bodies."""


async def client_config(_: Request) -> Response:
    return json_response(CLIENT_CONFIG)


async def dynamic_config(_: Request) -> Response:
    return json_response({})


async def telemetry(_: Request) -> Response:
    """Accepted and discarded: batches may carry request headers, API key included."""
    return json_response({"status": "accepted"})


async def healthz(_: Request) -> Response:
    return json_response({"status": "ok"})


async def server_capabilities(request: Request) -> Response:
    service = Service.of(request)
    models = [
        SupportedModel(model_name=name, max_context_length=engine.max_context_length, trainable=True, sampleable=True)
        for name, engine in service.engines.items()
    ]
    return json_response(GetServerCapabilitiesResponse(supported_models=models))


async def create_session(request: Request) -> Response:
    body = await read_json(request, CreateSessionRequest)
    record = Service.of(request).sessions.create(body)
    return json_response(CreateSessionResponse(session_id=record.session_id))


async def session_heartbeat(request: Request) -> Response:
    body = await read_json(request, SessionHeartbeatRequest)
    Service.of(request).sessions.heartbeat(body.session_id)
    return json_response(SessionHeartbeatResponse())


async def finish_session(request: Request) -> Response:
    body = await read_json(request, SessionFinishRequest)
    reason = body.reason.type if body.reason is not None else "success"
    Service.of(request).end_session(request.path_params["session_id"], reason)
    return json_response({})


routes = [
    Route("/api/v1/client/config", client_config, methods=["POST"]),
    Route("/api/v1/client/dynamic_config", dynamic_config, methods=["POST"]),
    Route("/api/v1/telemetry", telemetry, methods=["POST"]),
    Route("/api/v1/healthz", healthz, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/api/v1/get_server_capabilities", server_capabilities, methods=["GET"]),
    Route("/api/v1/create_session", create_session, methods=["POST"]),
    Route("/api/v1/session_heartbeat", session_heartbeat, methods=["POST"]),
    Route("/api/v1/sessions/{session_id}/finish", finish_session, methods=["POST"]),
]
