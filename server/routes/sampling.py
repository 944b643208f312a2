"""Sampling endpoints: sampling sessions (base model or saved weights) and `asample`."""

from __future__ import annotations

import asyncio
import math

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.engine_api import EngineAPI
from server.http import json_response, read_json
from server.paths import parse_tinker_path
from server.runtime import BASE_MODEL_SLOT, LiveSampler
from server.service import Service
from server.session_trace import TracedRequest
from server.sessions import sampler_id_for, utc_now
from server.store import SamplerRecord
from server.wire.proto_codec import encode_sample_response
from server.wire.types import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    ModelInputBody,
    SampleRequest,
    SamplingParamsBody,
    UntypedAPIFuture,
)
from server.worker import SampleItem
from tuft_jax.errors import InputError
from tuft_jax.types import SampleResult, SamplingParams


async def create_sampling_session(request: Request) -> Response:
    """Idempotent per (session, sampling_session_seq_id): a retry returns the same sampler."""
    body = await read_json(request, CreateSamplingSessionRequest)
    service = Service.of(request)
    service.sessions.require_active(body.session_id)
    sampler_id = sampler_id_for(body.session_id, body.sampling_session_seq_id)
    sampler = service.samplers.get(sampler_id)
    if sampler is None:
        sampler = _open_sampler(service, body, sampler_id)
    if sampler.loading is not None:
        await asyncio.shield(sampler.loading)
    return json_response(CreateSamplingSessionResponse(sampling_session_id=sampler_id))


def _open_sampler(service: Service, body: CreateSamplingSessionRequest, sampler_id: str) -> LiveSampler:
    """Register a sampler on a base model (slot 0) or on weights loaded from `model_path`."""
    if body.model_path is None:
        if body.base_model is None:
            raise InputError("create_sampling_session needs base_model or model_path")
        engine = service.engine(body.base_model)
        sampler = LiveSampler(sampler_id, body.session_id, engine.name, slot=BASE_MODEL_SLOT)
        service.samplers[sampler_id] = sampler
        service.store.put_sampler(SamplerRecord(sampler_id, body.session_id, engine.name, utc_now()))
        return sampler
    ref = parse_tinker_path(body.model_path)
    directory = service.checkpoint_directory(ref, "sampling")
    engine = service.engine_for_checkpoint(ref, body.base_model)
    sampler = LiveSampler(sampler_id, body.session_id, engine.name)

    def load(e: EngineAPI) -> None:
        sampler.slot = e.load_adapter(directory, with_optimizer=False)

    def loaded(fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            service.samplers.pop(sampler_id, None)
            return
        sampler.loading = None
        record = SamplerRecord(sampler_id, body.session_id, engine.name, utc_now(), body.model_path)
        service.store.put_sampler(record)

    sampler.loading = service.workers[engine.name].call(load)
    sampler.loading.add_done_callback(loaded)
    service.samplers[sampler_id] = sampler
    return sampler


async def asample(request: Request) -> Response:
    body = await read_json(request, SampleRequest)
    service = Service.of(request)
    if body.sampling_session_id is None:
        raise InputError("asample needs a sampling_session_id (create one with create_sampling_session)")
    sampler = service.sampler(body.sampling_session_id)
    if body.seq_id is not None and (previous := sampler.recent.get(body.seq_id)) is not None:
        return json_response(previous)
    engine = service.engines[sampler.base_model]
    prompt = prompt_tokens(body.prompt)
    params = sampling_params(body.sampling_params, engine.eos_token_id)
    last_n = _check_sample_options(body, prompt.size)
    engine.check_sample(
        prompt,
        body.num_samples,
        params,
        topk_prompt_logprobs=body.topk_prompt_logprobs,
        topk_sample_logprobs=body.topk_sample_logprobs,
    )
    owner = service.session_owner(sampler.session_id)
    service.quotas.check_tokens(owner, prompt.size)
    item = SampleItem(
        slot=sampler.require_slot(),
        prompt=prompt,
        num_samples=body.num_samples,
        params=params,
        prompt_logprobs=bool(body.prompt_logprobs),
        topk_prompt_logprobs=body.topk_prompt_logprobs,
        finish=service.usage.metered_sample(
            owner,
            sampler.session_id,
            sampler.base_model,
            prompt.size,
            lambda result: encode_sample_response(_keep_last_prompt_positions(result, last_n)),
        ),
        topk_sample_logprobs=body.topk_sample_logprobs,
    )
    outcome = service.workers[sampler.base_model].sample(item)  # 429 (CapacityError) when the queue is full
    request_id = service.futures.create(traced=TracedRequest(sampler.session_id, sampler.sampler_id, "sample"))
    service.futures.settle_from(request_id, outcome)
    tag = request_id if body.seq_id is None else body.seq_id
    reply = UntypedAPIFuture(
        request_id=request_id,
        sample_sequence_ids=[f"{sampler.sampler_id}:{tag}:{i}" for i in range(body.num_samples)],
    )
    if body.seq_id is not None:
        sampler.remember(body.seq_id, reply, service.options.max_remembered_samples)
    return json_response(reply)


def prompt_tokens(prompt: ModelInputBody) -> np.ndarray:
    """The prompt's token ids; this text-only server accepts `encoded_text` chunks only."""
    tokens: list[int] = []
    for i, chunk in enumerate(prompt.chunks):
        if chunk.type != "encoded_text" or chunk.tokens is None:
            raise InputError(f"prompt chunk {i} is of type {chunk.type!r}; only encoded_text chunks are supported")
        tokens.extend(chunk.tokens)
    if not tokens:
        raise InputError("prompt has no tokens")
    if min(tokens) < 0 or max(tokens) > np.iinfo(np.int32).max:
        raise InputError("prompt token ids must be non-negative 32-bit integers")
    return np.asarray(tokens, dtype=np.int32)


def sampling_params(body: SamplingParamsBody, eos_token_id: int) -> SamplingParams:
    """Map the SDK's `stop`: omitted means stop at EOS; `[]` means never stop early; otherwise
    the listed token ids (ints) or strings stop generation, and so does EOS."""
    if body.max_tokens is None:
        raise InputError("sampling_params.max_tokens is required")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    token_ids: tuple[int, ...] = () if stop == [] else (eos_token_id,)
    strings: tuple[str, ...] = ()
    if stop:
        if all(isinstance(s, int) for s in stop):
            token_ids = tuple(dict.fromkeys([*token_ids, *stop]))  # type: ignore[list-item]
        elif all(isinstance(s, str) for s in stop):
            strings = tuple(stop)  # type: ignore[arg-type]
        else:
            raise InputError("sampling_params.stop must be all strings or all token ids, not a mix")
    for name, value in (("temperature", body.temperature), ("top_p", body.top_p)):
        if not math.isfinite(value):
            raise InputError(f"sampling_params.{name} must be finite")
    return SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=body.seed,
        stop_token_ids=token_ids,
        stop_strings=strings,
    )


def _check_sample_options(body: SampleRequest, prompt_length: int) -> int | None:
    """Refuse what the engine cannot do; returns `prompt_logprobs_last_n` once validated."""
    if body.prompt_alt_tokens_k:
        raise InputError("prompt_alt_tokens_k is not supported by this server")
    if body.target_prompt_logprobs is not None:
        raise InputError("target_prompt_logprobs is not supported by this server")
    for name, k in (("topk_prompt_logprobs", body.topk_prompt_logprobs), ("topk_sample_logprobs", body.topk_sample_logprobs)):
        if k < 0:
            raise InputError(f"{name} must be >= 0, got {k}")
    last_n = body.prompt_logprobs_last_n
    if last_n is not None:
        if not body.prompt_logprobs:
            raise InputError("prompt_logprobs_last_n requires prompt_logprobs")
        if not 1 <= last_n <= prompt_length - 1:
            raise InputError(f"prompt_logprobs_last_n must be between 1 and {prompt_length - 1}, got {last_n}")
    return last_n


def _keep_last_prompt_positions(result: SampleResult, last_n: int | None) -> SampleResult:
    """Blank (NaN / no top-k) every prompt position before the last `last_n`, as the SDK checks."""
    if last_n is None:
        return result
    if result.prompt_logprobs is not None:
        cut = len(result.prompt_logprobs) - last_n
        result.prompt_logprobs = [math.nan] * cut + result.prompt_logprobs[cut:]
    if result.topk_prompt_logprobs is not None:
        cut = len(result.topk_prompt_logprobs) - last_n
        result.topk_prompt_logprobs = [[] for _ in range(cut)] + result.topk_prompt_logprobs[cut:]
    return result


routes = [
    Route("/api/v1/create_sampling_session", create_sampling_session, methods=["POST"]),
    Route("/api/v1/asample", asample, methods=["POST"]),
]
