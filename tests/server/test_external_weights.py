"""`external_weights` checkpoints (`save_weights_external`) and their signed download URLs,
checked with the SDK's own response models: what is saved, who may sign, what a signature
opens (one file, until it expires, without an API key), and that bad input is a clear 4xx."""

from __future__ import annotations

import stat
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.testclient import TestClient
from test_auth import OTHER_KEY, KeyedClient
from test_training_routes import optim
from tinker import types as T

from server import cli
from server.checkpoint_files import COMPLETE_MARKER, tree_size
from server.paths import parse_tinker_path
from server.url_signing import SECRET_FILE, UrlSigner

FILES = ["adapter_config.json", "adapter_model.safetensors", COMPLETE_MARKER]


def export(api, model_id: str, name: str = "final", seq_id: int = 1, **fields) -> dict:
    future = api.post("save_weights_external", {"model_id": model_id, "path": name, "seq_id": seq_id, **fields})
    return api.result(future["request_id"])


def run_url(model_id: str) -> str:
    return f"/api/v1/training_runs/{model_id}"


def urls_of(client: TestClient, model_id: str, name: str = "final") -> T.ExternalWeightsUrlsResponse:
    response = client.get(f"{run_url(model_id)}/checkpoints/external_weights/{name}/external_weights_urls")
    assert response.status_code == 200, response.text
    return T.ExternalWeightsUrlsResponse.model_validate(response.json())


@pytest.fixture
def keyless(client: TestClient) -> TestClient:
    """The same running app, sending no API key."""
    return TestClient(client.app, raise_server_exceptions=False)


@pytest.fixture
def exported(api) -> str:
    model_id = api.model(api.session(), rank=4)
    export(api, model_id)
    return model_id


def test_export_is_a_listed_peft_directory(api, client: TestClient, engine, tmp_path) -> None:
    model_id = api.model(api.session(), rank=4)
    result = T.SaveWeightsExternalResponseInternal.model_validate(export(api, model_id, ttl_seconds=7200))
    path = f"tinker://{model_id}/external_weights/final"
    directory = tmp_path / "checkpoints" / model_id / "external_weights" / "final"
    assert result.path == path and result.size_bytes == tree_size(directory)
    assert sorted(p.name for p in directory.iterdir()) == FILES, "the PEFT files and the marker, no Orbax state"
    assert (directory / COMPLETE_MARKER).read_bytes() == b""

    listing = client.get(f"{run_url(model_id)}/checkpoints").json()
    (listed,) = T.CheckpointsListResponse.model_validate(listing).checkpoints
    assert (listed.checkpoint_id, listed.checkpoint_type, listed.tinker_path) == (
        "external_weights/final", "external", path
    )
    assert listed.expires_at is not None
    assert 7100 < (listed.expires_at - datetime.now(UTC)).total_seconds() <= 7200
    info = T.WeightsInfoResponse.model_validate(api.post("weights_info", {"tinker_path": path}))
    assert (info.base_model, info.lora_rank) == (engine.name, 4)


def test_signed_urls_download_without_a_key(client: TestClient, keyless: TestClient, exported: str, tmp_path) -> None:
    before = datetime.now(UTC)
    signed = urls_of(client, exported)
    options = client.app.state.service.options
    lifetime = signed.expires - before.replace(microsecond=0)
    assert timedelta(0) <= lifetime <= timedelta(seconds=options.download_url_s + 1)
    assert sorted(signed.urls) == FILES
    directory = tmp_path / "checkpoints" / exported / "external_weights" / "final"
    for name, url in signed.urls.items():
        assert url.startswith(f"http://testserver{run_url(exported)}/checkpoints/external_weights/final/files/{name}?")
        response = keyless.get(url)
        assert response.status_code == 200, response.text
        assert response.content == (directory / name).read_bytes()
        assert response.headers["content-length"] == str((directory / name).stat().st_size)
    unsigned = signed.urls[FILES[0]].split("?")[0]
    assert keyless.get(unsigned).status_code == 401, "without a signature the API key is required"
    assert client.get(unsigned).status_code == 200, "the owner may fetch a file with its key"


def test_tampered_or_expired_signatures_are_403(client: TestClient, keyless: TestClient, exported: str) -> None:
    signed = urls_of(client, exported).urls
    url = signed["adapter_config.json"]
    base, query = url.split("?")
    expires, sig = parse_qs(query)["expires"][0], parse_qs(query)["sig"][0]
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    signer = client.app.state.service.url_signer
    path = urlsplit(base).path
    forged = [
        f"{base}?expires={expires}&sig={flipped}",
        f"{base}?expires={int(expires) + 3600}&sig={sig}",
        f"{base}?sig={sig}",
        f"{base}?expires=soon&sig={sig}",
        f"{base.replace('adapter_config.json', 'adapter_model.safetensors')}?{query}",
        f"{base}?{signer.query(path, int(time.time()) - 1)}",
    ]
    for bad in forged:
        response = keyless.get(bad)
        assert response.status_code == 403 and "expired" in response.json()["detail"], (bad, response.text)
    assert keyless.get(url).status_code == 200


def test_urls_stop_working_with_their_checkpoint(api, client: TestClient, keyless: TestClient, exported: str) -> None:
    url = urls_of(client, exported).urls["adapter_config.json"]
    service = client.app.state.service
    ref = parse_tinker_path(f"tinker://{exported}/external_weights/final")
    service.store.set_checkpoint_expiry(ref, datetime.now(UTC) - timedelta(seconds=1))
    assert keyless.get(url).status_code == 404, "an expired checkpoint"
    service.store.set_checkpoint_expiry(ref, None)
    assert client.delete(f"{run_url(exported)}/checkpoints/external_weights/final").status_code == 200
    assert keyless.get(url).status_code == 404, "a deleted checkpoint"
    export(api, exported, seq_id=2)
    assert keyless.get(url).status_code == 200, "the same owner saved it again under the same name"


def test_signing_key_is_made_once_and_repaired(tmp_path) -> None:
    first = UrlSigner.load_or_create(tmp_path / "state")
    assert UrlSigner.load_or_create(tmp_path / "state") == first
    (tmp_path / "state" / SECRET_FILE).write_text("not a key")
    repaired = UrlSigner.load_or_create(tmp_path / "state")
    assert len(repaired.secret) == 32 and repaired != first
    assert [p.name for p in (tmp_path / "state").iterdir()] == [SECRET_FILE], "no temporary files left"


def test_signing_key_persists_across_restarts(make_client, make_api, engine, tmp_path) -> None:
    """One key signs every kind of download URL: file, archive and trace links all survive."""
    root = tmp_path / "checkpoints"
    with make_client(engine, root) as first:
        session = make_api(first).session()
        model_id = make_api(first).model(session)
        export(make_api(first), model_id)
        url = urls_of(first, model_id).urls["adapter_config.json"]
        archive = f"{run_url(model_id)}/checkpoints/external_weights/final/archive"
        archive_link = first.get(archive, headers={"Accept": "application/json"}).json()["url"]
        trace_link = first.get(f"/api/v1/sessions/{session}/trace_export").json()["url"]
    assert stat.S_IMODE((root / SECRET_FILE).stat().st_mode) == 0o600
    with make_client(engine, root, api_key=None) as restarted:
        assert [restarted.get(link).status_code for link in (url, archive_link, trace_link)] == [200] * 3
    with make_client(engine, tmp_path / "elsewhere", api_key=None) as other_server:
        assert other_server.get(url).status_code == 403, "another server's key does not verify"
        assert other_server.get(trace_link).status_code == 404


def test_public_url_names_the_address_clients_use(engine, make_client, make_api) -> None:
    with make_client(engine, public_url="https://tuft.example.com/tinker/") as client:
        api = make_api(client)
        model_id = api.model(api.session())
        export(api, model_id)
        url = urls_of(client, model_id).urls["adapter_config.json"]
        prefix = "https://tuft.example.com/tinker/api/v1/training_runs/"
        assert url.startswith(prefix), url
        behind_the_proxy = "/api/v1/training_runs/" + url[len(prefix) :]  # the proxy strips its prefix
        assert TestClient(client.app).get(behind_the_proxy).status_code == 200


def test_public_url_must_be_http(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.parse_args(["--public-url", "https://tuft.example.com"]).public_url == "https://tuft.example.com"
    with pytest.raises(SystemExit):
        cli.parse_args(["--public-url", "tuft.example.com"])
    assert "--public-url must start with http:// or https://" in capsys.readouterr().err


def test_another_tenant_sees_nothing(client: TestClient, keyless: TestClient, exported: str) -> None:
    other = KeyedClient(client, OTHER_KEY)
    checkpoint = f"{run_url(exported)}/checkpoints/external_weights/final"
    refused = [
        other.get(f"{checkpoint}/external_weights_urls"),
        other.get(f"{checkpoint}/files/adapter_config.json"),
        other.put(f"{checkpoint}/ttl", json={"ttl_seconds": 3600}),
        other.delete(checkpoint),
    ]
    assert [r.status_code for r in refused] == [404] * len(refused), [r.text for r in refused]
    assert all(r.json()["detail"] for r in refused)
    assert [c["checkpoint_id"] for c in client.get("/api/v1/checkpoints").json()["checkpoints"]] == [
        "external_weights/final"
    ]
    assert client.post(f"{checkpoint}/publish").status_code == 200
    public = T.ExternalWeightsUrlsResponse.model_validate(other.get(f"{checkpoint}/external_weights_urls").json())
    assert sorted(public.urls) == FILES, "a published export can be downloaded by everyone"


def test_bad_requests_are_clear_4xx(api, client: TestClient, exported: str) -> None:
    checkpoint = f"{run_url(exported)}/checkpoints/external_weights/final"
    weights = f"{run_url(exported)}/checkpoints/weights/final"
    export_path = f"tinker://{exported}/external_weights/final"
    model_id = api.model(api.session())
    cases = {
        "duplicate name": client.post(
            "/api/v1/save_weights_external", json={"model_id": exported, "path": "final", "seq_id": 2}
        ),
        "no name": client.post("/api/v1/save_weights_external", json={"model_id": model_id, "seq_id": 1}),
        "zero ttl": client.post(
            "/api/v1/save_weights_external", json={"model_id": model_id, "path": "x", "ttl_seconds": 0, "seq_id": 2}
        ),
        "encrypted": client.post(
            "/api/v1/save_weights_external",
            json={"model_id": model_id, "path": "x", "age_encryption_recipients": [], "seq_id": 3},
        ),
        "dot file": client.get(f"{checkpoint}/files/.url-signing-key"),
        "urls of a weights checkpoint": client.get(f"{weights}/external_weights_urls"),
        "files of a weights checkpoint": client.get(f"{weights}/files/adapter.json"),
        "load as training": client.post(
            "/api/v1/load_weights", json={"model_id": model_id, "seq_id": 4, "path": export_path}
        ),
        "load as sampler": client.post(
            "/api/v1/create_sampling_session",
            json={"session_id": api.session(), "sampling_session_seq_id": 0, "model_path": export_path},
        ),
    }
    for case, response in cases.items():
        assert response.status_code == 400 and response.json()["detail"], (case, response.text)
    assert "already exists" in cases["duplicate name"].json()["detail"]
    assert "cannot be loaded" in cases["load as sampler"].json()["detail"]
    missing = [client.get(f"{checkpoint}/files/missing.bin"), client.get(f"{checkpoint}/files/a/b")]
    assert [r.status_code for r in missing] == [404, 404]
    later = api.post("optim_step", optim(model_id, 5))
    assert "metrics" in api.result(later["request_id"]), "the refusals consumed their seq_ids"
