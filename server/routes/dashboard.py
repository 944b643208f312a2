"""The dashboard (`/dashboard`): its static page, and the JSON it reads with the caller's key.

The page (server.dashboard) is public; every `/dashboard/api/...` route needs a key and shows
only the caller's training runs, their curves and checkpoints, like the REST routes (another
tenant's run is a 404). The playground samples through the same path as the OpenAI-compatible
completions (server.compat), so a checkpoint is readable exactly when that route would load it.
Checkpoint downloads use the existing signed archive links (server.routes.downloads).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import dashboard, step_metrics
from server.auth import visible_to_caller
from server.compat.generate import generate, params_for
from server.compat.models import resolve_model
from server.compat.text import encode, tokenizer_for
from server.errors import NotFound
from server.http import json_response, read_json
from server.service import Service
from server.sessions import utc_now
from server.store import CheckpointRecord, TrainingRunRecord
from tuft_jax.errors import InputError

MAX_RUNS = 200
"""The dashboard lists the caller's most recent runs, up to this many."""
MAX_PLAYGROUND_TOKENS = 1024


class PlaygroundRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    """A base model, a checkpoint path, or `{base model};{checkpoint path}` (as in server.compat.models)."""
    prompt: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_PLAYGROUND_TOKENS)] = 32
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    stop: list[str] = []


def _status(service: Service, run: TrainingRunRecord) -> str:
    """`training` while the run's model is loaded, else why its session ended (`released` if it
    is still open)."""
    if run.model_id in service.models:
        return "training"
    session = service.store.get_session(run.session_id)
    return (session.finished if session is not None else None) or "released"


def _run(service: Service, run: TrainingRunRecord, step: int) -> dict[str, Any]:
    return {
        "model_id": run.model_id,
        "base_model": run.base_model,
        "lora": run.lora,
        "step": step,
        "session_id": run.session_id,
        "status": _status(service, run),
        "created_at": run.created_at,
        "last_request_time": run.last_request_time,
    }


def _checkpoint(record: CheckpointRecord) -> dict[str, Any]:
    ref = record.ref
    return {
        "tinker_path": ref.tinker_path,
        "kind": ref.kind,
        "name": ref.name,
        "created_at": record.created_at,
        "size_bytes": record.size_bytes,
        "expires_at": record.expires_at,
        "public": record.public,
        "archive": f"/api/v1/training_runs/{ref.model_id}/checkpoints/{ref.checkpoint_id}/archive",
    }


def _own_run(service: Service, run_id: str) -> TrainingRunRecord:
    record = service.store.get_training_run(run_id)
    if record is None or not visible_to_caller(record.owner):
        raise NotFound(f"unknown training run {run_id!r}")
    return record


async def list_runs(request: Request) -> Response:
    """The caller's most recent runs, newest first."""
    service = Service.of(request)
    owner = request.state.owner
    total = service.store.list_training_runs(owner=owner, limit=0).total
    runs = service.store.list_training_runs(owner=owner, limit=MAX_RUNS, offset=max(0, total - MAX_RUNS)).items
    steps = service.store.latest_steps([r.model_id for r in runs])
    return json_response({"runs": [_run(service, r, steps.get(r.model_id, 0)) for r in reversed(runs)], "total": total})


async def get_run(request: Request) -> Response:
    """One of the caller's runs with its metric curves and its live checkpoints."""
    service = Service.of(request)
    run = _own_run(service, request.path_params["run_id"])
    curves = step_metrics.curves(service.store.step_metrics(run.model_id))
    checkpoints = service.store.list_checkpoints(model_id=run.model_id, owner=run.owner, alive_at=utc_now()).items
    steps = curves["steps"]
    return json_response(
        {
            "run": _run(service, run, steps[-1] if steps else 0),
            "curves": curves,
            "checkpoints": [_checkpoint(c) for c in checkpoints],
        }
    )


async def list_models(request: Request) -> Response:
    """What the playground can sample: the base models and the caller's sampler checkpoints."""
    service = Service.of(request)
    checkpoints = service.store.list_checkpoints(owner=request.state.owner, alive_at=utc_now()).items
    samplers = [c.ref.tinker_path for c in checkpoints if c.ref.kind == "sampler_weights"]
    return json_response({"base_models": list(service.engines), "sampler_checkpoints": samplers})


async def sample(request: Request) -> Response:
    """One completion of a text prompt, with each sampled token's text and logprob."""
    body = await read_json(request, PlaygroundRequest)
    service = Service.of(request)
    choice = resolve_model(service, body.model)
    tokenizer = await tokenizer_for(choice.engine)
    prompt = encode(tokenizer, body.prompt)
    if prompt.size == 0:
        raise InputError("prompt is empty")
    params = params_for(
        choice, tokenizer, max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=None, seed=None, stop=body.stop or None,
    )  # fmt: skip
    [[completion]] = await generate(service, choice, tokenizer, [prompt], 1, params)
    tokens = [{"text": piece, "logprob": lp} for piece, lp in zip(completion.pieces, completion.logprobs, strict=True)]
    return json_response(
        {"text": completion.text, "tokens": tokens, "finish": completion.finish, "prompt_tokens": int(prompt.size)}
    )


async def health(request: Request) -> Response:
    """The `/metrics` figures as JSON."""
    return json_response(Service.of(request).metrics.snapshot())


routes = [
    *(Route(path, dashboard.endpoint(path), methods=["GET"]) for path in dashboard.ASSETS),
    Route("/dashboard/api/runs", list_runs, methods=["GET"]),
    Route("/dashboard/api/runs/{run_id}", get_run, methods=["GET"]),
    Route("/dashboard/api/models", list_models, methods=["GET"]),
    Route("/dashboard/api/sample", sample, methods=["POST"]),
    Route("/dashboard/api/health", health, methods=["GET"]),
]
