"""The OpenAI-compatible routes over the fake engine: what they sample (the fake counts up from
the last prompt token), the body shapes, refusals as 400s naming the field, bearer auth, and
tenancy of checkpoint paths given as `model`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import API_KEY, BASE_MODEL, Api, FakeEngine
from starlette.testclient import TestClient
from transformers import AutoTokenizer

OAI = "/oai/api/v1"
OTHER_KEY = "tml-someone-else"


@pytest.fixture
def engine(text_engine: FakeEngine) -> FakeEngine:
    return text_engine


@pytest.fixture
def tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def bearer(client: TestClient, key: str = API_KEY) -> TestClient:
    """The running app, authenticated the way the `openai` package does it."""
    return TestClient(client.app, headers={"Authorization": f"Bearer {key}"}, raise_server_exceptions=False)


@pytest.fixture
def oai(client: TestClient) -> TestClient:
    return bearer(client)


@pytest.fixture
def sampler_path(api: Api) -> str:
    """A sampler checkpoint of the default tenant."""
    model_id = api.model(api.session())
    future = api.post("save_weights_for_sampler", {"model_id": model_id, "path": "smp", "seq_id": 1})
    return api.result(future["request_id"])["path"]


def counted(last: int, count: int, engine: FakeEngine) -> list[int]:
    """What the fake samples after a prompt ending in `last`, ignoring stops."""
    return [(last + i) % engine.vocab_size for i in range(1, count + 1)]


def sse_data(response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line.removeprefix("data: ") for line in response.text.split("\n") if line.startswith("data: ")]


def test_completion_of_token_ids_with_logprobs(oai: TestClient, engine: FakeEngine, tokenizer) -> None:
    request = {"model": BASE_MODEL, "prompt": [5, 6], "max_tokens": 4, "logprobs": 0}
    response = oai.post(f"{OAI}/completions", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == BASE_MODEL
    [choice] = body["choices"]
    assert choice["text"] == tokenizer.decode(counted(6, 4, engine))
    assert choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["token_logprobs"] == [-0.5] * 4
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(4)]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_eos_ends_a_completion_and_is_not_in_its_text(oai: TestClient, engine: FakeEngine, tokenizer) -> None:
    eos = engine.eos_token_id
    prompt = tokenizer.encode("Hello") + [eos - 2]
    body = oai.post(f"{OAI}/completions", json={"model": BASE_MODEL, "prompt": prompt, "max_tokens": 10}).json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == tokenizer.decode([eos - 1])
    assert body["usage"]["completion_tokens"] == 2, "the EOS token counts as sampled"


def test_text_prompts_and_n_give_one_choice_per_sample(oai: TestClient, engine: FakeEngine, tokenizer) -> None:
    prompts = ["Hello", "The quick brown fox"]
    body = oai.post(f"{OAI}/completions", json={"model": BASE_MODEL, "prompt": prompts, "max_tokens": 3, "n": 2}).json()
    expected = [tokenizer.decode(counted(tokenizer.encode(p)[-1], 3, engine)) for p in prompts]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [expected[0], expected[0], expected[1], expected[1]]
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12
    }


def test_streamed_completion_joins_to_the_same_text(oai: TestClient) -> None:
    request = {"model": BASE_MODEL, "prompt": "Hello", "max_tokens": 6, "logprobs": 0}
    whole = oai.post(f"{OAI}/completions", json=request).json()
    stream = oai.post(f"{OAI}/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}})
    data = sse_data(stream)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    usage, chunks = chunks[-1], chunks[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 6 + ["length"]
    assert [lp for c in chunks[:-1] for lp in c["choices"][0]["logprobs"]["token_logprobs"]] == [-0.5] * 6


def test_chat_samples_after_the_chat_template(oai: TestClient, engine: FakeEngine, tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    request = {"model": BASE_MODEL, "messages": messages, "max_tokens": 5, "logprobs": True}
    body = oai.post(f"{OAI}/chat/completions", json=request).json()
    text_messages = [messages[0], {"role": "user", "content": "Hi"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(text_messages, tokenize=False, add_generation_prompt=True))
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": tokenizer.decode(counted(prompt[-1], 5, engine))}
    assert [t["logprob"] for t in choice["logprobs"]["content"]] == [-0.5] * 5
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_chat_without_max_tokens_may_fill_the_context(oai: TestClient, engine: FakeEngine) -> None:
    usage = oai.post(f"{OAI}/chat/completions", json=_CHAT).json()["usage"]
    assert usage["total_tokens"] <= engine.max_context_length


def test_streamed_chat_sends_role_content_and_finish_per_choice(oai: TestClient) -> None:
    request = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2}
    whole = oai.post(f"{OAI}/chat/completions", json=request).json()
    data = sse_data(oai.post(f"{OAI}/chat/completions", json={**request, "stream": True}))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    for index in (0, 1):
        deltas = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(d["delta"].get("content", "") for d in deltas) == whole["choices"][index]["message"]["content"]
        assert [d["finish_reason"] for d in deltas][-1] == "length"


def test_models_lists_base_models_and_the_callers_sampler_checkpoints(
    client: TestClient, oai: TestClient, sampler_path: str
) -> None:
    ids = [m["id"] for m in oai.get(f"{OAI}/models").json()["data"]]
    assert ids == [BASE_MODEL, sampler_path]
    others = [m["id"] for m in bearer(client, OTHER_KEY).get(f"{OAI}/models").json()["data"]]
    assert others == [BASE_MODEL]


def test_checkpoint_models_load_once_and_sample_with_the_adapter(
    oai: TestClient, engine: FakeEngine, sampler_path: str
) -> None:
    slots_before = set(engine.adapters)
    for model in (sampler_path, f"{BASE_MODEL};{sampler_path}", sampler_path):
        response = oai.post(f"{OAI}/completions", json={"model": model, "prompt": [3], "max_tokens": 2})
        assert response.status_code == 200, response.text
    assert len(set(engine.adapters) - slots_before) == 1, "one load shared by every request naming the checkpoint"


def test_checkpoints_beyond_the_cache_are_released(make_client, make_api, engine: FakeEngine) -> None:
    with make_client(engine, max_checkpoint_adapters=1) as client:
        api = make_api(client)
        model_id = api.model(api.session())
        paths = []
        for seq_id, name in enumerate(["one", "two"], start=1):
            future = api.post("save_weights_for_sampler", {"model_id": model_id, "path": name, "seq_id": seq_id})
            paths.append(api.result(future["request_id"])["path"])
        for path in [*paths, *paths]:
            response = client.post(f"{OAI}/completions", json={"model": path, "prompt": [3], "max_tokens": 1})
            assert response.status_code == 200, response.text
        assert len(engine.adapters) == 2, "the training model's adapter and one loaded checkpoint"


def test_another_tenants_checkpoint_is_not_found(client: TestClient, sampler_path: str) -> None:
    other = bearer(client, OTHER_KEY)
    for model in (sampler_path, f"{BASE_MODEL};{sampler_path}"):
        for path, extra in (("completions", {"prompt": [1]}), ("chat/completions", {"messages": _CHAT["messages"]})):
            response = other.post(f"{OAI}/{path}", json={"model": model, "max_tokens": 1, **extra})
            assert response.status_code == 404, response.text
            body = response.json()
            assert body["error"]["type"] == "not_found_error" and body["detail"] == body["error"]["message"]


def test_a_public_checkpoint_samples_for_everyone(client: TestClient, api: Api, sampler_path: str) -> None:
    run, checkpoint = sampler_path.removeprefix("tinker://").split("/", 1)
    assert client.post(f"/api/v1/training_runs/{run}/checkpoints/{checkpoint}/publish").status_code == 200
    response = bearer(client, OTHER_KEY).post(f"{OAI}/completions", json={"model": sampler_path, "prompt": [1]})
    assert response.status_code == 200, response.text


def test_the_api_key_is_read_from_the_bearer_token(client: TestClient) -> None:
    keyless = TestClient(client.app, raise_server_exceptions=False)
    assert keyless.get(f"{OAI}/models").status_code == 401
    assert keyless.get(f"{OAI}/models", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401
    response = keyless.get(f"{OAI}/models", headers={"Authorization": "Bearer garbage"})
    assert response.status_code == 401 and response.json()["detail"]
    assert keyless.get(f"{OAI}/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
    assert keyless.get(f"{OAI}/models", headers={"X-API-Key": API_KEY}).status_code == 200


_CHAT = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}]}
_COMPLETION = {"model": BASE_MODEL, "prompt": "Hi"}


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("chat/completions", {**_CHAT, "tools": []}, "tools"),
        ("chat/completions", {**_CHAT, "top_logprobs": 2, "logprobs": True}, "top_logprobs"),
        ("chat/completions", {**_CHAT, "response_format": {"type": "json_object"}}, "response_format"),
        ("chat/completions", {**_CHAT, "presence_penalty": 0.5}, "presence_penalty"),
        ("chat/completions", {**_CHAT, "messages": []}, "messages"),
        ("chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image"),
        ("chat/completions", {**_CHAT, "messages": [{"role": "user"}]}, "messages[0].content"),
        ("chat/completions", {**_CHAT, "n": 0}, "n must be"),
        ("completions", {**_COMPLETION, "logprobs": 2}, "logprobs"),
        ("completions", {**_COMPLETION, "echo": True}, "echo"),
        ("completions", {**_COMPLETION, "suffix": "x"}, "suffix"),
        ("completions", {**_COMPLETION, "best_of": 3}, "best_of"),
        ("completions", {**_COMPLETION, "logit_bias": {"1": 5}}, "logit_bias"),
        ("completions", {**_COMPLETION, "frequency_penalty": 1}, "frequency_penalty"),
        ("completions", {**_COMPLETION, "prompt": [1, "a"]}, "prompt must be"),
        ("completions", {**_COMPLETION, "prompt": [[1], [-1]]}, "token ids"),
        ("completions", {**_COMPLETION, "prompt": []}, "prompt"),
        ("completions", {**_COMPLETION, "prompt": [1] * 300}, "context"),
        ("completions", {**_COMPLETION, "prompt": ["a"] * 65, "n": 2}, "limit of 128"),
        ("completions", {**_COMPLETION, "model": "no/such-model"}, "unknown base model"),
        ("completions", {**_COMPLETION, "model": "tinker://run/sampler_weights/.x"}, "invalid checkpoint name"),
        ("completions", {**_COMPLETION, "temperature": "hot"}, "temperature"),
    ],
)
def test_unsupported_or_bad_input_is_a_400_naming_it(oai: TestClient, path: str, body: dict, named: str) -> None:
    response = oai.post(f"{OAI}/{path}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"] and error["detail"] == error["error"]["message"]


def test_prompt_bodies_get_the_sample_body_limit(make_client, engine: FakeEngine) -> None:
    with make_client(engine, max_json_body_bytes=1000, max_sample_body_bytes=20_000) as client:
        long_prompt = {**_COMPLETION, "prompt": "x" * 5000}
        response = client.post(f"{OAI}/completions", json=long_prompt)
        assert response.status_code == 400 and "context" in response.json()["detail"], "read, then refused as too long"
        assert client.post(f"{OAI}/completions", json={**_COMPLETION, "prompt": "x" * 30_000}).status_code == 413


def test_chat_with_a_model_without_a_chat_template_is_a_400(
    make_client, text_engine: FakeEngine, tokenizer, tmp_path: Path
) -> None:
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain")
    text_engine.tokenizer_path = str(tmp_path / "plain")
    with make_client(text_engine) as client:
        response = client.post(f"{OAI}/chat/completions", json=_CHAT)
        assert response.status_code == 400 and "no chat template" in response.json()["detail"]
        assert client.post(f"{OAI}/completions", json=_COMPLETION).status_code == 200

