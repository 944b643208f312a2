"""The `openai` package against the live server's `/oai/api/v1`: greedy completions, chat and
their streams give the tokens the tinker SDK samples on the same prompt (for chat, the
templated one), for the base model and for a trained adapter's checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from conftest import COMPAT_API_KEY, COMPAT_BASE_MODEL, COMPAT_TEXT
from transformers import AutoTokenizer

MAX_TOKENS = 12
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server_url}/oai/api/v1", api_key=COMPAT_API_KEY, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(compat_adapter: tuple[str, str]):
    return AutoTokenizer.from_pretrained(compat_adapter[1])


def test_greedy_completion_samples_the_sdks_tokens(
    client: openai.OpenAI, compat_model: str, sdk_greedy, tokenizer
) -> None:
    prompt = tokenizer.encode(COMPAT_TEXT)[:8]
    expected = sdk_greedy(compat_model, prompt, MAX_TOKENS)
    for sent in (prompt, tokenizer.decode(prompt)):
        completion = client.completions.create(
            model=compat_model, prompt=sent, max_tokens=MAX_TOKENS, temperature=0, logprobs=0
        )
        [choice] = completion.choices
        assert choice.text == expected.text
        assert choice.finish_reason == ("stop" if expected.ended_by_eos else "length")
        assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
        assert completion.usage.prompt_tokens == len(prompt)
        assert completion.usage.completion_tokens == len(expected.tokens)

    streamed = client.completions.create(
        model=compat_model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected.text


def test_greedy_chat_samples_the_sdks_tokens_after_the_template(
    client: openai.OpenAI, compat_model: str, sdk_greedy, tokenizer
) -> None:
    templated = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    expected = sdk_greedy(compat_model, tokenizer.encode(templated, add_special_tokens=False), MAX_TOKENS)
    chat = client.chat.completions.create(
        model=compat_model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, logprobs=True
    )
    [choice] = chat.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected.logprobs, abs=1e-4)
    assert chat.usage.completion_tokens == len(expected.tokens)

    streamed = client.chat.completions.create(
        model=compat_model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.tokens)


def test_the_trained_adapter_samples_differently_from_the_base_model(
    compat_adapter: tuple[str, str], sdk_greedy, tokenizer
) -> None:
    prompt = tokenizer.encode(COMPAT_TEXT)[:8]
    adapter, base = (sdk_greedy(model, prompt, MAX_TOKENS).tokens for model in (compat_adapter[0], COMPAT_BASE_MODEL))
    assert adapter != base


def test_models_list_the_base_model_and_the_adapter(client: openai.OpenAI, compat_adapter: tuple[str, str]) -> None:
    ids = [model.id for model in client.models.list()]
    assert COMPAT_BASE_MODEL in ids and compat_adapter[0] in ids


def test_refusals_raise_the_packages_exceptions(
    server_url: str, client: openai.OpenAI, compat_adapter: tuple[str, str]
) -> None:
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=COMPAT_BASE_MODEL, prompt="Hi", presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model=COMPAT_BASE_MODEL, messages=QUESTION, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    with openai.OpenAI(base_url=f"{server_url}/oai/api/v1", api_key="tml-someone-else", max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.completions.create(model=compat_adapter[0], prompt="Hi", max_tokens=1)
    with openai.OpenAI(base_url=f"{server_url}/oai/api/v1", api_key="not-an-api-key", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
