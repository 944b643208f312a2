"""`copy_weights`: a checkpoint the caller may read, copied into the caller's project or session.

The copy keeps the source's kind and name and belongs to a new training run of the caller,
which is never loaded as a model, so it cannot be trained on. Into a project
(`destination_project_id`, which the SDK fills from TINKER_PROJECT_ID), the run gets a new,
already finished session in that project; into a session (`session_id` + `model_seq_id`),
the run is `{session_id}:train:{model_seq_id}` and is in that session's project. The files
are hard links (server.checkpoint_files.link_copy). The copy's TTL is the request's; the
source's is not inherited.

The SDK sends one `X-Idempotency-Key` across all retries of a call: the first copy made with
a key is recorded, and a retry answers with its path instead of copying again. Nothing is
awaited between that check and the record, so concurrent retries cannot both copy.

This server issues no weights access tokens: a token grants nothing, and only the caller's
own and public checkpoints can be copied.
"""

from __future__ import annotations

from datetime import timedelta

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import checkpoint_files
from server.errors import NotFound
from server.http import json_response, read_json
from server.paths import CheckpointRef, parse_tinker_path
from server.service import Service
from server.sessions import model_id_for, utc_now
from server.store import CheckpointRecord, TrainingRunRecord
from server.wire.types import CopyWeightsRequest, CopyWeightsResponse, CreateSessionRequest
from tuft_jax.errors import InputError

MAX_IDEMPOTENCY_KEY = 200
_TOKEN_HEADER = "x-tinker-weights-access-token"


def _source(service: Service, request: Request, body: CopyWeightsRequest) -> CheckpointRecord:
    ref = parse_tinker_path(body.source_path)
    try:
        service.checkpoint_directory(ref, "copy")
        return service.readable_checkpoint(ref)
    except NotFound as exc:
        if body.weights_access_token is None and _TOKEN_HEADER not in request.headers:
            raise
        raise NotFound(
            f"{exc.detail}; this server issues no weights access tokens, so only your own and public "
            "checkpoints can be copied"
        ) from None


def _destination(service: Service, body: CopyWeightsRequest) -> tuple[str, str]:
    """(session_id, model_id) of the run the copy will belong to: run 0 of a new, finished
    session in the destination project, or the requested unused run of a caller's active session."""
    if body.session_id is None and body.model_seq_id is None:
        if body.destination_project_id is None:
            raise InputError(
                "copy_weights needs destination_project_id (or TINKER_PROJECT_ID), or session_id and model_seq_id"
            )
        request = CreateSessionRequest(tags=["copy_weights"], project_id=body.destination_project_id)
        session_id = service.sessions.create(request).session_id
        service.sessions.finish(session_id, "success")
        return session_id, model_id_for(session_id, 0)
    if body.session_id is None or body.model_seq_id is None:
        raise InputError("copy_weights into a session needs both session_id and model_seq_id")
    service.sessions.require_active(body.session_id)
    model_id = model_id_for(body.session_id, body.model_seq_id)
    if model_id in service.models or service.store.get_training_run(model_id) is not None:
        raise InputError(f"training run {model_id!r} already exists; copy into an unused model_seq_id")
    return body.session_id, model_id


async def copy_weights(request: Request) -> Response:
    body = await read_json(request, CopyWeightsRequest)
    service = Service.of(request)
    owner: str = request.state.owner
    key = request.headers.get("x-idempotency-key")
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
        raise InputError(f"X-Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY} characters")
    if key and (earlier := service.store.get_weight_copy(owner, key)) is not None:
        return json_response(CopyWeightsResponse(tinker_path=earlier))
    source = _source(service, request, body)
    lora = service.checkpoint_lora(source)
    session_id, model_id = _destination(service, body)
    now = utc_now()
    service.store.put_training_run(TrainingRunRecord(model_id, session_id, owner, source.base_model, lora, now, now))
    ref = CheckpointRef(model_id, source.ref.kind, source.ref.name)
    root = service.checkpoint_dir
    size = checkpoint_files.link_copy(source.ref.directory(root), ref.directory(root))
    expires_at = None if body.ttl_seconds is None else now + timedelta(seconds=body.ttl_seconds)
    record = CheckpointRecord(
        ref, owner, now, size, source.user_metadata, expires_at, base_model=source.base_model, lora=lora
    )
    service.store.put_checkpoint(record)
    if key:
        service.store.add_weight_copy(owner, key, ref.tinker_path, now)
    return json_response(CopyWeightsResponse(tinker_path=ref.tinker_path))


routes = [Route("/api/v1/copy_weights", copy_weights, methods=["POST"])]
