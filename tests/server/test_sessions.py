"""Session lifecycle and the id formats the SDK depends on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from server import auth
from server.errors import Gone, NotFound
from server.sessions import OWNER, Sessions, model_id_for, sampler_id_for
from server.store_sql import SqlStore
from server.wire.types import CreateSessionRequest


def test_id_formats() -> None:
    assert model_id_for("s", 3) == "s:train:3"
    assert sampler_id_for("s", 0) == "s:sample:0"


def test_lifecycle_and_expiry() -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = SqlStore.sqlite(":memory:")
    sessions = Sessions(store, timeout_s=30, clock=lambda: now[0])
    record = sessions.create(CreateSessionRequest(tags=["a"], user_metadata={"k": 1}, display_name="run"))
    uuid.UUID(record.session_id)
    assert store.get_session(record.session_id) == record
    quiet = sessions.create(CreateSessionRequest())

    now[0] += timedelta(seconds=20)
    sessions.heartbeat(record.session_id)
    now[0] += timedelta(seconds=20)
    assert sessions.expired() == [quiet.session_id]

    assert sessions.finish(quiet.session_id, "expired")
    assert not sessions.finish(quiet.session_id, "success")
    assert sessions.expired() == []
    with pytest.raises(Gone):
        sessions.heartbeat(quiet.session_id)
    with pytest.raises(NotFound):
        sessions.heartbeat("missing")
    assert sessions.require_active(record.session_id).display_name == "run"


def test_sessions_belong_to_the_caller() -> None:
    store = SqlStore.sqlite(":memory:")
    sessions = Sessions(store, timeout_s=30)
    token = auth._owner.set("alice")
    try:
        mine = sessions.create(CreateSessionRequest())
        assert mine.owner == "alice" and sessions.get(mine.session_id) == mine
    finally:
        auth._owner.reset(token)
    token = auth._owner.set("bob")
    try:
        with pytest.raises(NotFound):
            sessions.get(mine.session_id)
        with pytest.raises(NotFound):
            sessions.heartbeat(mine.session_id)
        assert not store.get_session(mine.session_id).finished
    finally:
        auth._owner.reset(token)
    assert sessions.get(mine.session_id).owner == "alice", "no caller (background work): no filtering"
    assert sessions.create(CreateSessionRequest()).owner == OWNER
