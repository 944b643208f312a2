"""JSON bodies of the OpenAI-compatible API (`/oai/api/v1`), as msgspec Structs.

Requests refuse unknown fields, so a feature this server lacks (tools, response formats,
penalties, ...) is a 400 naming the field rather than silently ignored. Responses omit
fields left at their default, except the `object` discriminator (a struct tag, always sent)
and the fields every choice carries even when null (`finish_reason`, `logprobs`), which
have no default.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
"""A `max_tokens`: the upper bound is the context, checked with the prompt."""


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base for request bodies: an unknown field is a 400 that names it."""


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base for response bodies: defaults are left out."""


# ---- requests -------------------------------------------------------------------------------


class StreamOptions(Request):
    include_usage: bool | None = None


class Sampling(Request):
    """What completions and chat completions share. Null is accepted wherever a field is
    optional and means its default (1 for `n`, `temperature` and `top_p`); `top_k` is an
    extension (as in vLLM)."""

    model: str
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """Accepted and ignored: an end-user tag for abuse monitoring."""


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | list[str | int | list[int]]
    """A text, a list of texts, a list of token ids, or a list of token id lists (msgspec takes one
    array type per union, so the mix is refused where the prompts are read)."""
    max_tokens: MaxTokens | None = None
    """Default 16, as in OpenAI's API."""
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(msgspec.Struct, kw_only=True):
    """A message content part; only text parts are supported, refused by their `type` otherwise
    (so unknown fields of other part types pass here)."""

    type: str
    text: str | None = None


class ChatMessage(Request):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ResponseFormat(Request):
    type: str


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


# ---- responses ------------------------------------------------------------------------------


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float]
    text_offset: list[int]
    top_logprobs: None = None


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(Response, tag_field="object", tag="text_completion"):
    """A completion, and (with `stream`) each chunk of one."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(Response):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[None]
    """Always empty: the engine gives no alternatives for sampled tokens."""


class ChatLogprobs(Response):
    content: list[TokenLogprob]


class AssistantMessage(Response):
    role: Literal["assistant"]
    content: str


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(Response, tag_field="object", tag="chat.completion"):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(Response, tag_field="object", tag="chat.completion.chunk"):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Model(Response, tag_field="object", tag="model"):
    id: str
    created: int
    owned_by: str


class ModelList(Response, tag_field="object", tag="list"):
    data: list[Model]
