"""Starts the real server (`python -m server`) on a loopback port for SDK-level tests.

`server_url` is the shared session-wide server; tests that kill or restart a server start
their own `live_server.ServerProcess`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import tinker
from transformers import AutoTokenizer

from live_server import ServerProcess


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServerProcess(tmp_path_factory.mktemp("server"))
    try:
        yield server.start().url
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _sdk_environment() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TINKER_TELEMETRY"] = "0"


COMPAT_BASE_MODEL = "tuft/tiny-qwen3"
COMPAT_API_KEY = "tml-e2e-compat-key"
COMPAT_TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="session")
def compat_service(server_url: str) -> Iterator[tinker.ServiceClient]:
    """The SDK under the key the OpenAI and Anthropic clients of the compatibility tests use."""
    client = tinker.ServiceClient(base_url=server_url, api_key=COMPAT_API_KEY)
    yield client
    client.close("success")


@pytest.fixture(scope="session")
def compat_adapter(compat_service: tinker.ServiceClient) -> tuple[str, str]:
    """(sampler checkpoint path, tokenizer directory) of an adapter trained a few steps through
    the SDK on `COMPAT_TEXT`, enough for its greedy continuations to differ from the base model's."""
    training = compat_service.create_lora_training_client(base_model=COMPAT_BASE_MODEL, rank=8, seed=0).result()
    tokenizer_dir = training.get_info().model_data.tokenizer_id
    tokens = AutoTokenizer.from_pretrained(tokenizer_dir).encode(COMPAT_TEXT)
    datum = tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    for _ in range(8):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
    return training.save_weights_for_sampler("compat").result().path, tokenizer_dir


@pytest.fixture(params=["{base}", "{checkpoint}", "{base};{checkpoint}"])
def compat_model(request: pytest.FixtureRequest, compat_adapter: tuple[str, str]) -> str:
    """Each form of the compatible APIs' `model`: the base model, the trained adapter's sampler
    checkpoint, and both as `{base model};{checkpoint}`."""
    return request.param.format(base=COMPAT_BASE_MODEL, checkpoint=compat_adapter[0])


@dataclass(frozen=True)
class GreedySample:
    """The SDK's greedy sample, and the text and logprobs the compatible APIs should return for it."""

    tokens: list[int]
    text: str
    logprobs: list[float]
    """Of the tokens in `text` (all but a final EOS)."""
    ended_by_eos: bool


@pytest.fixture(scope="session")
def sdk_greedy(
    compat_service: tinker.ServiceClient, compat_adapter: tuple[str, str]
) -> Callable[[str, list[int], int], GreedySample]:
    """`sdk_greedy(model, prompt_tokens, max_tokens)`: SamplingClient.sample at temperature 0 on
    what a compatible API's `model` names."""
    tokenizer = AutoTokenizer.from_pretrained(compat_adapter[1])

    def sample(model: str, prompt: list[int], max_tokens: int) -> GreedySample:
        path = model.rpartition(";")[2]
        if path.startswith("tinker://"):
            sampler = compat_service.create_sampling_client(model_path=path).result()
        else:
            sampler = compat_service.create_sampling_client(base_model=model).result()
        params = tinker.types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        [sequence] = sampler.sample(tinker.types.ModelInput.from_ints(prompt), 1, params).result().sequences
        tokens = list(sequence.tokens)
        ended_by_eos = sequence.stop_reason == "stop"
        content = tokens[:-1] if ended_by_eos else tokens
        text = tokenizer.decode(content, skip_special_tokens=True)
        return GreedySample(tokens, text, list(sequence.logprobs or [])[: len(content)], ended_by_eos)

    return sample
