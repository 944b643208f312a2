"""REST views of sessions, training runs, checkpoints and samplers (`RestClient`), plus
checkpoint management (delete, publish/unpublish, TTL) and downloads (server.routes.downloads).

Everything is scoped to the caller (the owner behind its API key): another tenant's session,
run, sampler or private checkpoint answers 404 exactly like a missing one. Public checkpoints
(and the runs they belong to, with `access_scope=accessible`) are readable by every caller;
only the owner can delete, publish, unpublish or set the TTL. Publishing twice, unpublishing
a private checkpoint and clearing an absent TTL all succeed: these calls never answer 409,
which the SDK would retry for minutes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import checkpoint_files
from server.errors import NotFound
from server.http import json_response, read_json
from server.paths import CheckpointRef, parse_checkpoint_id, parse_tinker_path, validate_model_id
from server.routes import downloads
from server.service import Service
from server.sessions import utc_now
from server.store import CheckpointRecord, TrainingRunRecord
from server.wire.types import (
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    GetSamplerResponse,
    GetSessionResponse,
    ListSessionsResponse,
    TrainingRun,
    TrainingRunsResponse,
    TtlSeconds,
    WeightsInfoRequest,
    WeightsInfoResponse,
)
from tuft_jax.errors import InputError

MAX_PAGE = 1000


class SetTtlRequest(msgspec.Struct):
    ttl_seconds: TtlSeconds | None = None


def _caller(request: Request) -> str:
    return request.state.owner


def _paging(request: Request, default_limit: int) -> tuple[int, int]:
    """`limit` and `offset` query parameters, validated."""
    values = []
    for name, default in (("limit", default_limit), ("offset", 0)):
        raw = request.query_params.get(name, str(default))
        if not raw.isdigit() or len(raw) > 9:
            raise InputError(f"{name} must be a non-negative integer, got {raw[:20]!r}")
        values.append(int(raw))
    limit, offset = values
    return min(limit, MAX_PAGE), offset


def _access_scope(request: Request) -> str:
    scope = request.query_params.get("access_scope", "owned")
    if scope not in ("owned", "accessible"):
        raise InputError(f"access_scope must be 'owned' or 'accessible', got {scope[:40]!r}")
    return scope


def string_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """The SDK's REST models type user_metadata as str -> str."""
    return None if metadata is None else {key: str(value) for key, value in metadata.items()}


def _checkpoint(record: CheckpointRecord) -> Checkpoint:
    return Checkpoint(
        checkpoint_id=record.ref.checkpoint_id,
        checkpoint_type=record.ref.checkpoint_type,
        time=record.created_at,
        tinker_path=record.ref.tinker_path,
        size_bytes=record.size_bytes,
        public=record.public,
        user_metadata=record.user_metadata,
        expires_at=record.expires_at,
    )


def _visible_checkpoints(service: Service, run: TrainingRunRecord, caller: str) -> list[CheckpointRecord]:
    """A run's live checkpoints as `caller` sees them: all for the owner, else the public ones."""
    public = None if run.owner == caller else True
    return service.store.list_checkpoints(model_id=run.model_id, public=public, alive_at=utc_now()).items


def _training_run(service: Service, record: TrainingRunRecord, caller: str) -> TrainingRun:
    # Listings are in creation order, so the last checkpoint of each kind wins.
    latest = {c.ref.kind: _checkpoint(c) for c in _visible_checkpoints(service, record, caller)}
    return TrainingRun(
        training_run_id=record.model_id,
        base_model=record.base_model,
        model_owner=record.owner,
        is_lora=True,
        last_request_time=record.last_request_time,
        lora_rank=record.lora.rank,
        last_checkpoint=latest.get("weights"),
        last_sampler_checkpoint=latest.get("sampler_weights"),
        user_metadata=string_metadata(record.user_metadata),
    )


def _run_record(service: Service, run_id: str, caller: str, *, accessible: bool) -> TrainingRunRecord:
    """The caller's run, or with `accessible` also another's run that has a public checkpoint."""
    record = service.store.get_training_run(run_id)
    if record is not None and (
        record.owner == caller or (accessible and _visible_checkpoints(service, record, caller))
    ):
        return record
    raise NotFound(f"unknown training run {run_id!r}")


# ---- sessions and samplers --------------------------------------------------------------------


async def get_session(request: Request) -> Response:
    service = Service.of(request)
    session = service.sessions.get(request.path_params["session_id"])
    return json_response(
        GetSessionResponse(
            training_run_ids=[r.model_id for r in service.store.session_training_runs(session.session_id)],
            sampler_ids=[s.sampler_id for s in service.store.session_samplers(session.session_id)],
            user_metadata=string_metadata(session.user_metadata),
            display_name=session.display_name,
        )
    )


async def list_sessions(request: Request) -> Response:
    limit, offset = _paging(request, 20)
    page = Service.of(request).store.list_sessions(owner=_caller(request), limit=limit, offset=offset)
    return json_response(ListSessionsResponse(sessions=[s.session_id for s in page.items]))


async def get_sampler(request: Request) -> Response:
    sampler_id = request.path_params["sampler_id"]
    record = Service.of(request).store.get_sampler(sampler_id)
    if record is None or record.owner != _caller(request):
        raise NotFound(f"unknown sampler {sampler_id!r}")
    return json_response(
        GetSamplerResponse(sampler_id=record.sampler_id, base_model=record.base_model, model_path=record.model_path)
    )


# ---- training runs ----------------------------------------------------------------------------


async def list_training_runs(request: Request) -> Response:
    service = Service.of(request)
    limit, offset = _paging(request, 20)
    caller = _caller(request)
    accessible = _access_scope(request) == "accessible"
    page = service.store.list_training_runs(
        owner=caller,
        include_public=utc_now() if accessible else None,
        project_id=request.query_params.get("project_id"),
        limit=limit,
        offset=offset,
    )
    return json_response(
        TrainingRunsResponse(
            training_runs=[_training_run(service, r, caller) for r in page.items],
            cursor=Cursor(offset=offset, limit=limit, total_count=page.total),
        )
    )


async def get_training_run(request: Request) -> Response:
    service = Service.of(request)
    caller = _caller(request)
    accessible = _access_scope(request) == "accessible"
    record = _run_record(service, request.path_params["run_id"], caller, accessible=accessible)
    return json_response(_training_run(service, record, caller))


async def list_run_checkpoints(request: Request) -> Response:
    """All of the caller's run's checkpoints; for another's run, its public ones (404 if none)."""
    service = Service.of(request)
    caller = _caller(request)
    run = _run_record(service, request.path_params["run_id"], caller, accessible=True)
    checkpoints = _visible_checkpoints(service, run, caller)
    return json_response(CheckpointsListResponse(checkpoints=[_checkpoint(c) for c in checkpoints]))


# ---- checkpoints ------------------------------------------------------------------------------


async def list_checkpoints(request: Request) -> Response:
    """The caller's checkpoints across all runs, newest last, with a cursor."""
    limit, offset = _paging(request, 100)
    page = Service.of(request).store.list_checkpoints(
        owner=_caller(request), alive_at=utc_now(), limit=limit, offset=offset
    )
    return json_response(
        CheckpointsListResponse(
            checkpoints=[_checkpoint(c) for c in page.items],
            cursor=Cursor(offset=offset, limit=limit, total_count=page.total),
        )
    )


async def weights_info(request: Request) -> Response:
    body = await read_json(request, WeightsInfoRequest)
    service = Service.of(request)
    record = service.readable_checkpoint(parse_tinker_path(body.tinker_path))
    lora = service.checkpoint_lora(record)
    return json_response(
        WeightsInfoResponse(
            base_model=record.base_model,
            is_lora=True,
            lora_rank=lora.rank,
            train_unembed=lora.train_unembed,
            train_mlp=lora.train_mlp,
            train_attn=lora.train_attn,
        )
    )


async def checkpoint_resource(request: Request) -> Response:
    """`{kind}/{name}` (DELETE), `{kind}/{name}/{publish|ttl|archive|external_weights_urls}`
    and `{kind}/{name}/files/{file}` under a run.

    One route parses the rest of the path itself: a checkpoint id always has exactly two
    segments, so a checkpoint named `publish` or `ttl` is never mistaken for an action.
    """
    service = Service.of(request)
    run_id = validate_model_id(request.path_params["run_id"])
    parts = request.path_params["rest"].split("/")
    method = request.method
    if len(parts) == 2 and method == "DELETE":
        return await _delete(service, parse_checkpoint_id(run_id, "/".join(parts)))
    if len(parts) == 3:
        action = parts[2]
        ref = parse_checkpoint_id(run_id, "/".join(parts[:2]))
        if action == "publish" and method in ("POST", "DELETE"):
            service.owned_checkpoint(ref)
            service.store.set_checkpoint_public(ref, method == "POST")
            return json_response({})
        if action == "ttl" and method == "PUT":
            return await _set_ttl(request, service, ref)
        if action == "archive" and method == "GET":
            return downloads.archive(request, service, ref)
        if action == "external_weights_urls" and method == "GET":
            return downloads.external_weights_urls(request, service, ref)
    if len(parts) == 4 and parts[2] == downloads.FILES and method == "GET":
        ref = parse_checkpoint_id(run_id, "/".join(parts[:2]))
        return downloads.external_weights_file(request, service, ref, parts[3])
    raise NotFound(f"no such resource: {request.url.path}")


async def _delete(service: Service, ref: CheckpointRef) -> Response:
    service.owned_checkpoint(ref)
    await run_in_threadpool(checkpoint_files.delete, ref.directory(service.checkpoint_dir))
    service.store.delete_checkpoint(ref)
    return json_response({})


async def _set_ttl(request: Request, service: Service, ref: CheckpointRef) -> Response:
    body = await read_json(request, SetTtlRequest)
    service.owned_checkpoint(ref)
    ttl = body.ttl_seconds
    expires_at = None if ttl is None else utc_now() + timedelta(seconds=ttl)
    service.store.set_checkpoint_expiry(ref, expires_at)
    return json_response({"expires_at": None if expires_at is None else expires_at.isoformat()})


routes = [
    Route("/api/v1/sessions", list_sessions, methods=["GET"]),
    Route("/api/v1/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/api/v1/training_runs", list_training_runs, methods=["GET"]),
    Route("/api/v1/training_runs/{run_id}", get_training_run, methods=["GET"]),
    Route("/api/v1/training_runs/{run_id}/checkpoints", list_run_checkpoints, methods=["GET"]),
    Route(
        "/api/v1/training_runs/{run_id}/checkpoints/{rest:path}",
        checkpoint_resource,
        methods=["GET", "POST", "PUT", "DELETE"],
    ),
    Route("/api/v1/checkpoints", list_checkpoints, methods=["GET"]),
    Route("/api/v1/weights_info", weights_info, methods=["POST"]),
    Route("/api/v1/samplers/{sampler_id}", get_sampler, methods=["GET"]),
]
