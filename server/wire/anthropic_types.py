"""JSON bodies of the Anthropic-compatible API (`/anthropic/api/v1`), as msgspec Structs.

As for the OpenAI-compatible API, requests refuse unknown fields (tools, thinking, ... are a
400 naming the field), and responses always send the fields the `anthropic` package reads
even when null (`stop_reason`, `stop_sequence`).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from server.wire.openai_types import MaxTokens, Request, TextPart

StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


class Message(Request):
    role: str
    content: str | list[TextPart]


class CountTokensRequest(Request):
    model: str
    messages: list[Message]
    system: str | list[TextPart] | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: MaxTokens
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    metadata: dict[str, Any] | None = None
    """Accepted and ignored (e.g. `user_id`)."""


class TextBlock(msgspec.Struct, kw_only=True, tag_field="type", tag="text"):
    text: str


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: int
    output_tokens: int


class MessageResponse(msgspec.Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    model: str
    content: list[TextBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage
    role: Literal["assistant"] = "assistant"


class TokenCount(msgspec.Struct, kw_only=True):
    input_tokens: int


# ---- stream events (the SSE `event:` name is the `type` tag) --------------------------------


class MessageStart(msgspec.Struct, kw_only=True, tag_field="type", tag="message_start"):
    message: MessageResponse


class ContentBlockStart(msgspec.Struct, kw_only=True, tag_field="type", tag="content_block_start"):
    index: int
    content_block: TextBlock


class TextDelta(msgspec.Struct, kw_only=True, tag_field="type", tag="text_delta"):
    text: str


class ContentBlockDelta(msgspec.Struct, kw_only=True, tag_field="type", tag="content_block_delta"):
    index: int
    delta: TextDelta


class ContentBlockStop(msgspec.Struct, kw_only=True, tag_field="type", tag="content_block_stop"):
    index: int


class StopDelta(msgspec.Struct, kw_only=True):
    stop_reason: StopReason
    stop_sequence: str | None


class OutputUsage(msgspec.Struct, kw_only=True):
    output_tokens: int


class MessageDelta(msgspec.Struct, kw_only=True, tag_field="type", tag="message_delta"):
    delta: StopDelta
    usage: OutputUsage


class MessageStop(msgspec.Struct, kw_only=True, tag_field="type", tag="message_stop"):
    pass


StreamEvent = MessageStart | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta | MessageStop
