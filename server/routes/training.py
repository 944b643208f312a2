"""Training endpoints: model creation, forward/backward, optimizer steps, saves and loads.

Every mutating call answers at once with a request id whose result comes through
`retrieve_future`. Validation happens before answering, so bad input is a synchronous 400;
the engine work runs later on the model's worker, in `seq_id` order.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import checkpoint_files, step_metrics
from server.engine_api import EngineAPI
from server.errors import NotFound
from server.http import json_response, read_json
from server.paths import CheckpointKind, CheckpointRef, parse_tinker_path, validate_name
from server.routes.sequenced import (
    Start,
    consume,
    create_model_with,
    read_training_body,
    submit_sequenced,
)
from server.runtime import LiveModel, LiveSampler
from server.service import Service, then
from server.sessions import sampler_id_for, utc_now
from server.store import CheckpointRecord, SamplerRecord
from server.usage import training_tokens
from server.wire.proto_codec import (
    BadForwardBackwardRequest,
    decode_forward_backward_request,
    encode_forward_backward_output,
)
from server.wire.types import (
    CreateModelRequest,
    CreateModelResponse,
    GetInfoRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    LoadWeightsResponse,
    ModelData,
    OptimizerConfigBody,
    OptimStepRequest,
    OptimStepResponse,
    SaveWeightsExternalRequest,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerRequest,
    SaveWeightsForSamplerResponse,
    SaveWeightsRequest,
    SaveWeightsResponse,
)
from server.worker import ForwardBackwardItem
from tuft_jax.errors import InputError
from tuft_jax.types import AdamParams, ForwardResult, LoraConfig

DEFAULT_LORA_RANK = 32
"""Rank of an adapter created without a lora_config, capped at the model's maximum."""


def _save(
    service: Service,
    model: LiveModel,
    ref: CheckpointRef,
    *,
    overwrite: bool,
    ttl_seconds: int | None,
    user_metadata: dict[str, str] | None,
    respond: Callable[[CheckpointRecord], msgspec.Struct],
) -> Start:
    """Queue an atomic save of the model's adapter as `ref`; an existing checkpoint of that
    name is a 400 unless `overwrite` (an expired one is simply replaced)."""
    expires_at = _expiry(ttl_seconds)
    existing = service.store.get_checkpoint(ref)
    stale = existing is not None and existing.expired(utc_now())
    if existing is not None and not stale and not overwrite:
        raise InputError(f"checkpoint {ref.tinker_path} already exists; save with overwrite=True to replace it")
    directory = ref.directory(service.checkpoint_dir)
    owner = service.session_owner(model.session_id) or ""

    def run(engine: EngineAPI) -> tuple[int, LoraConfig]:
        slot = model.require_slot()
        size = checkpoint_files.save(engine, slot, directory, ref.kind, replace=overwrite or stale)
        return size, engine.adapter_config(slot)

    def finish(saved: tuple[int, LoraConfig]) -> msgspec.Struct:
        size, lora = saved
        record = CheckpointRecord(
            ref, owner, utc_now(), size, user_metadata, expires_at, base_model=model.base_model, lora=lora
        )
        service.store.put_checkpoint(record)
        return respond(record)

    return lambda: then(service.workers[model.base_model].call(run), finish)


def _checkpoint_ref(model: LiveModel, kind: CheckpointKind, name: str | None) -> CheckpointRef:
    return CheckpointRef(model.model_id, kind, validate_name(name or f"ckpt-{uuid.uuid4().hex[:12]}"))


def _expiry(ttl_seconds: int | None) -> datetime | None:
    """When a checkpoint saved now expires; the wire type bounds the TTL (server.wire.types)."""
    return None if ttl_seconds is None else utc_now() + timedelta(seconds=ttl_seconds)


def _check_optimizer(config: OptimizerConfigBody | None) -> None:
    if config is not None and config.type != "adamw":
        raise InputError(f"optimizer {config.type!r} is not supported; this server trains with adamw")


def _lora_config(body: CreateModelRequest, engine: EngineAPI) -> LoraConfig:
    """The requested adapter, refused here if the engine cannot hold it (the wire type
    already bounds rank >= 1 and the seed)."""
    lora = body.lora_config
    if lora is None:
        return LoraConfig(rank=min(DEFAULT_LORA_RANK, engine.max_lora_rank))
    if lora.rank > engine.max_lora_rank:
        raise InputError(
            f"lora_config.rank {lora.rank} exceeds {engine.name}'s maximum LoRA rank {engine.max_lora_rank}"
        )
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise InputError("at least one of train_attn, train_mlp and train_unembed must be true")
    return LoraConfig(
        rank=lora.rank,
        seed=lora.seed,
        train_attn=lora.train_attn,
        train_mlp=lora.train_mlp,
        train_unembed=lora.train_unembed,
    )


def _adam_params(body: OptimStepRequest) -> AdamParams:
    if body.adam_params is None:
        kind = (body.optimizer_params or {}).get("type")
        raise InputError(f"optimizer {kind!r} is not supported; send adam_params (AdamW)")
    values: dict[str, float] = msgspec.structs.asdict(body.adam_params)
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise InputError(f"adam_params {', '.join(bad)} must be finite")
    p = AdamParams(**values)
    if p.learning_rate < 0 or p.weight_decay < 0 or p.grad_clip_norm < 0:
        raise InputError("learning_rate, weight_decay and grad_clip_norm must be >= 0")
    if not (0 <= p.beta1 < 1 and 0 <= p.beta2 < 1):
        raise InputError(f"beta1 and beta2 must be in [0, 1), got {p.beta1} and {p.beta2}")
    if p.eps <= 0:
        raise InputError(f"eps must be positive, got {p.eps}")
    return p


def _encode_forward(result: ForwardResult) -> bytes:
    return encode_forward_backward_output(result.outputs, result.metrics)


# ---- endpoints ------------------------------------------------------------------------------


async def create_model(request: Request) -> Response:
    body = await read_json(request, CreateModelRequest)
    service = Service.of(request)
    engine = service.engine(body.base_model)
    lora = _lora_config(body, engine)
    _check_optimizer(body.optimizer_config)

    def run(e: EngineAPI, model: LiveModel) -> LoraConfig:
        model.slot = e.create_adapter(lora)
        return lora

    return create_model_with(
        service,
        body.session_id,
        body.model_seq_id,
        engine,
        run,
        lambda model_id: CreateModelResponse(model_id=model_id),
        body.user_metadata,
        kind="create_model",
    )


async def get_info(request: Request) -> Response:
    body = await read_json(request, GetInfoRequest)
    service = Service.of(request)
    model = service.model(body.model_id)
    run = service.store.get_training_run(model.model_id)
    if run is None:
        raise NotFound(f"model {model.model_id!r} is still being created")
    engine = service.engines[model.base_model]
    return json_response(
        GetInfoResponse(
            model_id=model.model_id,
            model_data=ModelData(model_name=run.base_model, tokenizer_id=engine.tokenizer_path),
            model_name=run.base_model,
            is_lora=True,
            lora_rank=run.lora.rank,
        )
    )


async def load_weights(request: Request) -> Response:
    service = Service.of(request)
    body = await read_training_body(service, request, LoadWeightsRequest)
    if body.session_id is not None and body.model_seq_id is not None:
        return _create_via_load(service, body)
    if body.model_id is None:
        raise InputError("load_weights needs session_id + model_seq_id (new model) or model_id + seq_id")
    model_id = body.model_id

    async def prepare(model: LiveModel) -> Start:
        directory = _loadable(service, body, model.base_model)

        def run(e: EngineAPI) -> LoraConfig:
            previous = model.slot
            model.slot = e.load_adapter(directory, with_optimizer=body.optimizer)
            if previous is not None:
                e.release_adapter(previous)
            return e.adapter_config(model.slot)

        def finish(lora: LoraConfig) -> msgspec.Struct:
            record = service.store.get_training_run(model_id)
            if record is not None:
                service.store.put_training_run(replace(record, lora=lora))
            return LoadWeightsResponse(path=body.path, model_id=model_id)

        return lambda: then(service.workers[model.base_model].call(run), finish)

    return await submit_sequenced(service, model_id, body.seq_id, prepare, kind="load_weights")


def _loadable(service: Service, body: LoadWeightsRequest, base_model: str | None) -> Path:
    """The directory of the checkpoint `body.path`, once the caller may read it and its
    recorded geometry fits `base_model` (default: the one it was trained on) on this server."""
    ref = parse_tinker_path(body.path)
    directory = service.checkpoint_directory(ref, "load_weights")
    service.engine_for_checkpoint(ref, base_model)
    if body.optimizer and ref.kind != "weights":
        raise InputError(
            f"{body.path} is a sampler checkpoint, which has no optimizer state; load a save_state "
            "checkpoint (tinker://.../weights/...) or load without the optimizer"
        )
    return directory


def _create_via_load(service: Service, body: LoadWeightsRequest) -> Response:
    assert body.session_id is not None and body.model_seq_id is not None
    service.sessions.require_active(body.session_id)
    directory = _loadable(service, body, body.base_model)
    engine = service.engine_for_checkpoint(parse_tinker_path(body.path), body.base_model)
    if not body.optimizer:
        _check_optimizer(body.optimizer_config)

    def run(e: EngineAPI, model: LiveModel) -> LoraConfig:
        model.slot = e.load_adapter(directory, with_optimizer=body.optimizer)
        return e.adapter_config(model.slot)

    return create_model_with(
        service,
        body.session_id,
        body.model_seq_id,
        engine,
        run,
        lambda model_id: LoadWeightsResponse(path=body.path, model_id=model_id),
        body.user_metadata,
        kind="load_weights",
    )


async def forward_backward(request: Request) -> Response:
    service = Service.of(request)
    body, encoding = await request.body(), request.headers.get("content-encoding")
    limit = service.options.max_forward_backward_bytes
    try:
        call = await run_in_threadpool(decode_forward_backward_request, body, encoding, max_decompressed_bytes=limit)
    except BadForwardBackwardRequest as exc:
        consume(service, exc.model_id, exc.seq_id)
        raise

    async def prepare(model: LiveModel) -> Start:
        engine = service.engines[model.base_model]
        owner, tokens = service.session_owner(model.session_id), training_tokens(call.data)
        service.quotas.check_tokens(owner, tokens)
        config = await run_in_threadpool(engine.check_forward_backward, call.data, call.loss_fn, call.loss_fn_config)
        item = ForwardBackwardItem(
            model_id=model.model_id,
            slot=model.require_slot,
            data=call.data,
            loss_fn=call.loss_fn,
            loss_config=config,
            forward_only=call.forward_only,
            finish=_encode_forward,
        )
        recorded = step_metrics.forward_backward(service, model, item)

        def metered(reply: bytes) -> bytes:
            service.usage.record(owner, model.session_id, model.base_model, "training", tokens)
            return reply

        return lambda: then(recorded(), metered)

    kind = "forward" if call.forward_only else "forward_backward"
    return await submit_sequenced(service, call.model_id, call.seq_id, prepare, kind=kind)


async def optim_step(request: Request) -> Response:
    service = Service.of(request)
    body = await read_training_body(service, request, OptimStepRequest)

    async def prepare(model: LiveModel) -> Start:
        params = _adam_params(body)

        def run(e: EngineAPI) -> OptimStepResponse:
            return OptimStepResponse(metrics=e.optim_step(model.require_slot(), params))

        return step_metrics.optim_step(service, model, params, run)

    return await submit_sequenced(service, body.model_id, body.seq_id, prepare, kind="optim_step")


async def save_weights(request: Request) -> Response:
    service = Service.of(request)
    body = await read_training_body(service, request, SaveWeightsRequest)

    async def prepare(model: LiveModel) -> Start:
        return _save(
            service,
            model,
            _checkpoint_ref(model, "weights", body.path),
            overwrite=body.overwrite,
            ttl_seconds=body.ttl_seconds,
            user_metadata=body.user_metadata,
            respond=lambda record: SaveWeightsResponse(path=record.ref.tinker_path),
        )

    return await submit_sequenced(service, body.model_id, body.seq_id, prepare, kind="save_weights")


async def save_weights_for_sampler(request: Request) -> Response:
    """Named: a `sampler_weights` checkpoint on disk. Without a name: a new sampler on a
    frozen copy of the current weights (`save_weights_and_get_sampling_client`)."""
    service = Service.of(request)
    body = await read_training_body(service, request, SaveWeightsForSamplerRequest)

    async def prepare(model: LiveModel) -> Start:
        if body.path is not None:
            return _save(
                service,
                model,
                _checkpoint_ref(model, "sampler_weights", body.path),
                overwrite=False,
                ttl_seconds=body.ttl_seconds,
                user_metadata=body.user_metadata,
                respond=lambda record: SaveWeightsForSamplerResponse(path=record.ref.tinker_path),
            )
        if body.sampling_session_seq_id is None:
            raise InputError("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
        return _snapshot(service, model, sampler_id_for(model.session_id, body.sampling_session_seq_id))

    return await submit_sequenced(service, body.model_id, body.seq_id, prepare, kind="save_weights_for_sampler")


def _snapshot(service: Service, model: LiveModel, sampler_id: str) -> Start:
    if sampler_id in service.samplers or service.store.get_sampler(sampler_id) is not None:
        raise InputError(f"sampling session {sampler_id!r} already exists")
    sampler = LiveSampler(sampler_id, model.session_id, model.base_model)
    service.samplers[sampler_id] = sampler

    def run(e: EngineAPI) -> None:
        sampler.slot = e.snapshot_adapter(model.require_slot())

    def finish(_: None) -> msgspec.Struct:
        service.store.put_sampler(SamplerRecord(sampler_id, model.session_id, model.base_model, utc_now()))
        return SaveWeightsForSamplerResponse(sampling_session_id=sampler_id)

    def failed(_: BaseException) -> None:
        service.samplers.pop(sampler_id, None)

    return lambda: then(service.workers[model.base_model].call(run), finish, failed)


async def save_weights_external(request: Request) -> Response:
    """An `external_weights` checkpoint: the adapter as a standard PEFT directory, downloaded
    file by file through signed URLs (`tinker checkpoint download`, server.routes.downloads)."""
    service = Service.of(request)
    body = await read_training_body(service, request, SaveWeightsExternalRequest)

    async def prepare(model: LiveModel) -> Start:
        if body.age_encryption_recipients is not None:
            raise InputError(
                "age_encryption_recipients is not supported by this server (it has no age encryption); "
                "omit it to export the weights unencrypted"
            )
        return _save(
            service,
            model,
            _checkpoint_ref(model, "external_weights", body.path),
            overwrite=False,
            ttl_seconds=body.ttl_seconds,
            user_metadata=None,
            respond=lambda record: SaveWeightsExternalResponse(
                path=record.ref.tinker_path, size_bytes=record.size_bytes
            ),
        )

    return await submit_sequenced(service, body.model_id, body.seq_id, prepare, kind="save_weights_external")


routes = [
    Route("/api/v1/create_model", create_model, methods=["POST"]),
    Route("/api/v1/get_info", get_info, methods=["POST"]),
    Route("/api/v1/load_weights", load_weights, methods=["POST"]),
    Route("/api/v1/forward_backward", forward_backward, methods=["POST"]),
    Route("/api/v1/optim_step", optim_step, methods=["POST"]),
    Route("/api/v1/save_weights", save_weights, methods=["POST"]),
    Route("/api/v1/save_weights_for_sampler", save_weights_for_sampler, methods=["POST"]),
    Route("/api/v1/save_weights_external", save_weights_external, methods=["POST"]),
]
