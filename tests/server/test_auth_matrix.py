"""Every route of the app × every kind of caller that is not tenant A, under `--auth required`.

Routes come from `app.routes`, so a new route fails `test_every_route_is_classified` until it
is added to OWNED (addresses a tenant's objects: another tenant gets 404) or NEUTRAL (acts
only on the caller's own things), or deliberately to EXEMPT. Without a valid key every
non-exempt route is a 401 JSON error; with tenant B's key nothing of A's is visible or
changeable, and A's objects are intact afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient
from test_training_routes import PROTO, fwd_body

from server.api_keys import create_api_key
from server.store_sql import SqlStore

BASE = "fake/tiny"
EXEMPT = {
    ("GET", "/healthz"),
    ("GET", "/api/v1/healthz"),
    ("GET", "/metrics"),
    ("GET", "/dashboard"),
    ("GET", "/dashboard/app.js"),
    ("GET", "/dashboard/style.css"),
}


@dataclass(frozen=True)
class Ids:
    """Tenant A's objects."""

    session: str
    model: str
    sampler: str
    future: str
    state: str
    sampler_path: str


@dataclass(frozen=True)
class Call:
    params: dict[str, str] = field(default_factory=dict)
    """Path parameters beyond the defaults (A's session, run and sampler)."""
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


Calls = Callable[[Ids], list[Call]]


def _rest(*rests: str, **kwargs: Any) -> Calls:
    return lambda ids: [Call(params={"rest": rest}, **kwargs) for rest in rests]


def _one(body: Callable[[Ids], Any] | None = None) -> Calls:
    return lambda ids: [Call(json=None if body is None else body(ids))]


_PROMPT = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]}, "sampling_params": {"max_tokens": 1}}
_RUNS = "/api/v1/training_runs/{run_id}"
_CHAT = [{"role": "user", "content": "x"}]


def _compat(**body: Any) -> Calls:
    """A's sampler checkpoint as `model` of an OpenAI- or Anthropic-compatible call, alone and
    after its base model."""
    models = lambda ids: (ids.sampler_path, f"{BASE};{ids.sampler_path}")  # noqa: E731
    return lambda ids: [Call(json={"model": model, **body}) for model in models(ids)]


OWNED: dict[tuple[str, str], Calls] = {
    ("POST", "/api/v1/session_heartbeat"): _one(lambda i: {"session_id": i.session}),
    ("POST", "/api/v1/sessions/{session_id}/finish"): _one(lambda i: {}),
    ("GET", "/api/v1/sessions/{session_id}"): _one(),
    ("PUT", "/api/v1/sessions/{session_id}/project"): _one(lambda i: {"project_id": "proj-b"}),
    ("GET", "/api/v1/sessions/{session_id}/trace_export"): _one(),
    ("GET", "/api/v1/sessions/{session_id}/trace"): _one(),
    ("POST", "/api/v1/copy_weights"): lambda i: [
        Call(json={"source_path": i.state, "destination_project_id": "proj-b"}, headers={"X-Idempotency-Key": "k"}),
        Call(json={"source_path": i.state, "session_id": i.session, "model_seq_id": 9}),
    ],
    ("POST", "/api/v1/create_model"): _one(
        lambda i: {"session_id": i.session, "model_seq_id": 5, "base_model": BASE, "lora_config": {"rank": 4}}
    ),
    ("POST", "/api/v1/get_info"): _one(lambda i: {"model_id": i.model}),
    ("POST", "/api/v1/load_weights"): lambda i: [
        Call(json={"model_id": i.model, "seq_id": 50, "path": i.state, "optimizer": True}),
        Call(json={"session_id": i.session, "model_seq_id": 6, "path": i.state, "optimizer": True}),
    ],
    ("POST", "/api/v1/forward_backward"): lambda i: [Call(content=fwd_body(i.model, 50), headers=PROTO)],
    ("POST", "/api/v1/optim_step"): _one(lambda i: {"model_id": i.model, "seq_id": 50, "adam_params": {}}),
    ("POST", "/api/v1/save_weights"): _one(lambda i: {"model_id": i.model, "path": "x", "seq_id": 50}),
    ("POST", "/api/v1/save_weights_for_sampler"): lambda i: [
        Call(json={"model_id": i.model, "path": "x", "seq_id": 50}),
        Call(json={"model_id": i.model, "sampling_session_seq_id": 7, "seq_id": 50}),
    ],
    ("POST", "/api/v1/save_weights_external"): _one(lambda i: {"model_id": i.model, "path": "x", "seq_id": 50}),
    ("POST", "/api/v1/create_sampling_session"): lambda i: [
        Call(json={"session_id": i.session, "sampling_session_seq_id": 8, "base_model": BASE}),
        Call(json={"session_id": i.session, "sampling_session_seq_id": 8, "model_path": i.sampler_path}),
    ],
    ("POST", "/api/v1/asample"): _one(lambda i: {"sampling_session_id": i.sampler, **_PROMPT}),
    ("POST", "/api/v1/retrieve_future"): _one(lambda i: {"request_id": i.future}),
    ("GET", _RUNS): lambda i: [Call(), Call(params={"run_id": "healthz"})],
    ("GET", _RUNS + "/checkpoints"): _one(),
    ("POST", "/api/v1/weights_info"): _one(lambda i: {"tinker_path": i.state}),
    ("GET", "/api/v1/samplers/{sampler_id}"): _one(),
    ("DELETE", _RUNS + "/checkpoints/{rest:path}"): _rest(
        "weights/ckpt", "weights/healthz", "sampler_weights/smp", "weights/ckpt/publish"
    ),
    ("POST", _RUNS + "/checkpoints/{rest:path}"): _rest("weights/ckpt/publish"),
    ("PUT", _RUNS + "/checkpoints/{rest:path}"): _rest("weights/ckpt/ttl", json={"ttl_seconds": 60}),
    ("GET", _RUNS + "/checkpoints/{rest:path}"): lambda i: [
        Call(params={"rest": "weights/ckpt/archive"}),
        Call(params={"rest": "weights/ckpt/archive"}, headers={"Accept": "application/json"}),
        Call(params={"rest": "weights/healthz/archive"}),
        Call(params={"rest": "external_weights/ext/external_weights_urls"}),
        Call(params={"rest": "external_weights/ext/files/adapter_config.json"}),
    ],
    ("POST", "/oai/api/v1/completions"): _compat(prompt=[1], max_tokens=1),
    ("POST", "/oai/api/v1/chat/completions"): _compat(messages=_CHAT, max_tokens=1),
    ("POST", "/anthropic/api/v1/messages"): _compat(messages=_CHAT, max_tokens=1),
    ("POST", "/anthropic/api/v1/messages/count_tokens"): _compat(messages=_CHAT),
    ("GET", "/dashboard/api/runs/{run_id}"): lambda i: [Call(), Call(params={"run_id": "healthz"})],
    ("POST", "/dashboard/api/sample"): _compat(prompt="x", max_tokens=1),
}
NEUTRAL: dict[tuple[str, str], Calls] = {
    ("POST", "/api/v1/client/config"): _one(lambda i: {}),
    ("POST", "/api/v1/client/dynamic_config"): _one(lambda i: {}),
    ("POST", "/api/v1/telemetry"): _one(lambda i: {"events": []}),
    ("GET", "/api/v1/get_server_capabilities"): _one(),
    ("POST", "/api/v1/create_session"): _one(lambda i: {"tags": [], "sdk_version": "0.38.0"}),
    ("GET", "/api/v1/sessions"): _one(),
    ("GET", "/api/v1/training_runs"): lambda i: [Call(), Call(params={"_query": "?access_scope=accessible"})],
    ("GET", "/api/v1/checkpoints"): _one(),
    ("POST", "/api/v1/sessions/search"): lambda i: [Call(json={}), Call(json={"owner": {"type": "accessible"}})],
    ("GET", "/api/v1/auth/apikey/me"): _one(),
    ("DELETE", "/api/v1/auth/apikey/me"): _one(),
    ("GET", "/oai/api/v1/models"): _one(),
    ("GET", "/api/v1/billing/usage/events"): lambda i: [Call(params={"_query": _usage_window()})],
    ("GET", "/api/v1/billing/usage/checkpoints/current"): _one(),
    ("GET", "/api/v1/audit"): _one(),
    ("GET", "/dashboard/api/runs"): _one(),
    ("GET", "/dashboard/api/models"): _one(),
    ("GET", "/dashboard/api/health"): _one(),
}


def _usage_window() -> str:
    """The query of a billing window covering this hour and the previous one."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return f"?starting_on={(hour - timedelta(hours=1)).isoformat()}&ending_before={(hour + timedelta(hours=1)).isoformat()}".replace("+00:00", "Z")


_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def app_routes(client: TestClient) -> list[tuple[str, str]]:
    routes = [route for route in client.app.routes if isinstance(route, Route)]
    assert len(routes) == len(client.app.routes), "only plain routes are expected"
    return [(method, route.path) for route in routes for method in sorted(route.methods or ()) if method != "HEAD"]


def calls_for(client: TestClient, ids: Ids, table: dict[tuple[str, str], Calls]) -> Iterator[tuple[str, str, Call]]:
    """(method, concrete path, call) for every route of the app that `table` classifies."""
    defaults = {"session_id": ids.session, "run_id": ids.model, "sampler_id": ids.sampler}
    for method, template in app_routes(client):
        for call in table.get((method, template), lambda _: [])(ids):
            params = {**defaults, **call.params}
            path = _PARAM.sub(lambda m: params[m.group(1)], template) + params.get("_query", "")
            yield method, path, call


def send(world: World, method: str, path: str, call: Call, key: str | None):
    """The call with `key`, or no key at all."""
    headers = {**call.headers, **({"X-API-Key": key} if key is not None else {})}
    return world.keyless.request(method, path, json=call.json, content=call.content, headers=headers)


# ---- fixtures -------------------------------------------------------------------------------


@dataclass
class World:
    client: TestClient
    """Tenant A's client."""
    keyless: TestClient
    """The same running app, sending no key unless given one."""
    callers: dict[str, str | None]
    ids: Ids


@pytest.fixture
def world(make_client, engine, make_api, tmp_path: Path) -> Iterator[World]:
    store = SqlStore.sqlite(tmp_path / "checkpoints" / "tuft.db")
    a_key, _ = create_api_key(store, "tenant-a")
    b_key, _ = create_api_key(store, "tenant-b")
    revoked, revoked_record = create_api_key(store, "old")
    store.revoke_api_key(revoked_record.key_id, revoked_record.created_at)
    callers = {"no key": None, "garbage": "tml-0123456789ab-" + "0" * 64, "unprefixed": "garbage", "revoked": revoked}
    with make_client(engine, api_key=a_key, auth="required", auth_cache_s=0.0) as client:
        api = make_api(client)
        session = api.session()
        model = api.model(session, rank=4)
        for seq_id, (route, name) in enumerate(
            [
                ("save_weights", "ckpt"),
                ("save_weights", "healthz"),
                ("save_weights_external", "ext"),
                ("save_weights_for_sampler", "smp"),
            ],
            start=1,
        ):
            future = api.post(route, {"model_id": model, "path": name, "seq_id": seq_id})["request_id"]
            api.result(future)
        sampler = api.post(
            "create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": BASE}
        )
        ids = Ids(
            session, model, sampler["sampling_session_id"], future,
            f"tinker://{model}/weights/ckpt", f"tinker://{model}/sampler_weights/smp",
        )
        keyless = TestClient(client.app, raise_server_exceptions=False)
        yield World(client, keyless, {**callers, "other tenant": b_key}, ids)


def assert_a_intact(world: World) -> None:
    client, ids = world.client, world.ids
    assert client.get(f"/api/v1/sessions/{ids.session}").status_code == 200
    assert client.get(f"/api/v1/training_runs/{ids.model}").status_code == 200
    assert client.get(f"/api/v1/samplers/{ids.sampler}").status_code == 200
    listed = client.get(f"/api/v1/training_runs/{ids.model}/checkpoints").json()["checkpoints"]
    assert [c["checkpoint_id"] for c in listed] == [
        "weights/ckpt", "weights/healthz", "external_weights/ext", "sampler_weights/smp"
    ]
    assert not any(c.get("public") or c.get("expires_at") for c in listed)
    assert client.post("/api/v1/retrieve_future", json={"request_id": ids.future}).json()["path"] == ids.sampler_path
    assert [r.status_code for r in map(client.get, ["/api/v1/training_runs", "/api/v1/checkpoints"])] == [200, 200]
    optim = {"model_id": ids.model, "seq_id": 5, "adam_params": {}}
    future = client.post("/api/v1/optim_step", json=optim).json()["request_id"]
    assert client.post("/api/v1/retrieve_future", json={"request_id": future}).json()["metrics"] is not None


# ---- tests ----------------------------------------------------------------------------------


def test_every_route_is_classified(world: World) -> None:
    routes = set(app_routes(world.client))
    classified = set(OWNED) | set(NEUTRAL) | EXEMPT
    assert routes - classified == set(), "new routes: add them to OWNED, NEUTRAL or EXEMPT"
    assert classified - routes == set(), "stale entries"
    assert not set(OWNED) & set(NEUTRAL)


@pytest.mark.parametrize("caller", ["no key", "garbage", "unprefixed", "revoked"])
def test_without_a_valid_key_every_route_but_the_exempt_is_401(world: World, caller: str) -> None:
    key = world.callers[caller]
    failures = []
    for method, path, call in calls_for(world.client, world.ids, {**OWNED, **NEUTRAL}):
        response = send(world, method, path, call, key)
        if response.status_code != 401 or not response.json().get("detail"):
            failures.append((method, path, response.status_code, response.text[:200]))
    assert failures == []
    assert_a_intact(world)


def test_another_tenant_cannot_see_or_touch_anything(world: World) -> None:
    key = world.callers["other tenant"]
    failures = []
    for method, path, call in calls_for(world.client, world.ids, OWNED):
        response = send(world, method, path, call, key)
        if response.status_code != 404 or not response.json().get("detail"):
            failures.append((method, path, call.json, response.status_code, response.text[:200]))
    a_ids = [world.ids.session, world.ids.model, world.ids.sampler, world.ids.future]
    for method, path, call in calls_for(world.client, world.ids, NEUTRAL):
        response = send(world, method, path, call, key)
        if response.status_code >= 500 or any(i in response.text for i in a_ids):
            failures.append((method, path, call.json, response.status_code, response.text[:200]))
    assert failures == []
    assert_a_intact(world)


@pytest.mark.parametrize("caller", ["no key", "garbage", "unprefixed", "revoked", "other tenant"])
def test_exempt_routes_answer_anyone(world: World, caller: str) -> None:
    for method, path in sorted(EXEMPT):
        response = send(world, method, path, Call(), world.callers[caller])
        assert response.status_code == 200, (path, response.text)
    assert send(world, "HEAD", "/healthz", Call(), world.callers[caller]).status_code == 200


def test_a_signed_link_opens_one_archive_and_nothing_else(world: World) -> None:
    client, ids = world.client, world.ids
    url = f"/api/v1/training_runs/{ids.model}/checkpoints/weights/ckpt/archive"
    link = client.get(url, headers={"Accept": "application/json"}).json()["url"]
    keyless = world.keyless
    assert keyless.get(link).status_code == 200
    query = link.split("?", 1)[1]
    other_archive = url.replace("/ckpt/", "/healthz/")
    assert keyless.get(f"{other_archive}?{query}").status_code == 404, "signed for another path"
    assert keyless.get(f"{url}?expires=1&sig=%C3%A9").status_code == 404
    for method in ("DELETE", "POST", "PUT"):
        assert keyless.request(method, f"{url}?{query}").status_code == 401
    assert keyless.delete(f"/api/v1/training_runs/{ids.model}/checkpoints/weights/healthz?{query}").status_code == 401
    assert_a_intact(world)
