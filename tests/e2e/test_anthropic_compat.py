"""The `anthropic` package against the live server's `/anthropic/api`: greedy messages and their
stream give the tokens the tinker SDK samples on the templated conversation, for the base model
and for a trained adapter's checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest
from conftest import COMPAT_API_KEY, COMPAT_BASE_MODEL
from transformers import AutoTokenizer

MAX_TOKENS = 12
SYSTEM = "You answer in one word."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}
"""Sent as `extra_body`: recent `anthropic` packages no longer take `temperature` as an argument."""


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=f"{server_url}/anthropic/api", api_key=COMPAT_API_KEY, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def prompt(compat_adapter: tuple[str, str]) -> list[int]:
    """The conversation as the model's chat template renders it, the assistant's turn opened."""
    tokenizer = AutoTokenizer.from_pretrained(compat_adapter[1])
    turns = [{"role": "system", "content": SYSTEM}, *QUESTION]
    templated = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(templated, add_special_tokens=False)


def test_greedy_message_samples_the_sdks_tokens(
    client: anthropic.Anthropic, compat_model: str, sdk_greedy, prompt: list[int]
) -> None:
    expected = sdk_greedy(compat_model, prompt, MAX_TOKENS)
    message = client.messages.create(
        model=compat_model, system=SYSTEM, messages=QUESTION, max_tokens=MAX_TOKENS, extra_body=GREEDY
    )
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == expected.text
    assert message.stop_reason == ("end_turn" if expected.ended_by_eos else "max_tokens")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (len(prompt), len(expected.tokens))


def test_greedy_stream_samples_the_sdks_tokens(
    client: anthropic.Anthropic, compat_model: str, sdk_greedy, prompt: list[int]
) -> None:
    expected = sdk_greedy(compat_model, prompt, MAX_TOKENS)
    with client.messages.stream(
        model=compat_model, system=SYSTEM, messages=QUESTION, max_tokens=MAX_TOKENS, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected.text == final.content[0].text
    assert final.usage.output_tokens == len(expected.tokens)


def test_count_tokens_counts_the_templated_prompt(client: anthropic.Anthropic, prompt: list[int]) -> None:
    count = client.messages.count_tokens(model=COMPAT_BASE_MODEL, system=SYSTEM, messages=QUESTION)
    assert count.input_tokens == len(prompt)


def test_refusals_raise_the_packages_exceptions(
    server_url: str, client: anthropic.Anthropic, compat_adapter: tuple[str, str]
) -> None:
    with pytest.raises(anthropic.BadRequestError, match="tools"):
        client.messages.create(
            model=COMPAT_BASE_MODEL, messages=QUESTION, max_tokens=4,
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
        )  # fmt: skip
    base_url = f"{server_url}/anthropic/api"
    with anthropic.Anthropic(base_url=base_url, api_key="tml-someone-else", max_retries=0) as other:
        with pytest.raises(anthropic.NotFoundError):
            other.messages.create(model=compat_adapter[0], messages=QUESTION, max_tokens=1)
