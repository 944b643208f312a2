"""Anthropic-compatible endpoints under `/anthropic/api`: `/v1/messages` (streamed as the
Messages API's server-sent events with `stream`) and `/v1/messages/count_tokens`, for the
`anthropic` package. The API key comes as `X-API-Key`, as the package sends it.

The conversation (`system`, then the `messages`) is rendered by the model's chat template; a
last message from the assistant is continued, as the Messages API does with a prefill.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.compat.generate import generate, params_for
from server.compat.models import resolve_model
from server.compat.responses import sse_event, sse_response, with_error_body
from server.compat.text import Completion, joined_text, render_chat, tokenizer_for
from server.http import json_response, read_json
from server.service import Service
from server.wire.anthropic_types import (
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensRequest,
    MessageDelta,
    MessageResponse,
    MessagesRequest,
    MessageStart,
    MessageStop,
    OutputUsage,
    StopDelta,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    TokenCount,
    Usage,
)
from tuft_jax.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PREFIX = "/anthropic/api/v1"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
_STOP_REASONS: dict[str, StopReason] = {"eos": "end_turn", "stop_string": "stop_sequence", "length": "max_tokens"}


def _error_body(status: int, detail: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": detail}}


anthropic_errors = with_error_body(_error_body)


@anthropic_errors
async def messages(request: Request) -> Response:
    body = await read_json(request, MessagesRequest)
    service = Service.of(request)
    choice = resolve_model(service, body.model)
    tokenizer = await tokenizer_for(choice.engine)
    prompt = _prompt(tokenizer, body)
    params = params_for(
        choice, tokenizer, max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k, seed=None, stop=body.stop_sequences,
    )  # fmt: skip
    [[completion]] = await generate(service, choice, tokenizer, [prompt], 1, params)
    message = MessageResponse(
        id=f"msg_{uuid.uuid4().hex}",
        model=body.model,
        content=[TextBlock(text=completion.text)],
        stop_reason=_STOP_REASONS[completion.finish],
        stop_sequence=completion.stop_string,
        usage=Usage(input_tokens=prompt.size, output_tokens=completion.sampled_tokens),
    )
    if body.stream:
        return sse_response(_events(message, completion))
    return json_response(message)


@anthropic_errors
async def count_tokens(request: Request) -> Response:
    body = await read_json(request, CountTokensRequest)
    choice = resolve_model(Service.of(request), body.model)
    tokenizer = await tokenizer_for(choice.engine)
    return json_response(TokenCount(input_tokens=_prompt(tokenizer, body).size))


def _prompt(tokenizer: PreTrainedTokenizerBase, body: CountTokensRequest) -> np.ndarray:
    if not body.messages:
        raise InputError("messages must not be empty")
    turns = [] if body.system is None else [{"role": "system", "content": joined_text(body.system, "system")}]
    for i, message in enumerate(body.messages):
        if message.role not in ("user", "assistant"):
            raise InputError(f"messages[{i}].role must be 'user' or 'assistant', got {message.role!r}")
        turns.append({"role": message.role, "content": joined_text(message.content, f"messages[{i}].content")})
    return render_chat(tokenizer, body.model, turns, continue_final=body.messages[-1].role == "assistant")


def _events(message: MessageResponse, completion: Completion) -> Iterator[bytes]:
    """message_start, one text block (opened, a delta per token with text, closed),
    message_delta with the stop reason and usage, message_stop."""
    no_output = Usage(input_tokens=message.usage.input_tokens, output_tokens=0)
    opened = msgspec.structs.replace(message, content=[], stop_reason=None, stop_sequence=None, usage=no_output)
    assert message.stop_reason is not None
    events: list[StreamEvent] = [
        MessageStart(message=opened),
        ContentBlockStart(index=0, content_block=TextBlock(text="")),
        *(ContentBlockDelta(index=0, delta=TextDelta(text=piece)) for piece in completion.pieces if piece),
        ContentBlockStop(index=0),
        MessageDelta(
            delta=StopDelta(stop_reason=message.stop_reason, stop_sequence=message.stop_sequence),
            usage=OutputUsage(output_tokens=message.usage.output_tokens),
        ),
        MessageStop(),
    ]
    for event in events:
        yield sse_event(event, type(event).__struct_config__.tag)  # type: ignore[arg-type]


PROMPT_PATHS = (f"{PREFIX}/messages", f"{PREFIX}/messages/count_tokens")
"""Routes whose bodies carry prompts (the sample body limit applies)."""

routes = [
    Route(PROMPT_PATHS[0], messages, methods=["POST"]),
    Route(PROMPT_PATHS[1], count_tokens, methods=["POST"]),
]
