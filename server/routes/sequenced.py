"""How training requests are accepted: retries, validation, `seq_id` order, consumed seq_ids.

The SDK numbers a model's requests 1, 2, 3, ..., retries with the same number, and moves on
after a rejection, so every path here ends in exactly one of: the original request id, a
new request queued in order, or a rejection that consumes the seq_id (except 429 for capacity
or a quota, which the SDK retries with the same seq_id). A body too broken to name its seq_id
cannot consume it; the sequencer skips such a gap after `ServerOptions.seq_gap_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server.engine_api import EngineAPI
from server.errors import NotFound
from server.http import decode_json, json_response
from server.quotas import QuotaExceeded
from server.runtime import LiveModel
from server.service import Service, then
from server.session_trace import TracedRequest
from server.sessions import model_id_for, utc_now
from server.store import TrainingRunRecord
from server.wire.types import UntypedAPIFuture
from tuft_jax.errors import CapacityError
from tuft_jax.types import LoraConfig

T = TypeVar("T")
Start = Callable[[], asyncio.Future[Any]]
"""Queues a validated request's engine work; the future yields its reply."""


class _TrainingIds(msgspec.Struct):
    model_id: str | None = None
    seq_id: int | None = None


async def read_training_body(service: Service, request: Request, body_type: type[T]) -> T:
    """Decode a sequenced JSON request; if it is invalid, still consume its seq_id if it has one."""
    raw = await request.body()
    try:
        return decode_json(raw, body_type)
    except msgspec.ValidationError:
        with contextlib.suppress(msgspec.DecodeError):
            ids = decode_json(raw, _TrainingIds, limit_depth=False)
            consume(service, ids.model_id, ids.seq_id)
        raise


def consume(service: Service, model_id: str | None, seq_id: int | None) -> None:
    if model_id is None or seq_id is None:
        return
    with contextlib.suppress(NotFound):
        service.model(model_id)  # only the caller's own models
        service.sequencer.consume(model_id, seq_id)


async def submit_sequenced(
    service: Service,
    model_id: str,
    seq_id: int | None,
    prepare: Callable[[LiveModel], Awaitable[Start]],
    *,
    kind: str,
) -> Response:
    """Validate with `prepare`, then queue the work behind every lower seq_id of the model;
    `kind` names the request in the session's trace.

    A retry gets the original request id. A rejected seq_id is consumed, except on 429,
    after which the SDK retries the same seq_id.
    """
    model = service.model(model_id)
    if seq_id is not None and (retry := _reply_to_retry(service, model_id, seq_id)) is not None:
        return retry
    try:
        start = await prepare(model)
    except (CapacityError, QuotaExceeded):
        raise
    except Exception:
        if seq_id is not None:
            service.sequencer.consume(model_id, seq_id)
        raise
    # Validation may have awaited: a concurrent retry of this request can have been accepted.
    if seq_id is not None and (retry := _reply_to_retry(service, model_id, seq_id)) is not None:
        return retry
    service.store.touch_training_run(model_id, utc_now())
    request_id = service.futures.create(traced=TracedRequest(model.session_id, model_id, kind))

    def dispatch() -> None:
        service.futures.settle_from(request_id, start())

    if seq_id is None:
        dispatch()
    else:
        service.sequencer.submit(model_id, seq_id, request_id, dispatch)
    return json_response(UntypedAPIFuture(request_id=request_id, model_id=model_id))


def _reply_to_retry(service: Service, model_id: str, seq_id: int) -> Response | None:
    """The original reply if (model_id, seq_id) was accepted; raises if the seq_id is used up."""
    original = service.sequencer.accepted(model_id, seq_id)
    if original is not None:
        return json_response(UntypedAPIFuture(request_id=original, model_id=model_id))
    service.sequencer.check_fresh(model_id, seq_id)
    return None


def create_model_with(
    service: Service,
    session_id: str,
    model_seq_id: int,
    engine: EngineAPI,
    run: Callable[[EngineAPI, LiveModel], LoraConfig],
    respond: Callable[[str], msgspec.Struct],
    user_metadata: dict[str, Any] | None,
    *,
    kind: str,
) -> Response:
    """Create training model `{session_id}:train:{model_seq_id}` (its seq_id 0) with `run`;
    `kind` names the request in the session's trace."""
    owner = service.sessions.require_active(session_id).owner
    model_id = model_id_for(session_id, model_seq_id)
    existing = service.models.get(model_id)
    if existing is not None:
        return json_response(UntypedAPIFuture(request_id=existing.create_request_id, model_id=model_id))
    service.quotas.check_runs(owner, service.running_runs(owner))
    request_id = service.futures.create(traced=TracedRequest(session_id, model_id, kind))
    model = LiveModel(model_id, session_id, engine.name, create_request_id=request_id)
    service.add_model(model)

    def finish(lora: LoraConfig) -> msgspec.Struct:
        now = utc_now()
        service.store.put_training_run(
            TrainingRunRecord(model_id, session_id, owner, engine.name, lora, now, now, user_metadata)
        )
        return respond(model_id)

    def failed(_: BaseException) -> None:
        service.forget_model(model_id, f"creating model {model_id!r} failed")

    outcome = service.workers[engine.name].call(lambda e: run(e, model))
    service.futures.settle_from(request_id, then(outcome, finish, failed))
    return json_response(UntypedAPIFuture(request_id=request_id, model_id=model_id))
