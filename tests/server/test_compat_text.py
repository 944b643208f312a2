"""Sampled tokens as the compatible APIs' text: the stop that ended a sequence is left out, and
the per-token pieces (streamed deltas, logprob tokens) never split a character and always join
to exactly the text."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from transformers import AutoTokenizer

from server.compat.text import decode_completion
from tuft_jax.types import SampledSequence, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def sequence(tokens: list[int], stop_reason: Literal["stop", "length"] = "length") -> SampledSequence:
    return SampledSequence(tokens=tokens, logprobs=[-float(i) for i in range(len(tokens))], stop_reason=stop_reason)


def test_multi_byte_characters_are_released_whole(tokenizer) -> None:
    text = "naïve café → 東京 fox"
    tokens = tokenizer.encode(text)
    assert len(tokens) > len(text.split()), "multi-byte characters take several byte tokens"
    completion = decode_completion(tokenizer, sequence(tokens), SamplingParams(max_tokens=len(tokens)))
    assert completion.text == text and completion.finish == "length"
    assert "".join(completion.pieces) == text
    assert len(completion.pieces) == len(tokens) == len(completion.logprobs)
    assert "" in completion.pieces, "a token that only starts a character releases nothing"
    assert all("\ufffd" not in piece for piece in completion.pieces)
    assert {"東", "京"} <= {c for piece in completion.pieces for c in piece}


def test_a_stop_token_is_sampled_but_not_returned(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    tokens = [*tokenizer.encode("Hello there"), eos]
    params = SamplingParams(max_tokens=20, stop_token_ids=(eos,))
    completion = decode_completion(tokenizer, sequence(tokens, "stop"), params)
    assert (completion.text, completion.finish, completion.stop_string) == ("Hello there", "eos", None)
    assert completion.sampled_tokens == len(tokens) and len(completion.logprobs) == len(tokens) - 1


def test_text_is_cut_before_the_stop_string(tokenizer) -> None:
    tokens = tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_tokens=20, stop_token_ids=(tokenizer.eos_token_id,), stop_strings=("fox", "own"))
    completion = decode_completion(tokenizer, sequence(tokens, "stop"), params)
    assert (completion.text, completion.finish, completion.stop_string) == ("The quick br", "stop_string", "own")
    assert "".join(completion.pieces) == "The quick br" and len(completion.pieces) == len(tokens)
