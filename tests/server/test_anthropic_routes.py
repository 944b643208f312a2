"""The Anthropic-compatible routes over the fake engine (which counts up from the last prompt
token): messages and their event stream, prefills, token counts, refusals in the Messages
API's error shape, and tenancy of checkpoint paths given as `model`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BASE_MODEL, Api, FakeEngine
from starlette.testclient import TestClient
from transformers import AutoTokenizer

MESSAGES = "/anthropic/api/v1/messages"
OTHER_KEY = "tml-someone-else"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def engine(text_engine: FakeEngine) -> FakeEngine:
    return text_engine


@pytest.fixture
def tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def chat_prompt(tokenizer, turns: list[dict], *, prefill: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=not prefill, continue_final_message=prefill
    )
    return tokenizer.encode(text)


def events(response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    assert response.headers["content-type"].startswith("text/event-stream")
    parsed = []
    for block in response.text.strip().split("\n\n"):
        event, data = block.split("\n")
        parsed.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return parsed


def test_a_message_continues_the_templated_conversation(client: TestClient, engine: FakeEngine, tokenizer) -> None:
    request = {"model": BASE_MODEL, "system": "Be brief.", "messages": HELLO, "max_tokens": 5}
    response = client.post(MESSAGES, json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    prompt = chat_prompt(tokenizer, [{"role": "system", "content": "Be brief."}, *HELLO])
    expected = [(prompt[-1] + i) % engine.vocab_size for i in range(1, 6)]
    assert body["type"] == "message" and body["role"] == "assistant" and body["id"].startswith("msg_")
    assert body["content"] == [{"type": "text", "text": tokenizer.decode(expected)}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("max_tokens", None)
    assert body["usage"] == {"input_tokens": len(prompt), "output_tokens": 5}


def test_eos_is_the_end_of_the_turn(client: TestClient, engine: FakeEngine, tokenizer) -> None:
    last = chat_prompt(tokenizer, HELLO)[-1]
    engine.eos_token_id = (last + 3) % engine.vocab_size
    body = client.post(MESSAGES, json={"model": BASE_MODEL, "messages": HELLO, "max_tokens": 10}).json()
    assert body["stop_reason"] == "end_turn"
    assert body["content"][0]["text"] == tokenizer.decode([last + 1, last + 2])
    assert body["usage"]["output_tokens"] == 3


def test_a_final_assistant_message_is_continued(client: TestClient, tokenizer) -> None:
    turns = [*HELLO, {"role": "assistant", "content": [{"type": "text", "text": "The quick"}]}]
    response = client.post(f"{MESSAGES}/count_tokens", json={"model": BASE_MODEL, "messages": turns})
    prefilled = chat_prompt(tokenizer, [*HELLO, {"role": "assistant", "content": "The quick"}], prefill=True)
    assert response.json() == {"input_tokens": len(prefilled)}
    assert tokenizer.decode(prefilled).endswith("The quick")


def test_the_stream_is_the_messages_event_sequence(client: TestClient) -> None:
    request = {"model": BASE_MODEL, "messages": HELLO, "max_tokens": 4}
    whole = client.post(MESSAGES, json=request).json()
    streamed = events(client.post(MESSAGES, json={**request, "stream": True}))
    names = [name for name, _ in streamed]
    block = ["content_block_start", *["content_block_delta"] * 4, "content_block_stop"]
    assert names == ["message_start", *block, "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in streamed)
    start = streamed[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": whole["usage"]["input_tokens"], "output_tokens": 0}
    text = "".join(data["delta"]["text"] for name, data in streamed if name == "content_block_delta")
    assert text == whole["content"][0]["text"]
    delta = streamed[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 4}


def test_another_tenants_checkpoint_is_not_found(client: TestClient, api: Api) -> None:
    model_id = api.model(api.session())
    future = api.post("save_weights_for_sampler", {"model_id": model_id, "path": "smp", "seq_id": 1})
    path = api.result(future["request_id"])["path"]
    mine = client.post(MESSAGES, json={"model": path, "messages": HELLO, "max_tokens": 2})
    assert mine.status_code == 200, mine.text
    other = TestClient(client.app, headers={"X-API-Key": OTHER_KEY}, raise_server_exceptions=False)
    for url, extra in ((MESSAGES, {"max_tokens": 2}), (f"{MESSAGES}/count_tokens", {})):
        response = other.post(url, json={"model": path, "messages": HELLO, **extra})
        assert response.status_code == 404, response.text
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
        assert body["detail"] == body["error"]["message"]


def test_without_a_key_it_is_a_401(client: TestClient) -> None:
    response = TestClient(client.app, raise_server_exceptions=False).post(MESSAGES, json={})
    assert response.status_code == 401 and response.json()["detail"]


_REQUEST = {"model": BASE_MODEL, "messages": HELLO, "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({**_REQUEST, "tools": []}, "tools"),
        ({**_REQUEST, "thinking": {"type": "enabled"}}, "thinking"),
        ({"model": BASE_MODEL, "messages": HELLO}, "max_tokens"),
        ({**_REQUEST, "max_tokens": 0}, "max_tokens"),
        ({**_REQUEST, "messages": []}, "messages"),
        ({**_REQUEST, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({**_REQUEST, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        ({**_REQUEST, "system": [{"type": "document"}]}, "system"),
        ({**_REQUEST, "model": "no/such-model"}, "unknown base model"),
        ({**_REQUEST, "max_tokens": 1000}, "context"),
    ],
)
def test_unsupported_or_bad_input_is_a_400_naming_it(client: TestClient, body: dict, named: str) -> None:
    response = client.post(MESSAGES, json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"] and error["detail"] == error["error"]["message"]
