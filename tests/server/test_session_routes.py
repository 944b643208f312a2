"""Session search, projects and trace exports, read back with the SDK's models."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient
from test_auth import OTHER_KEY, KeyedClient
from test_rest_routes import trained_run
from test_sampling_routes import sample_body
from test_training_routes import fwd_body, optim, post_fwd
from tinker import types as T


def new_session(api, **fields: Any) -> str:
    body = {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", **fields}
    return api.post("create_session", body)["session_id"]


def search(client: TestClient, **request: Any) -> T.SessionSearchResponse:
    response = client.post("/api/v1/sessions/search", json=request)
    assert response.status_code == 200, response.text
    return T.SessionSearchResponse.model_validate(response.json())


def found(client: TestClient, **request: Any) -> list[str]:
    return [s.session_id for s in search(client, **request).sessions]


# ---- search -----------------------------------------------------------------------------------


def test_search_filters(api, client: TestClient) -> None:
    nightly = new_session(api, display_name="Nightly Eval run", user_metadata={"team": "rl", "step": 3})
    weekly = new_session(api, display_name="weekly eval", project_id="proj-1", user_metadata={"team": "rl"})
    plain = new_session(api)
    client.post(f"/api/v1/sessions/{weekly}/finish", json={"reason": {"type": "errored"}})

    assert found(client) == [plain, weekly, nightly], "newest first, the caller's own by default"
    assert found(client, display_name="EVAL") == [weekly, nightly], "case-insensitive substring"
    assert found(client, display_name="run nightly") == [nightly], "every word, in any order"
    assert found(client, display_name="nightly", session_id=plain) == [plain, nightly], "either one"
    assert found(client, session_id=weekly) == [weekly]
    assert found(client, user_metadata={"team": "rl", "step": "3"}) == [nightly], "every pair, as strings"
    assert found(client, project_ids=["proj-1", "proj-2"]) == [weekly]
    assert found(client, statuses=[{"type": "active"}]) == [plain, nightly]
    assert found(client, statuses=[{"type": "client_finished", "reasons": ["errored"]}]) == [weekly]
    assert found(client, statuses=[{"type": "client_finished", "reasons": ["success"]}]) == []
    assert found(client, statuses=[{"type": "failed"}, {"type": "cancelled"}]) == []

    summary = search(client, session_id=weekly).sessions[0]
    assert (summary.project_id, summary.display_name) == ("proj-1", "weekly eval")
    assert summary.user_metadata == {"team": "rl"}
    assert summary.status == T.ClientSessionFinished(reason=T.ClientSessionFinishErrored())
    assert search(client, session_id=plain).sessions[0].project_id == ""
    assert search(client, session_id=plain).sessions[0].status == T.SessionActive()


def test_search_counts_checkpoints(api, client: TestClient) -> None:
    session, _, _ = trained_run(api)
    summary = search(client, session_id=session).sessions[0]
    assert summary.checkpoints_count == 2 and summary.checkpoint_storage_bytes > 0
    assert summary.owner == client.get("/api/v1/auth/apikey/me").json()["details"]["user_details"]["email"]


def test_search_pages_with_the_cursor(api, client: TestClient) -> None:
    sessions = [new_session(api, display_name=f"run {i}") for i in range(5)]
    newest_first = sessions[::-1]
    request: dict[str, Any] = {"limit": 2, "display_name": "run"}
    pages = []
    while True:
        page = search(client, **request)
        pages.append([s.session_id for s in page.sessions])
        if page.next_cursor is None:
            break
        request["cursor"] = page.next_cursor.model_dump(mode="json")
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    assert search(client, limit=5, display_name="run").next_cursor is None, "exactly exhausted: no cursor"


def test_search_never_shows_another_tenant(api, client: TestClient) -> None:
    mine = new_session(api, display_name="shared name")
    other = KeyedClient(client, OTHER_KEY)
    theirs = other.post("/api/v1/create_session", json={"display_name": "shared name"}).json()["session_id"]
    for owner in ({"type": "own"}, {"type": "accessible"}):
        assert found(client, owner=owner) == [mine]
        listed = other.post("/api/v1/sessions/search", json={"owner": owner}).json()["sessions"]
        assert [s["session_id"] for s in listed] == [theirs]
    me = search(client).sessions[0].owner
    assert found(client, owner={"type": "user", "owner_urns": [me]}) == [mine]
    assert found(client, owner={"type": "user", "owner_urns": ["someone"]}) == []
    assert found(client, session_id=theirs) == []


@pytest.mark.parametrize(
    "body",
    [
        {"limit": 0},
        {"limit": 201},
        {"display_name": ""},
        {"owner": {"type": "user", "owner_urns": []}},
        {"owner": {"type": "everyone"}},
        {"statuses": []},
        {"statuses": [{"type": "sleeping"}]},
        {"cursor": {"last_created_at": "yesterday", "last_session_id": "x"}},
        {"cursor": {"last_created_at": "2026-01-01T00:00:00", "last_session_id": "x"}},
        {"user_metadata": {"k": 1}},
        {"project_ids": [""]},
    ],
)
def test_bad_searches_are_400(client: TestClient, body: dict) -> None:
    response = client.post("/api/v1/sessions/search", json=body)
    assert response.status_code == 400 and response.json()["detail"], response.text


# ---- projects ---------------------------------------------------------------------------------


def runs_in(client: TestClient, project_id: str) -> list[str]:
    body = client.get(f"/api/v1/training_runs?project_id={project_id}").json()
    return [run.training_run_id for run in T.TrainingRunsResponse.model_validate(body).training_runs]


def test_assigning_a_project_moves_the_runs(api, client: TestClient) -> None:
    session = new_session(api, project_id="proj-a")
    model_id = api.model(session)
    assert runs_in(client, "proj-a") == [model_id] and runs_in(client, "proj-b") == []

    assert client.put(f"/api/v1/sessions/{session}/project", json={"project_id": "proj-b"}).status_code == 200
    assert runs_in(client, "proj-a") == [] and runs_in(client, "proj-b") == [model_id]
    assert found(client, project_ids=["proj-b"]) == [session]

    client.post(f"/api/v1/sessions/{session}/finish", json={})
    assert client.put(f"/api/v1/sessions/{session}/project", json={"project_id": "proj-c"}).status_code == 200
    assert runs_in(client, "proj-c") == [model_id], "an ended session can still be moved"


def test_bad_project_assignments(api, client: TestClient) -> None:
    session = new_session(api, project_id="proj-a")
    for body in ({}, {"project_id": ""}, {"project_id": None}, {"project_id": "x" * 201}, {"project_id": 5}):
        response = client.put(f"/api/v1/sessions/{session}/project", json=body)
        assert response.status_code == 400 and response.json()["detail"], body
    unknown = client.put("/api/v1/sessions/nope/project", json={"project_id": "p"})
    assert unknown.status_code == 404 and unknown.json()["detail"]
    other = KeyedClient(client, OTHER_KEY).put(f"/api/v1/sessions/{session}/project", json={"project_id": "p"})
    assert other.status_code == 404
    assert found(client, project_ids=["proj-a"]) == [session], "nothing moved"
    too_long = client.post("/api/v1/create_session", json={"project_id": "x" * 201})
    assert too_long.status_code == 400


# ---- traces -----------------------------------------------------------------------------------


def traced_session(api, client: TestClient) -> tuple[str, str, str]:
    """A session whose model ran a forward_backward, an optim_step, a failing load and a sample."""
    session = api.session()
    model_id = api.model(session)
    api.result(post_fwd(client, fwd_body(model_id, 1)).json()["request_id"])
    api.result(api.post("optim_step", optim(model_id, 2))["request_id"])
    missing = client.post(
        "/api/v1/load_weights",
        json={"model_id": model_id, "seq_id": 3, "path": "tinker://nope:train:0/weights/x", "optimizer": False},
    )
    assert missing.status_code == 404, missing.text
    body = {"session_id": session, "sampling_session_seq_id": 0, "base_model": "fake/tiny"}
    sampler_id = api.post("create_sampling_session", body)["sampling_session_id"]
    api.result(api.post("asample", sample_body(sampler_id, 1))["request_id"])
    return session, model_id, sampler_id


def export(client: TestClient, session: str) -> str:
    response = client.get(f"/api/v1/sessions/{session}/trace_export")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    return body["url"]


def test_trace_export_records_each_request(api, client: TestClient) -> None:
    session, model_id, sampler_id = traced_session(api, client)
    url = export(client, session)
    keyless = TestClient(client.app, raise_server_exceptions=False)
    downloaded = keyless.get(url)
    assert downloaded.status_code == 200 and int(downloaded.headers["content-length"]) == len(downloaded.content)
    assert "attachment" in downloaded.headers["content-disposition"]
    trace = downloaded.json()
    assert trace["otherData"]["session_id"] == session
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(names[e["tid"]], e["name"], e["args"]["outcome"]) for e in slices] == [
        (model_id, "create_model", "done"),
        (model_id, "forward_backward", "done"),
        (model_id, "optim_step", "done"),
        (sampler_id, "sample", "done"),
    ], "a request refused before it was accepted (the load) is not a traced request"
    assert all(e["dur"] >= 0 and e["ts"] > 1.7e15 and e["args"]["request_id"] for e in slices)
    assert [e["ts"] for e in slices] == sorted(e["ts"] for e in slices)


def test_trace_records_failures(api, client: TestClient, engine) -> None:
    session = api.session()
    model_id = api.model(session)
    engine.adapters.clear()  # the adapter is gone: the next step fails inside the engine
    failed = api.result(api.post("optim_step", optim(model_id, 1))["request_id"])
    assert failed["category"] == "user"
    trace = client.get(f"/api/v1/sessions/{session}/trace").json()
    step = [e for e in trace["traceEvents"] if e["name"] == "optim_step"][0]
    assert step["args"]["outcome"] == "failed" and step["args"]["error"] == failed["error"]
    assert step["cat"] == "failed"


def test_trace_links_and_tenancy(api, client: TestClient) -> None:
    session = api.session()
    other_session = api.session()
    url = export(client, session)
    keyless = TestClient(client.app, raise_server_exceptions=False)
    path, query = url.split("?", 1)
    assert keyless.get(f"{path}?{query}").status_code == 200
    assert keyless.get(url[:-1] + ("0" if url[-1] != "0" else "1")).status_code == 404, "tampered"
    assert keyless.get(url.replace("expires=", "expires=1")).status_code == 404, "another expiry"
    assert keyless.get(path.replace(session, other_session) + "?" + query).status_code == 404, "another session"
    assert keyless.get(path).status_code == 401, "no key and no signature"
    assert keyless.get(f"{path}_export?{query}").status_code == 401, "the signature opens the trace only"
    assert client.get("/api/v1/sessions/nope/trace_export").status_code == 404
    other = KeyedClient(client, OTHER_KEY)
    assert other.get(f"/api/v1/sessions/{session}/trace_export").status_code == 404
    assert other.get(f"/api/v1/sessions/{session}/trace").status_code == 404
    empty = client.get(f"/api/v1/sessions/{session}/trace").json()
    assert [e for e in empty["traceEvents"] if e["ph"] == "X"] == []
