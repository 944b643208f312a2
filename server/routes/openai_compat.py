"""OpenAI-compatible endpoints under `/oai/api/v1`: `/models`, `/completions` and
`/chat/completions`, streamed as server-sent events with `stream`, for the `openai` package
and evaluation harnesses. The API key comes as `Authorization: Bearer` (see server.auth).

Logprobs are those of the sampled tokens only (completions `logprobs=0`, chat `logprobs` without
`top_logprobs`): the engine returns no alternatives. A logprob's token is its piece of the text,
so a token that only starts a multi-byte character shows as "" and the one completing it
carries the whole character.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.compat.generate import generate, params_for
from server.compat.models import ModelChoice, resolve_model
from server.compat.responses import sse_event, sse_response, with_error_body
from server.compat.text import Completion, encode, joined_text, render_chat, tokenizer_for
from server.http import json_response, read_json
from server.routes.sampling import prompt_tokens
from server.service import Service
from server.sessions import utc_now
from server.wire.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Completion as CompletionBody,
    Model,
    ModelList,
    Sampling,
    TokenLogprob,
    Usage,
)
from server.wire.types import ChunkBody, ModelInputBody
from tuft_jax.errors import InputError
from tuft_jax.types import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PREFIX = "/oai/api/v1"
MAX_CHOICES = 128
"""Most choices (prompts x n) one request may ask for."""
DEFAULT_COMPLETION_TOKENS = 16
"""OpenAI's default `max_tokens` for completions (chat defaults to the rest of the context)."""

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def _error_body(status: int, detail: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": detail, "type": kind, "param": None, "code": None}}


openai_errors = with_error_body(_error_body)


@openai_errors
async def list_models(request: Request) -> Response:
    """The base models, then the caller's live sampler checkpoints (each usable as `model`)."""
    service = Service.of(request)
    owner = request.state.owner
    models = [Model(id=name, created=0, owned_by="tuft") for name in service.engines]
    checkpoints = service.store.list_checkpoints(owner=owner, alive_at=utc_now()).items
    models += [
        Model(id=c.ref.tinker_path, created=int(c.created_at.timestamp()), owned_by=owner)
        for c in checkpoints
        if c.ref.kind == "sampler_weights"
    ]
    return json_response(ModelList(data=models))


@openai_errors
async def completions(request: Request) -> Response:
    body = await read_json(request, CompletionRequest)
    _refuse_unsupported(body)
    if body.echo:
        raise InputError("echo is not supported by this server")
    if body.suffix is not None:
        raise InputError("suffix is not supported by this server")
    if body.logprobs is not None and body.logprobs != 0:
        raise InputError(
            "logprobs > 0 (top alternatives) is not supported by this server; "
            "logprobs=0 gives the sampled tokens' logprobs"
        )
    n = _num_choices(body)
    if body.best_of is not None and body.best_of != n:
        raise InputError("best_of is not supported by this server (only best_of = n)")
    service = Service.of(request)
    choice = resolve_model(service, body.model)
    tokenizer = await tokenizer_for(choice.engine)
    prompts = _completion_prompts(tokenizer, body.prompt)
    if len(prompts) * n > MAX_CHOICES:
        raise InputError(f"{len(prompts)} prompts x n={n} choices exceeds the limit of {MAX_CHOICES} per request")
    params = _params(choice, tokenizer, body, DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens)
    results = await generate(service, choice, tokenizer, prompts, n, params)
    completions = [c for per_prompt in results for c in per_prompt]
    usage = _usage(prompts, completions)
    reply_id, created, with_logprobs = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.logprobs is not None
    if body.stream:
        return sse_response(_completion_events(reply_id, created, body, completions, usage, with_logprobs))
    choices = [
        CompletionChoice(
            index=i,
            text=c.text,
            logprobs=_completion_logprobs(c.pieces, c.logprobs, 0) if with_logprobs else None,
            finish_reason=_finish_reason(c),
        )
        for i, c in enumerate(completions)
    ]
    return json_response(CompletionBody(id=reply_id, created=created, model=body.model, choices=choices, usage=usage))


@openai_errors
async def chat_completions(request: Request) -> Response:
    body = await read_json(request, ChatCompletionRequest)
    _refuse_unsupported(body)
    if body.top_logprobs:
        raise InputError(
            "top_logprobs is not supported by this server; logprobs=true gives the sampled tokens' logprobs"
        )
    if body.response_format is not None and body.response_format.type != "text":
        raise InputError(f"response_format {body.response_format.type!r} is not supported by this server")
    if not body.messages:
        raise InputError("messages must not be empty")
    n = _num_choices(body)
    service = Service.of(request)
    choice = resolve_model(service, body.model)
    tokenizer = await tokenizer_for(choice.engine)
    messages = [
        {"role": m.role, "content": joined_text(m.content, f"messages[{i}].content")}
        for i, m in enumerate(body.messages)
    ]
    prompt = render_chat(tokenizer, body.model, messages)
    max_tokens = next(
        (m for m in (body.max_completion_tokens, body.max_tokens) if m is not None),
        choice.engine.max_context_length - prompt.size,
    )
    params = _params(choice, tokenizer, body, max_tokens)
    [completions] = await generate(service, choice, tokenizer, [prompt], n, params)
    usage = _usage([prompt], completions)
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return sse_response(_chat_events(reply_id, created, body, completions, usage))
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(role="assistant", content=c.text),
            logprobs=_chat_logprobs(c.pieces, c.logprobs) if body.logprobs else None,
            finish_reason=_finish_reason(c),
        )
        for i, c in enumerate(completions)
    ]
    return json_response(ChatCompletion(id=reply_id, created=created, model=body.model, choices=choices, usage=usage))


def _refuse_unsupported(body: Sampling) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise InputError(f"{name} is not supported by this server (only 0)")
    if body.logit_bias:
        raise InputError("logit_bias is not supported by this server")


def _params(choice: ModelChoice, tokenizer: PreTrainedTokenizerBase, body: Sampling, max_tokens: int) -> SamplingParams:
    return params_for(
        choice, tokenizer, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k, seed=body.seed, stop=body.stop,
    )  # fmt: skip


def _num_choices(body: Sampling) -> int:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_CHOICES:
        raise InputError(f"n must be between 1 and {MAX_CHOICES}, got {n}")
    return n


def _completion_prompts(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[str | int | list[int]]
) -> list[np.ndarray]:
    """One token array per prompt, whichever of OpenAI's four prompt forms was sent."""
    if isinstance(prompt, str):
        return [encode(tokenizer, prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [encode(tokenizer, p) for p in prompt]  # type: ignore[arg-type]
    if all(isinstance(p, int) for p in prompt):
        return [_token_ids(prompt)]  # type: ignore[arg-type]
    if all(isinstance(p, list) for p in prompt):
        return [_token_ids(p) for p in prompt]  # type: ignore[arg-type]
    raise InputError("prompt must be a string, a list of strings, a list of token ids, or a list of token id lists")


def _token_ids(tokens: list[int]) -> np.ndarray:
    return prompt_tokens(ModelInputBody(chunks=[ChunkBody(type="encoded_text", tokens=tokens)]))


def _usage(prompts: list[np.ndarray], completions: list[Completion]) -> Usage:
    prompt = sum(p.size for p in prompts)
    sampled = sum(c.sampled_tokens for c in completions)
    return Usage(prompt_tokens=prompt, completion_tokens=sampled, total_tokens=prompt + sampled)


def _finish_reason(completion: Completion) -> Literal["stop", "length"]:
    return "length" if completion.finish == "length" else "stop"


def _completion_logprobs(pieces: list[str], logprobs: list[float], offset: int) -> CompletionLogprobs:
    """`offset`: where the first piece starts in the choice's text."""
    starts = np.cumsum([offset, *(len(p) for p in pieces[:-1])]).tolist() if pieces else []
    return CompletionLogprobs(tokens=pieces, token_logprobs=logprobs, text_offset=starts)


def _chat_logprobs(pieces: list[str], logprobs: list[float]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprob(token=p, logprob=lp, bytes=list(p.encode()), top_logprobs=[])
            for p, lp in zip(pieces, logprobs, strict=True)
        ]
    )


def _include_usage(body: Sampling) -> bool:
    return body.stream_options is not None and bool(body.stream_options.include_usage)


def _completion_events(
    reply_id: str,
    created: int,
    body: CompletionRequest,
    completions: list[Completion],
    usage: Usage,
    with_logprobs: bool,
) -> Iterator[bytes]:
    """A chunk per token (per token with text unless logprobs are asked for), then one with the
    finish reason, for each choice in turn; the usage chunk if asked for; `[DONE]`."""

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse_event(CompletionBody(id=reply_id, created=created, model=body.model, choices=choices, usage=usage))

    for index, completion in enumerate(completions):
        offset = 0
        for piece, logprob in zip(completion.pieces, completion.logprobs, strict=True):
            if piece or with_logprobs:
                logprobs = _completion_logprobs([piece], [logprob], offset) if with_logprobs else None
                yield chunk([CompletionChoice(index=index, text=piece, logprobs=logprobs, finish_reason=None)])
            offset += len(piece)
        finish = _finish_reason(completion)
        yield chunk([CompletionChoice(index=index, text="", logprobs=None, finish_reason=finish)])
    if _include_usage(body):
        yield chunk([], usage)
    yield sse_event("[DONE]")


def _chat_events(
    reply_id: str, created: int, body: ChatCompletionRequest, completions: list[Completion], usage: Usage
) -> Iterator[bytes]:
    """For each choice in turn: the role, a chunk per token (as in `_completion_events`), the
    finish reason; then the usage chunk if asked for, and `[DONE]`."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        reply = ChatCompletionChunk(id=reply_id, created=created, model=body.model, choices=choices, usage=usage)
        return sse_event(reply)

    for index, completion in enumerate(completions):
        opening = ChatDelta(role="assistant", content="")
        yield chunk([ChatChunkChoice(index=index, delta=opening, logprobs=None, finish_reason=None)])
        for piece, logprob in zip(completion.pieces, completion.logprobs, strict=True):
            if piece or body.logprobs:
                logprobs = _chat_logprobs([piece], [logprob]) if body.logprobs else None
                delta = ChatDelta(content=piece)
                yield chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=None)])
        finish = _finish_reason(completion)
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), logprobs=None, finish_reason=finish)])
    if _include_usage(body):
        yield chunk([], usage)
    yield sse_event("[DONE]")


PROMPT_PATHS = (f"{PREFIX}/completions", f"{PREFIX}/chat/completions")
"""Routes whose bodies carry prompts (the sample body limit applies)."""

routes = [
    Route(f"{PREFIX}/models", list_models, methods=["GET"]),
    Route(PROMPT_PATHS[0], completions, methods=["POST"]),
    Route(PROMPT_PATHS[1], chat_completions, methods=["POST"]),
]
