"""REST views of sessions, training runs, checkpoints and samplers (`RestClient`)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import checkpoint_files
from server.errors import NotFound
from server.http import json_response, read_json
from server.paths import CheckpointRef, parse_checkpoint_id, parse_tinker_path
from server.service import Service
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
    WeightsInfoRequest,
    WeightsInfoResponse,
)
from tuft_jax.errors import InputError

MAX_PAGE = 1000


def _paging(request: Request, default_limit: int) -> tuple[int, int]:
    """`limit` and `offset` query parameters, validated."""
    values = []
    for name, default in (("limit", default_limit), ("offset", 0)):
        raw = request.query_params.get(name, str(default))
        if not raw.isdigit():
            raise InputError(f"{name} must be a non-negative integer, got {raw!r}")
        values.append(int(raw))
    limit, offset = values
    return min(limit, MAX_PAGE), offset


def _string_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """The SDK's REST models type user_metadata as str -> str."""
    return None if metadata is None else {key: str(value) for key, value in metadata.items()}


def _checkpoint(record: CheckpointRecord) -> Checkpoint:
    return Checkpoint(
        checkpoint_id=record.ref.checkpoint_id,
        checkpoint_type=record.ref.checkpoint_type,
        time=record.created_at,
        tinker_path=record.ref.tinker_path,
        size_bytes=record.size_bytes,
        user_metadata=record.user_metadata,
        expires_at=record.expires_at,
    )


def _training_run(service: Service, record: TrainingRunRecord) -> TrainingRun:
    # Listings are in creation order, so the last checkpoint of each kind wins.
    latest = {c.ref.kind: _checkpoint(c) for c in service.store.list_checkpoints(model_id=record.model_id).items}
    return TrainingRun(
        training_run_id=record.model_id,
        base_model=record.base_model,
        model_owner=record.owner,
        is_lora=True,
        last_request_time=record.last_request_time,
        lora_rank=record.lora.rank,
        last_checkpoint=latest.get("weights"),
        last_sampler_checkpoint=latest.get("sampler_weights"),
        user_metadata=_string_metadata(record.user_metadata),
    )


def _run_record(service: Service, run_id: str) -> TrainingRunRecord:
    record = service.store.get_training_run(run_id)
    if record is None:
        raise NotFound(f"unknown training run {run_id!r}")
    return record


def _checkpoint_record(service: Service, ref: CheckpointRef) -> CheckpointRecord:
    record = service.store.get_checkpoint(ref)
    if record is None:
        raise NotFound(f"checkpoint {ref.tinker_path} does not exist")
    return record


async def get_session(request: Request) -> Response:
    service = Service.of(request)
    session = service.sessions.get(request.path_params["session_id"])
    return json_response(
        GetSessionResponse(
            training_run_ids=[r.model_id for r in service.store.session_training_runs(session.session_id)],
            sampler_ids=[s.sampler_id for s in service.store.session_samplers(session.session_id)],
            user_metadata=_string_metadata(session.user_metadata),
            display_name=session.display_name,
        )
    )


async def list_sessions(request: Request) -> Response:
    limit, offset = _paging(request, 20)
    page = Service.of(request).store.list_sessions(limit=limit, offset=offset)
    return json_response(ListSessionsResponse(sessions=[s.session_id for s in page.items]))


async def list_training_runs(request: Request) -> Response:
    service = Service.of(request)
    limit, offset = _paging(request, 20)
    page = service.store.list_training_runs(limit=limit, offset=offset)
    return json_response(
        TrainingRunsResponse(
            training_runs=[_training_run(service, r) for r in page.items],
            cursor=Cursor(offset=offset, limit=limit, total_count=page.total),
        )
    )


async def get_training_run(request: Request) -> Response:
    service = Service.of(request)
    return json_response(_training_run(service, _run_record(service, request.path_params["run_id"])))


async def list_run_checkpoints(request: Request) -> Response:
    service = Service.of(request)
    run = _run_record(service, request.path_params["run_id"])
    page = service.store.list_checkpoints(model_id=run.model_id)
    return json_response(CheckpointsListResponse(checkpoints=[_checkpoint(c) for c in page.items]))


async def list_checkpoints(request: Request) -> Response:
    limit, offset = _paging(request, 100)
    page = Service.of(request).store.list_checkpoints(limit=limit, offset=offset)
    return json_response(
        CheckpointsListResponse(
            checkpoints=[_checkpoint(c) for c in page.items],
            cursor=Cursor(offset=offset, limit=limit, total_count=page.total),
        )
    )


async def delete_checkpoint(request: Request) -> Response:
    service = Service.of(request)
    ref = parse_checkpoint_id(request.path_params["run_id"], request.path_params["checkpoint_id"])
    directory = ref.directory(service.checkpoint_dir)
    if service.store.get_checkpoint(ref) is None and not directory.is_dir():
        raise NotFound(f"checkpoint {ref.tinker_path} does not exist")
    if directory.is_dir():
        await run_in_threadpool(checkpoint_files.delete, directory)
    service.store.delete_checkpoint(ref)
    return json_response({})


async def weights_info(request: Request) -> Response:
    body = await read_json(request, WeightsInfoRequest)
    service = Service.of(request)
    ref = _checkpoint_record(service, parse_tinker_path(body.tinker_path)).ref
    run = _run_record(service, ref.model_id)
    return json_response(
        WeightsInfoResponse(
            base_model=run.base_model,
            is_lora=True,
            lora_rank=run.lora.rank,
            train_unembed=run.lora.train_unembed,
            train_mlp=run.lora.train_mlp,
            train_attn=run.lora.train_attn,
        )
    )


async def get_sampler(request: Request) -> Response:
    sampler_id = request.path_params["sampler_id"]
    record = Service.of(request).store.get_sampler(sampler_id)
    if record is None:
        raise NotFound(f"unknown sampler {sampler_id!r}")
    return json_response(
        GetSamplerResponse(sampler_id=record.sampler_id, base_model=record.base_model, model_path=record.model_path)
    )


routes = [
    Route("/api/v1/sessions", list_sessions, methods=["GET"]),
    Route("/api/v1/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/api/v1/training_runs", list_training_runs, methods=["GET"]),
    Route("/api/v1/training_runs/{run_id}", get_training_run, methods=["GET"]),
    Route("/api/v1/training_runs/{run_id}/checkpoints", list_run_checkpoints, methods=["GET"]),
    Route("/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", delete_checkpoint, methods=["DELETE"]),
    Route("/api/v1/checkpoints", list_checkpoints, methods=["GET"]),
    Route("/api/v1/weights_info", weights_info, methods=["POST"]),
    Route("/api/v1/samplers/{sampler_id}", get_sampler, methods=["GET"]),
]
