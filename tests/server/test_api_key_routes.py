"""`/api/v1/auth/apikey/me`: what `tinker auth login` reads about a key, and revoking it."""

from __future__ import annotations

from pathlib import Path

from tinker.cli.auth_api import SelfApiKeyResponse

from server.api_keys import anonymous_owner, create_api_key
from server.store_sql import SqlStore

ME = "/api/v1/auth/apikey/me"


def test_a_registered_key(make_client, engine, tmp_path: Path) -> None:
    store = SqlStore.sqlite(tmp_path / "checkpoints" / "tuft.db")
    key, record = create_api_key(store, "laptop")
    other_key, _ = create_api_key(store, "ci")
    with make_client(engine, api_key=None, auth="required", auth_cache_s=0.0) as client:
        me = SelfApiKeyResponse.model_validate(client.get(ME, headers={"X-API-Key": key}).json())
        assert (me.key_id, me.name, me.note) == (int(record.key_id, 16), "laptop", "")
        assert me.details.user_details.email == record.key_id, "the owner id stands for the user"
        assert me.details.org_details.name

        for headers in ({}, {"X-API-Key": "tml-unknown"}, {"X-API-Key": key[:-1] + "x"}):
            refused = client.get(ME, headers=headers)
            assert refused.status_code == 401 and refused.json()["detail"], headers

        assert client.delete(ME, headers={"X-API-Key": key}).status_code == 200
        assert client.get(ME, headers={"X-API-Key": key}).status_code == 401, "revoked"
        assert store.get_api_key(record.key_id).revoked_at is not None
        assert client.get(ME, headers={"X-API-Key": other_key}).status_code == 200, "only the presented key"


def test_an_unregistered_key_in_open_mode(make_client, engine) -> None:
    with make_client(engine, api_key="tml-anything", auth="open") as client:
        me = SelfApiKeyResponse.model_validate(client.get(ME).json())
        assert me.key_id == int(anonymous_owner("tml-anything").removeprefix("anon-"), 16)
        assert me.details.user_details.email == anonymous_owner("tml-anything")
        assert "unregistered" in me.note
        refused = client.delete(ME)
        assert refused.status_code == 400 and "nothing to revoke" in refused.json()["detail"]
        assert client.get(ME).status_code == 200
