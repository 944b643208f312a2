"""Text in and out of the engine: each base model's tokenizer (from its tokenizer directory),
chat templates, and sampled tokens decoded into the text the APIs return."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from jinja2 import TemplateError

from server.engine_api import EngineAPI
from server.wire.openai_types import TextPart
from tuft_jax.errors import InputError
from tuft_jax.types import SampledSequence, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_tokenizers: dict[str, PreTrainedTokenizerBase] = {}


async def tokenizer_for(engine: EngineAPI) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, loaded (off the event loop) on first use; transformers is
    imported then too, so the server starts without it."""
    path = engine.tokenizer_path
    tokenizer = _tokenizers.get(path)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = _tokenizers[path] = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """A plain-text prompt, with the special tokens (e.g. BOS) the tokenizer adds."""
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def render_chat(
    tokenizer: PreTrainedTokenizerBase, model: str, messages: list[dict[str, str]], *, continue_final: bool = False
) -> np.ndarray:
    """The prompt tokens of a conversation, by the model's chat template: it ends with the
    assistant's turn opened, or (`continue_final`) inside the last, assistant, message."""
    if not tokenizer.chat_template:
        raise InputError(f"model {model!r} has no chat template; use the completions endpoint with a plain prompt")
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not continue_final, continue_final_message=continue_final
        )
    except (TemplateError, ValueError) as exc:
        raise InputError(f"the chat template of {model!r} refused these messages: {exc}") from None
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)


@dataclass(frozen=True)
class Completion:
    """One sampled sequence as text. `pieces` split `text` by token (one per content token,
    an empty piece where a token only starts a multi-byte character), for streaming and logprobs."""

    text: str
    pieces: list[str]
    logprobs: list[float]
    """Of the content tokens (the sampled ones but a final stop token)."""
    sampled_tokens: int
    finish: Literal["eos", "stop_string", "length"]
    stop_string: str | None


def decode_completion(
    tokenizer: PreTrainedTokenizerBase, sequence: SampledSequence, params: SamplingParams
) -> Completion:
    """Text without the stop token or string that ended the sequence, as OpenAI and Anthropic return it."""
    tokens = sequence.tokens
    ended_by_token = sequence.stop_reason == "stop" and bool(tokens) and tokens[-1] in params.stop_token_ids
    content = tokens[:-1] if ended_by_token else tokens
    text = tokenizer.decode(content, skip_special_tokens=True)
    finish: Literal["eos", "stop_string", "length"] = "eos" if ended_by_token else "stop_string"
    stop_string = None
    if sequence.stop_reason == "length":
        finish = "length"
    elif finish == "stop_string" and (found := [(text.find(s), s) for s in params.stop_strings if s in text]):
        cut, stop_string = min(found)
        text = text[:cut]
    return Completion(
        text=text,
        pieces=_pieces(tokenizer, content, text),
        logprobs=sequence.logprobs[: len(content)],
        sampled_tokens=len(tokens),
        finish=finish,
        stop_string=stop_string,
    )


def _pieces(tokenizer: PreTrainedTokenizerBase, tokens: list[int], text: str) -> list[str]:
    """Incremental decoding over a window that starts at the previous token (so tokenizers that
    drop a leading space decode right); text is released only once it ends in a whole character.
    The pieces are cut from `text` itself, so they always join to exactly the returned text."""
    pieces: list[str] = []
    start, released, position = 0, 0, 0
    for end in range(1, len(tokens) + 1):
        before = tokenizer.decode(tokens[start:released], skip_special_tokens=True)
        after = tokenizer.decode(tokens[start:end], skip_special_tokens=True)
        piece = ""
        if len(after) > len(before) and not after.endswith("\ufffd"):
            grown = len(after) - len(before)
            piece = text[position : position + grown] if end < len(tokens) else text[position:]
            start, released = released, end
        elif end == len(tokens):
            piece = text[position:]
        pieces.append(piece)
        position += len(piece)
    return pieces


def joined_text(content: str | list[TextPart] | None, where: str) -> str:
    """A message's content given as a string or as text parts (the only kind supported)."""
    if content is None:
        raise InputError(f"{where} is missing")
    if isinstance(content, str):
        return content
    for part in content:
        if part.type != "text" or part.text is None:
            raise InputError(f"{where}: content of type {part.type!r} is not supported (text only)")
    return "".join(part.text for part in content)  # type: ignore[misc]
