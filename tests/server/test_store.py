"""The SQL store on SQLite: every record kind round-trips, listings page and filter, writes
survive reopening the file, and the URL / driver / schema checks fail clearly."""

from __future__ import annotations

import math
import sqlite3
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.paths import CheckpointRef
from server.store import (
    ApiKeyRecord,
    CheckpointRecord,
    CheckpointTotals,
    SamplerRecord,
    SessionCursor,
    SessionRecord,
    TrainingRunRecord,
)
from server.store_sql import SqlStore, StoreError, default_database_url, dialect_for, redact
from tuft_jax.types import LoraConfig

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def session(session_id: str, owner: str = "alice", **changes) -> SessionRecord:
    record = SessionRecord(session_id, owner, T0, T0, "0.38.0", ("a", "b"), {"k": 1}, "proj", "name")
    return replace(record, **changes)


def run(model_id: str, session_id: str = "s1", owner: str = "alice") -> TrainingRunRecord:
    return TrainingRunRecord(model_id, session_id, owner, "base", LoraConfig(rank=4, train_mlp=False), T0, T0, {"x": "y"})


def checkpoint(model_id: str, name: str, owner: str = "alice", kind: str = "weights", **changes) -> CheckpointRecord:
    record = CheckpointRecord(
        CheckpointRef(model_id, kind, name), owner, T0, 123, {"m": "v"}, None, base_model="base", lora=LoraConfig(rank=4)
    )
    return replace(record, **changes)


@pytest.fixture
def store(tmp_path: Path) -> SqlStore:
    store = SqlStore.sqlite(tmp_path / "db" / "tuft.db")
    yield store
    store.close()


def test_sessions(store: SqlStore) -> None:
    store.put_session(session("s1"))
    store.put_session(session("s2", owner="bob"))
    store.put_session(session("s3"))
    assert store.get_session("s1") == session("s1")
    assert store.get_session("nope") is None

    page = store.list_sessions(owner="alice", limit=1, offset=1)
    assert [s.session_id for s in page.items] == ["s3"] and page.total == 2
    assert [s.session_id for s in store.list_sessions().items] == ["s1", "s2", "s3"]

    store.put_session(session("s1", last_heartbeat=T0 + timedelta(seconds=5), finished="success"))
    assert store.get_session("s1").last_heartbeat == T0 + timedelta(seconds=5)
    assert [s.session_id for s in store.list_sessions().items] == ["s1", "s2", "s3"], "an update keeps the order"
    assert [s.session_id for s in store.active_sessions()] == ["s2", "s3"]
    assert store.end_active_sessions("server_restarted") == 2
    assert store.active_sessions() == [] and store.get_session("s2").finished == "server_restarted"


def test_sessions_newest_first(store: SqlStore) -> None:
    """Search pages: the owner's sessions by creation time then id, descending, in the given
    projects, resuming after a cursor."""
    later = T0 + timedelta(seconds=1)
    for session_id, created, project in [("a", T0, "p1"), ("b", later, "p2"), ("c", later, None), ("d", T0, "p1")]:
        store.put_session(session(session_id, created_at=created, project_id=project))
    store.put_session(session("x", owner="bob", created_at=later))

    def ids(**kwargs) -> list[str]:
        return [s.session_id for s in store.sessions_newest_first("alice", limit=10, **kwargs)]

    assert ids() == ["c", "b", "d", "a"]
    assert [s.session_id for s in store.sessions_newest_first("alice", limit=2)] == ["c", "b"]
    assert ids(after=SessionCursor(later, "b")) == ["d", "a"]
    assert ids(after=SessionCursor(later, "c")) == ["b", "d", "a"]
    assert ids(project_ids=["p1"]) == ["d", "a"]
    assert ids(project_ids=["p2", "p1"], after=SessionCursor(T0, "d")) == ["a"]
    assert ids(project_ids=[]) == []


def test_session_checkpoint_totals(store: SqlStore) -> None:
    store.put_training_run(run("s1:train:0", "s1"))
    store.put_training_run(run("s1:train:1", "s1"))
    store.put_training_run(run("s2:train:0", "s2"))
    store.put_checkpoint(checkpoint("s1:train:0", "a"))
    store.put_checkpoint(checkpoint("s1:train:1", "b", size_bytes=None))
    store.put_checkpoint(checkpoint("s1:train:1", "c", kind="sampler_weights", size_bytes=7))
    store.put_checkpoint(checkpoint("s2:train:0", "gone", expires_at=T0))
    totals = store.session_checkpoint_totals(["s1", "s2", "s3"], T0)
    assert totals == {"s1": CheckpointTotals(3, 130)}, "expired checkpoints and empty sessions are left out"
    assert store.session_checkpoint_totals([], T0) == {}


def test_weight_copies(store: SqlStore) -> None:
    assert store.get_weight_copy("alice", "k1") is None
    store.add_weight_copy("alice", "k1", "tinker://s:train:0/weights/a", T0)
    assert store.get_weight_copy("alice", "k1") == "tinker://s:train:0/weights/a"
    assert store.get_weight_copy("bob", "k1") is None, "keys are per owner"


def test_a_database_from_before_weight_copies_gains_the_table(tmp_path: Path) -> None:
    path = tmp_path / "tuft.db"
    SqlStore.sqlite(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE weight_copies")
    reopened = SqlStore.sqlite(path)
    reopened.add_weight_copy("alice", "k", "tinker://s:train:0/weights/a", T0)
    assert reopened.get_weight_copy("alice", "k") == "tinker://s:train:0/weights/a"
    assert reopened._one("SELECT version FROM schema_version")[0] == 1
    reopened.close()


def test_training_runs_and_samplers(store: SqlStore) -> None:
    store.put_session(session("s1"))
    store.put_session(session("s2", owner="bob", project_id="other"))
    store.put_training_run(run("s1:train:0"))
    store.put_training_run(run("s2:train:0", "s2", "bob"))
    assert store.get_training_run("s1:train:0") == run("s1:train:0")
    assert [r.model_id for r in store.session_training_runs("s1")] == ["s1:train:0"]
    assert store.list_training_runs().total == 2
    assert [r.model_id for r in store.list_training_runs(owner="alice").items] == ["s1:train:0"]
    assert [r.model_id for r in store.list_training_runs(owner="alice", project_id="other").items] == []
    assert [r.model_id for r in store.list_training_runs(project_id="other").items] == ["s2:train:0"]

    # Bob's run becomes accessible to Alice once it has a live public checkpoint.
    assert store.list_training_runs(owner="alice", include_public=T0).total == 1
    store.put_checkpoint(checkpoint("s2:train:0", "c", "bob", public=True, expires_at=T0 + timedelta(hours=1)))
    assert store.list_training_runs(owner="alice", include_public=T0).total == 2
    assert store.list_training_runs(owner="alice", include_public=T0 + timedelta(hours=2)).total == 1

    later = T0 + timedelta(minutes=3)
    store.touch_training_run("s1:train:0", later)
    assert store.get_training_run("s1:train:0").last_request_time == later
    store.touch_training_run("missing", later)  # no error

    store.put_sampler(SamplerRecord("s1:sample:0", "s1", "base", T0))
    store.put_sampler(SamplerRecord("s1:sample:1", "s1", "base", T0, "tinker://s1:train:0/sampler_weights/x", "carol"))
    assert store.get_sampler("s1:sample:0").owner == "alice", "owner defaults to the session's"
    assert store.get_sampler("s1:sample:1").owner == "carol"
    assert [s.sampler_id for s in store.session_samplers("s1")] == ["s1:sample:0", "s1:sample:1"]
    assert store.get_sampler("nope") is None


def test_checkpoints(store: SqlStore) -> None:
    a = checkpoint("m:train:0", "a")
    b = checkpoint("m:train:0", "b", kind="sampler_weights")
    c = checkpoint("n:train:0", "c", owner="bob")
    for record in (a, b, c):
        store.put_checkpoint(record)
    assert store.get_checkpoint(a.ref) == a
    assert store.get_checkpoint(CheckpointRef("m:train:0", "weights", "zzz")) is None
    assert [r.ref.name for r in store.list_checkpoints(model_id="m:train:0").items] == ["a", "b"]
    page = store.list_checkpoints(owner="alice", limit=1, offset=1)
    assert [r.ref.name for r in page.items] == ["b"] and page.total == 2
    assert [r.ref.name for r in store.list_checkpoints(offset=2).items] == ["c"]

    store.put_checkpoint(replace(a, size_bytes=999))  # overwrite: newest in listings
    assert [r.ref.name for r in store.list_checkpoints().items] == ["b", "c", "a"]
    assert store.get_checkpoint(a.ref).size_bytes == 999

    store.set_checkpoint_public(c.ref, True)
    assert [r.ref.name for r in store.list_checkpoints(public=True).items] == ["c"]
    store.set_checkpoint_public(c.ref, False)
    assert store.list_checkpoints(public=True).total == 0

    expiry = T0 + timedelta(hours=1)
    store.set_checkpoint_expiry(b.ref, expiry)
    assert store.get_checkpoint(b.ref).expires_at == expiry
    assert store.get_checkpoint(b.ref).expired(expiry) and not store.get_checkpoint(b.ref).expired(T0)
    assert [r.ref.name for r in store.list_checkpoints(alive_at=expiry).items] == ["c", "a"]
    assert [r.ref.name for r in store.expired_checkpoints(expiry)] == ["b"]
    assert store.expired_checkpoints(T0) == []
    store.set_checkpoint_expiry(b.ref, None)
    assert store.expired_checkpoints(expiry) == []

    store.delete_checkpoint(a.ref)
    assert store.get_checkpoint(a.ref) is None and store.list_checkpoints().total == 2


def test_api_keys(store: SqlStore) -> None:
    assert not store.has_active_api_keys()
    record = ApiKeyRecord("abc", "ci", "00ff", "hash", T0)
    store.add_api_key(record)
    assert store.get_api_key("abc") == record and store.list_api_keys() == [record]
    assert store.has_active_api_keys()
    assert store.revoke_api_key("abc", T0) and not store.revoke_api_key("abc", T0)
    assert store.get_api_key("abc").revoked_at == T0
    assert not store.has_active_api_keys()
    with pytest.raises(sqlite3.IntegrityError):
        store.add_api_key(record)


def test_futures(store: SqlStore) -> None:
    store.add_future("r1", "alice", T0)
    store.add_future("r2", "alice", T0)
    store.add_future("r3", "bob", T0)
    assert store.get_future("r1").status == "pending"
    store.finish_future("r1", "done", "application/json", b'{"ok":1}', T0)
    store.finish_future("r1", "failed", "application/json", b"late", T0)  # already finished: ignored
    store.finish_future("r2", "done", "application/x-protobuf", None, T0)
    done = store.get_future("r1")
    assert (done.status, done.body, done.media_type, done.completed_at) == ("done", b'{"ok":1}', "application/json", T0)
    assert store.get_future("r2").body is None

    assert store.fail_pending_futures(b'{"error":"restart","category":"server"}', T0) == 1
    failed = store.get_future("r3")
    assert (failed.status, failed.owner, failed.body) == ("failed", "bob", b'{"error":"restart","category":"server"}')
    assert store.get_future("zzz") is None

    store.add_future("r4", "alice", T0)
    assert store.delete_futures_before(T0 + timedelta(seconds=1)) == 3
    assert store.get_future("r4") is not None, "pending futures are never collected"


def test_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "tuft.db"
    first = SqlStore.open(f"sqlite:///{path}")
    first.put_session(session("s1"))
    first.put_checkpoint(checkpoint("m:train:0", "a"))
    first.add_future("r", "alice", T0)
    # No close: a killed process never closes its connection.
    second = SqlStore.open(str(path))
    assert second.get_session("s1") == session("s1")
    assert second.get_checkpoint(CheckpointRef("m:train:0", "weights", "a")) is not None
    assert second.get_future("r").status == "pending"
    assert second._one("PRAGMA journal_mode")[0] == "wal"
    first.close()
    second.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tuft.db"
    SqlStore.sqlite(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        SqlStore.sqlite(path)


def test_concurrent_writers(store: SqlStore) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(25):
                store.add_future(f"{n}-{i}", "alice", T0)
                store.finish_future(f"{n}-{i}", "done", "application/json", b"{}", T0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store._one("SELECT COUNT(*) FROM futures WHERE status = 'done'")[0] == 100


def test_database_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_database_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'tuft.db'}"
    assert dialect_for("sqlite://:memory:").name == "sqlite"
    SqlStore.open("sqlite://:memory:").close()
    SqlStore.open(f"sqlite:///{tmp_path}/nested/dir/x.db").close()
    assert (tmp_path / "nested" / "dir" / "x.db").is_file()
    with pytest.raises(StoreError, match="unsupported database URL"):
        dialect_for("mysql://localhost/db")
    with pytest.raises(StoreError, match="invalid SQLite URL"):
        dialect_for("sqlite://relative.db")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the driver were not installed
    with pytest.raises(StoreError, match=r"\*\*\*.*psycopg") as info:
        dialect_for("postgresql://user:hunter2@db.example/tuft")
    assert "hunter2" not in str(info.value)
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


def test_postgres_dialect_uses_format_params(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PostgreSQL path is the same SQL with `%s` parameters and BYTEA; checked here against
    SQLite behind a fake psycopg that translates back, so the rewriting is exercised end to end."""

    class FakePsycopg:
        @staticmethod
        def connect(url: str):
            assert url == "postgresql://localhost/tuft"
            return _FormatToQmark(sqlite3.connect(":memory:", check_same_thread=False))

    monkeypatch.setitem(sys.modules, "psycopg", FakePsycopg)
    store = SqlStore.open("postgresql://localhost/tuft")
    assert store.dialect.paramstyle == "format" and store.dialect.blob == "BYTEA"
    store.put_session(session("s1"))
    store.add_future("r", "alice", T0)
    assert store.get_session("s1") == session("s1") and store.get_future("r").owner == "alice"
    assert store.list_sessions(owner="alice", limit=5).total == 1


class _FormatToQmark:
    """A DB-API connection that accepts `%s` parameters (as psycopg does) on top of sqlite3."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def cursor(self):
        cursor = self._conn.cursor()

        class Cursor:
            rowcount = property(lambda _: cursor.rowcount)

            def execute(self, statement: str, params=()):
                assert "?" not in statement
                cursor.execute(statement.replace("%s", "?").replace("BYTEA", "BLOB"), params)
                return self

            def fetchone(self):
                return cursor.fetchone()

            def fetchall(self):
                return cursor.fetchall()

            def close(self):
                cursor.close()

        return Cursor()

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        self._conn.rollback()

    def close(self) -> None:
        self._conn.close()


def test_step_metrics(tmp_path: Path) -> None:
    path = tmp_path / "tuft.db"
    store = SqlStore.sqlite(path)
    store.add_step_metrics("r1", 1, "forward_backward", {"loss:sum": 2.5, "tokens": 4.0}, T0)
    store.add_step_metrics("r1", 1, "optim_step", {"grad_norm:mean": 0.5}, T0)
    store.add_step_metrics("r2", 1, "forward_backward", {"loss:sum": 1.0}, T0)
    store.add_step_metrics("r1", 2, "optim_step", {"grad_norm:mean": float("nan")}, T0)
    store.close()
    reopened = SqlStore.sqlite(path)
    records = reopened.step_metrics("r1")
    assert [(r.step, r.kind) for r in records] == [(1, "forward_backward"), (1, "optim_step"), (2, "optim_step")]
    assert records[0].metrics == {"loss:sum": 2.5, "tokens": 4.0} and records[0].recorded_at == T0
    assert math.isnan(records[2].metrics["grad_norm:mean"])
    assert reopened.latest_steps(["r1", "r2", "r3"]) == {"r1": 2}, "r2 took no optimizer step yet"
    assert reopened.latest_steps([]) == {} and reopened.step_metrics("r3") == []
    reopened.close()
