"""Out-of-range integers are refused at the boundary with a 400 naming the field, instead of
overflowing later (a TTL past year 9999), failing on the worker or waiting forever (a seq_id
no counter reaches)."""

from __future__ import annotations

import msgspec
import pytest
from starlette.testclient import TestClient

from server.routes.rest import SetTtlRequest
from server.wire import types as wire
from server.wire.types import INT64_MAX, MAX_TTL_SECONDS

BAD_SEQ_IDS = [-1, 2**63, 2**70]
BAD_TTLS = [0, -1, MAX_TTL_SECONDS + 1, 2**62, 10**12]
BOUNDED = {"seq_id", "model_seq_id", "sampling_session_seq_id", "ttl_seconds"}


def _int_bounds(field_type: msgspec.inspect.Type) -> tuple[int | None, int | None]:
    types = field_type.types if isinstance(field_type, msgspec.inspect.UnionType) else (field_type,)
    (integer,) = [t for t in types if isinstance(t, msgspec.inspect.IntType)]
    return integer.ge, integer.le


def test_every_sequence_and_ttl_field_is_bounded() -> None:
    structs = [v for v in vars(wire).values() if isinstance(v, type) and issubclass(v, msgspec.Struct)]
    checked = 0
    for struct in [*structs, SetTtlRequest]:
        for field in msgspec.inspect.type_info(struct).fields:
            if field.name in BOUNDED:
                low, high = _int_bounds(field.type)
                assert low is not None and low >= 0 and high is not None and high <= INT64_MAX, (struct, field.name)
                checked += 1
    assert checked >= 13


@pytest.fixture
def ids(api) -> dict[str, str]:
    session = api.session()
    model_id = api.model(session)
    sampler = api.post(
        "create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": "fake/tiny"}
    )
    api.result(api.post("save_weights", {"model_id": model_id, "path": "ckpt", "seq_id": 1})["request_id"])
    return {"session": session, "model": model_id, "sampler": sampler["sampling_session_id"]}


def seq_cases(ids: dict[str, str]) -> list[tuple[str, dict, str]]:
    """(route, body without the field, field) for every request carrying a sequence number."""
    model, session = {"model_id": ids["model"]}, {"session_id": ids["session"]}
    state = f"tinker://{ids['model']}/weights/ckpt"
    prompt = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]}, "sampling_params": {"max_tokens": 1}}
    return [
        ("create_model", {**session, "base_model": "fake/tiny", "lora_config": {"rank": 4}}, "model_seq_id"),
        ("load_weights", {**session, "path": state, "optimizer": True}, "model_seq_id"),
        ("load_weights", {**model, "path": state, "optimizer": True}, "seq_id"),
        ("optim_step", {**model, "adam_params": {}}, "seq_id"),
        ("save_weights", {**model, "path": "x"}, "seq_id"),
        ("save_weights_for_sampler", {**model, "path": "x"}, "seq_id"),
        ("save_weights_for_sampler", {**model, "seq_id": 90}, "sampling_session_seq_id"),
        ("save_weights_external", model, "seq_id"),
        ("create_sampling_session", {**session, "base_model": "fake/tiny"}, "sampling_session_seq_id"),
        ("asample", {"sampling_session_id": ids["sampler"], **prompt}, "seq_id"),
    ]


def test_sequence_numbers_out_of_int64_range_are_400(api, client: TestClient, ids) -> None:
    for route, body, field in seq_cases(ids):
        for value in BAD_SEQ_IDS:
            response = client.post(f"/api/v1/{route}", json={**body, field: value})
            assert response.status_code == 400 and field in response.json()["detail"], (route, value, response.text)
    # Nothing was queued behind an unreachable seq_id: the model's next request runs.
    future = api.post("optim_step", {"model_id": ids["model"], "seq_id": 2, "adam_params": {}})
    assert "metrics" in api.result(future["request_id"])


@pytest.mark.parametrize("route", ["save_weights", "save_weights_for_sampler"])
def test_save_ttl_out_of_range_is_400_and_consumes_the_seq_id(api, client: TestClient, ids, route) -> None:
    model = ids["model"]
    for seq_id, ttl in enumerate(BAD_TTLS, start=2):
        body = {"model_id": model, "path": "t", "seq_id": seq_id, "ttl_seconds": ttl}
        response = client.post(f"/api/v1/{route}", json=body)
        assert response.status_code == 400 and "ttl_seconds" in response.json()["detail"], (ttl, response.text)
    seq_id = 2 + len(BAD_TTLS)
    longest = {"model_id": model, "path": "t", "seq_id": seq_id, "ttl_seconds": MAX_TTL_SECONDS}
    assert api.result(api.post(route, longest)["request_id"])["path"].endswith("/t")
    listed = client.get("/api/v1/checkpoints").json()["checkpoints"]
    kind = "weights" if route == "save_weights" else "sampler_weights"
    assert [c.get("expires_at") is not None for c in listed if c["checkpoint_id"] == f"{kind}/t"] == [True]


def test_set_ttl_out_of_range_is_400(client: TestClient, ids) -> None:
    url = f"/api/v1/training_runs/{ids['model']}/checkpoints/weights/ckpt/ttl"
    for ttl in BAD_TTLS:
        response = client.put(url, json={"ttl_seconds": ttl})
        assert response.status_code == 400 and "ttl_seconds" in response.json()["detail"], (ttl, response.text)
    assert client.put(url, json={"ttl_seconds": MAX_TTL_SECONDS}).status_code == 200
