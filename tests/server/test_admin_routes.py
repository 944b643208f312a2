"""Usage metering, billing views, the audit log and per-key quotas over the fake engine; bodies
read with the SDK's own models (what `AdminClient` and `tinker billing` parse)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from conftest import Api
from starlette.testclient import TestClient
from test_sampling_routes import base_sampler, sample_body
from test_training_routes import fwd_body, post_fwd
from tinker import types as T

from server.api_keys import create_api_key
from server.store import Quota
from server.store_sql import SqlStore


def window(hours_before: int = 1, hours_after: int = 1) -> str:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=hours_before), hour + timedelta(hours=hours_after)
    return f"starting_on={start.isoformat()}&ending_before={end.isoformat()}".replace("+00:00", "Z")


def usage(client: TestClient) -> T.BillingUsageResponse:
    response = client.get(f"/api/v1/billing/usage/events?{window()}")
    assert response.status_code == 200, response.text
    return T.BillingUsageResponse.model_validate(response.json())


def token_totals(report: T.BillingUsageResponse) -> Counter[str]:
    totals: Counter[str] = Counter()
    for row in report.data:
        info = row.event_info
        totals[info.type] += getattr(info, "token_count", 0) or getattr(info, "count", 0)
    return totals


def trained(api: Api, client: TestClient, *lengths: int) -> tuple[str, str]:
    session = api.session()
    model_id = api.model(session)
    for seq_id, length in enumerate(lengths, start=1):
        response = post_fwd(client, fwd_body(model_id, seq_id, tokens=list(range(1, length + 1))))
        assert response.status_code == 200, response.text
        api.result(response.json()["request_id"])
    return session, model_id


def test_usage_counts_exactly_the_tokens_sent(api: Api, client: TestClient) -> None:
    session, _ = trained(api, client, 4, 6)
    sampler = base_sampler(api)
    api.result(api.post("asample", sample_body(sampler, 0, prompt=[5, 6, 7], sampling={"max_tokens": 3}))["request_id"])

    report = usage(client)
    assert token_totals(report) == {"training": 10, "sampling_prefill": 3, "sampling_sample": 6}
    training = [row for row in report.data if row.event_info.type == "training"]
    assert [row.session_id for row in training] == [session]
    assert training[0].base_model == "fake/tiny" and training[0].bucket_end - training[0].bucket_start == timedelta(hours=1)
    assert set(report.sessions) == {session, sampler.split(":")[0]}


def test_failed_requests_count_nothing(api: Api, client: TestClient, engine) -> None:
    session = api.session()
    model_id = api.model(session)
    engine.adapters.clear()  # the adapter is gone: the forward_backward fails on the engine
    api.result(post_fwd(client, fwd_body(model_id, 1)).json()["request_id"])
    assert token_totals(usage(client))["training"] == 0


def test_checkpoint_saves_and_storage_are_billed(api: Api, client: TestClient) -> None:
    session, model_id = trained(api, client, 4)
    for seq_id, (route, name) in enumerate([("save_weights", "a"), ("save_weights_for_sampler", "b")], start=2):
        api.result(api.post(route, {"model_id": model_id, "path": name, "seq_id": seq_id})["request_id"])

    report = usage(client)
    saves = [row for row in report.data if row.event_info.type == "checkpoint"]
    assert [(row.session_id, row.event_info.count) for row in saves] == [(session, 2)]
    storage = [row for row in report.data if row.event_info.type == "storage"]
    assert storage and all(row.event_info.gigabyte_hours > 0 for row in storage)

    current = T.CurrentCheckpointStorageUsageResponse.model_validate(
        client.get("/api/v1/billing/usage/checkpoints/current").json()
    )
    listed = client.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()["checkpoints"]
    assert [(row.checkpoint_count, row.size_bytes) for row in current.data] == [
        (2, sum(c["size_bytes"] for c in listed))
    ]
    client.put(f"/api/v1/sessions/{session}/project", json={"project_id": "p1"})
    by_project = client.get("/api/v1/billing/usage/checkpoints/current?project_id=p1").json()
    assert [row["project_id"] for row in by_project["data"]] == ["p1"]
    assert client.get("/api/v1/billing/usage/checkpoints/current?project_id=p2").json()["data"] == []


def test_storage_is_size_times_lifetime(tmp_path: Path) -> None:
    """3.6 GB held for the two hours before its deletion: 7.2 gigabyte-hours over three buckets."""
    from server import billing
    from server.paths import CheckpointRef
    from server.store import CheckpointRecord

    store = SqlStore.sqlite(tmp_path / "ledger.db")
    now = datetime.now(UTC)
    ref = CheckpointRef("s:train:0", "weights", "big")
    store.put_checkpoint(CheckpointRecord(ref, "owner", now - timedelta(hours=2), 3_600_000_000, base_model="m"))
    store.delete_checkpoint(ref)
    hour = now.replace(minute=0, second=0, microsecond=0)
    built = billing.usage_report(store, "owner", hour - timedelta(hours=3), hour + timedelta(hours=1), datetime.now(UTC))
    report = T.BillingUsageResponse.model_validate_json(msgspec.json.encode(built))
    storage = [row for row in report.data if row.event_info.type == "storage"]
    assert 2 <= len(storage) <= 3
    assert sum(row.event_info.gigabyte_hours for row in storage) == pytest.approx(7.2, rel=1e-3)
    assert billing.storage_now(store, "owner", None, datetime.now(UTC)).data == []


def test_audit_log_records_checkpoint_and_project_events(api: Api, client: TestClient) -> None:
    session, model_id = trained(api, client, 4)
    api.result(api.post("save_weights", {"model_id": model_id, "path": "a", "seq_id": 2})["request_id"])
    path = f"tinker://{model_id}/weights/a"
    base = f"/api/v1/training_runs/{model_id}/checkpoints/weights/a"
    client.post(f"{base}/publish")
    client.delete(f"{base}/publish")
    client.put(f"{base}/ttl", json={"ttl_seconds": 3600})
    api.result(api.post("load_weights", {"model_id": model_id, "path": path, "seq_id": 3, "optimizer": False})["request_id"])
    client.delete(base)
    client.put(f"/api/v1/sessions/{session}/project", json={"project_id": "p1"})

    log = T.AuditLogResponse.model_validate(client.get("/api/v1/audit").json())
    assert [entry.event for entry in log.entries] == [
        "checkpoint_create",
        "checkpoint_publish",
        "checkpoint_unpublish",
        "checkpoint_ttl_set",
        "checkpoint_read",
        "checkpoint_delete",
        "project_session_assign",
    ]
    read = log.entries[4]
    assert (read.tinker_path, read.model_id, read.purpose) == (path, model_id, "load_weights")
    assert log.entries[5].event_details["reason"] == "deleted"
    assert log.entries[6].event_details == {"session_id": session, "project_id": "p1", "previous_project_id": None}

    only = lambda kind: [e["event"] for e in client.get(f"/api/v1/audit?event_type={kind}").json()["entries"]]  # noqa: E731
    assert only("projects") == ["project_session_assign"]
    assert len(only("checkpoints")) == 6 and only("teams") == only("organizations") == []
    assert client.get("/api/v1/audit?day=2020-01-01").json() == {"entries": []}
    for bad in ("event_type=everything", "day=yesterday"):
        response = client.get(f"/api/v1/audit?{bad}")
        assert response.status_code == 400 and response.json()["detail"]


@pytest.mark.parametrize(
    "query, named",
    [
        ("starting_on=2026-01-01T00:30:00Z&ending_before=2026-01-02T00:00:00Z", "hour boundary"),
        ("starting_on=2026-01-02T00:00:00Z&ending_before=2026-01-01T00:00:00Z", "after starting_on"),
        ("starting_on=2026-01-01T00:00:00Z&ending_before=2026-01-16T00:00:00Z", "14 days"),
        ("starting_on=2999-01-01T00:00:00Z&ending_before=2999-01-02T00:00:00Z", "future"),
        ("starting_on=soon&ending_before=2026-01-02T00:00:00Z", "RFC 3339"),
        ("ending_before=2026-01-02T00:00:00Z", "required"),
    ],
)
def test_bad_usage_windows_are_400(client: TestClient, query: str, named: str) -> None:
    response = client.get(f"/api/v1/billing/usage/events?{query}")
    assert response.status_code == 400 and named in response.json()["detail"]


# ---- quotas -----------------------------------------------------------------------------------


@pytest.fixture
def keyed(make_client, engine, tmp_path: Path) -> Iterator[tuple[TestClient, SqlStore, str]]:
    """A client with a registered key (quotas apply to registered keys), its store and key id."""
    store = SqlStore.sqlite(tmp_path / "checkpoints" / "tuft.db")
    key, record = create_api_key(store, "limited")
    with make_client(engine, api_key=key, auth="required", auth_cache_s=0.0) as client:
        yield client, store, record.key_id


def test_token_quota_is_a_429_that_keeps_the_seq_id(keyed, make_api) -> None:
    client, store, key_id = keyed
    api = make_api(client)
    model_id = api.model(api.session())
    store.set_quota(key_id, Quota(max_tokens_per_day=6))
    api.result(post_fwd(client, fwd_body(model_id, 1)).json()["request_id"])  # 4 of 6 tokens
    refused = post_fwd(client, fwd_body(model_id, 2))
    assert refused.status_code == 429
    assert "6 tokens per day" in refused.json()["detail"] and "used 4" in refused.json()["detail"]
    sampler = base_sampler(api)
    over = client.post("/api/v1/asample", json=sample_body(sampler, 0, prompt=[5, 6, 7]))
    assert over.status_code == 429 and "quota" in over.json()["detail"]

    store.set_quota(key_id, Quota(max_tokens_per_day=100))
    retried = post_fwd(client, fwd_body(model_id, 2))  # the same seq_id, as the SDK retries it
    assert retried.status_code == 200
    api.result(retried.json()["request_id"])
    assert token_totals(usage(client))["training"] == 8


def test_concurrent_runs_quota(keyed, make_api) -> None:
    client, store, key_id = keyed
    api = make_api(client)
    store.set_quota(key_id, Quota(max_concurrent_runs=1))
    session = api.session()
    api.model(session, model_seq_id=0)
    body = {"session_id": session, "model_seq_id": 1, "base_model": "fake/tiny", "lora_config": {"rank": 4}}
    refused = client.post("/api/v1/create_model", json=body)
    assert refused.status_code == 429 and "at most 1 training run" in refused.json()["detail"]
    client.post(f"/api/v1/sessions/{session}/finish", json={})
    api.model(api.session())


def test_openai_compatible_sampling_is_metered_outside_any_session(make_client, text_engine) -> None:
    with make_client(text_engine) as client:
        body = {"model": "fake/tiny", "prompt": [5, 6, 7], "max_tokens": 3, "n": 2}
        completion = client.post("/oai/api/v1/completions", json=body)
        assert completion.status_code == 200, completion.text
        report = usage(client)
    assert token_totals(report) == {"sampling_prefill": 3, "sampling_sample": completion.json()["usage"]["completion_tokens"]}
    assert {row.session_id for row in report.data} == {None} and report.sessions == {}


def test_a_checkpoint_served_to_many_completions_is_read_once(make_client, make_api, text_engine) -> None:
    with make_client(text_engine) as client:
        api = make_api(client)
        model_id = api.model(api.session())
        future = api.post("save_weights_for_sampler", {"model_id": model_id, "path": "s", "seq_id": 1})
        path = api.result(future["request_id"])["path"]
        for _ in range(3):
            body = {"model": path, "prompt": [5, 6], "max_tokens": 2}
            assert client.post("/oai/api/v1/completions", json=body).status_code == 200
        reads = client.get("/api/v1/audit?event_type=checkpoints").json()["entries"]
    assert [(e["event"], e.get("purpose")) for e in reads if e["event"] == "checkpoint_read"] == [("checkpoint_read", "sampling")]
