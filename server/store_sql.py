"""`Store` on a SQL database: SQLite by default (stdlib, WAL), PostgreSQL with psycopg.

The SQL is kept generic (the subset SQLite 3.24+ and PostgreSQL share: `ON CONFLICT ... DO
UPDATE`, `EXISTS`, no engine-specific functions); a small `Dialect` supplies the connection
factory, the parameter style and the one differing column type. Times are stored as integer
microseconds since the epoch (UTC), JSON values as text. One connection is shared behind a
lock; every call is one transaction, committed before it returns, so a `kill -9` loses
nothing that a response already reported.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from server.paths import CheckpointRef
from server.store_ledger_sql import LEDGER_SCHEMA, LedgerTables
from server.sql_values import from_json, from_us, to_json, to_us
from server.store import (
    ApiKeyRecord,
    AuditEvent,
    CheckpointRecord,
    CheckpointTotals,
    FutureRecord,
    FutureStatus,
    Page,
    SamplerRecord,
    SessionCursor,
    SessionRecord,
    StepMetricsRecord,
    TrainingRunRecord,
)
from tuft_jax.types import LoraConfig

SCHEMA_VERSION = 1


class StoreError(RuntimeError):
    """The metadata database cannot be opened or used (bad URL, missing driver, newer schema)."""


@dataclass(frozen=True)
class Dialect:
    name: str
    connect: Callable[[], Any]
    """Returns a new DB-API connection."""
    paramstyle: str
    """`qmark` (`?`) or `format` (`%s`); statements are written with `?`."""
    blob: str
    """Column type for raw bytes."""


def _schema(blob: str) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        """CREATE TABLE IF NOT EXISTS sessions (
            session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, seq BIGINT NOT NULL,
            created_at BIGINT NOT NULL, last_heartbeat BIGINT NOT NULL, sdk_version TEXT NOT NULL,
            tags TEXT NOT NULL, user_metadata TEXT, project_id TEXT, display_name TEXT, finished TEXT)""",
        "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, seq)",
        "CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (finished)",
        """CREATE TABLE IF NOT EXISTS training_runs (
            model_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, owner TEXT NOT NULL, seq BIGINT NOT NULL,
            base_model TEXT NOT NULL, lora TEXT NOT NULL, created_at BIGINT NOT NULL,
            last_request_time BIGINT NOT NULL, user_metadata TEXT)""",
        "CREATE INDEX IF NOT EXISTS training_runs_by_owner ON training_runs (owner, seq)",
        "CREATE INDEX IF NOT EXISTS training_runs_by_session ON training_runs (session_id)",
        """CREATE TABLE IF NOT EXISTS samplers (
            sampler_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, owner TEXT NOT NULL, seq BIGINT NOT NULL,
            base_model TEXT NOT NULL, created_at BIGINT NOT NULL, model_path TEXT)""",
        "CREATE INDEX IF NOT EXISTS samplers_by_session ON samplers (session_id)",
        """CREATE TABLE IF NOT EXISTS checkpoints (
            model_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,
            seq BIGINT NOT NULL, created_at BIGINT NOT NULL, size_bytes BIGINT, user_metadata TEXT,
            expires_at BIGINT, public INTEGER NOT NULL, base_model TEXT NOT NULL, lora TEXT,
            PRIMARY KEY (model_id, kind, name))""",
        "CREATE INDEX IF NOT EXISTS checkpoints_by_owner ON checkpoints (owner, seq)",
        "CREATE INDEX IF NOT EXISTS checkpoints_by_expiry ON checkpoints (expires_at)",
        """CREATE TABLE IF NOT EXISTS api_keys (
            key_id TEXT PRIMARY KEY, name TEXT NOT NULL, salt TEXT NOT NULL, secret_hash TEXT NOT NULL,
            seq BIGINT NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT)""",
        f"""CREATE TABLE IF NOT EXISTS futures (
            request_id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL,
            created_at BIGINT NOT NULL, completed_at BIGINT, media_type TEXT, body {blob})""",
        "CREATE INDEX IF NOT EXISTS futures_by_status ON futures (status, completed_at)",
        # Added after schema version 1 was released; CREATE IF NOT EXISTS adds it to older databases.
        """CREATE TABLE IF NOT EXISTS weight_copies (
            owner TEXT NOT NULL, idempotency_key TEXT NOT NULL, tinker_path TEXT NOT NULL,
            created_at BIGINT NOT NULL, PRIMARY KEY (owner, idempotency_key))""",
        # Per-step training metrics for the dashboard (also added to older databases as above).
        """CREATE TABLE IF NOT EXISTS step_metrics (
            model_id TEXT NOT NULL, seq BIGINT NOT NULL, step BIGINT NOT NULL, kind TEXT NOT NULL,
            metrics TEXT NOT NULL, recorded_at BIGINT NOT NULL, PRIMARY KEY (model_id, seq))""",
        *LEDGER_SCHEMA,
    ]


def _lora(text: str | None) -> LoraConfig | None:
    return None if text is None else LoraConfig(**json.loads(text))


# ---- dialects -----------------------------------------------------------------------------


def sqlite_dialect(path: str | Path) -> Dialect:
    """SQLite at `path` (a file, created with its directory, or `:memory:`)."""
    target = str(path)
    if target != ":memory:":
        Path(target).parent.mkdir(parents=True, exist_ok=True)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(target, check_same_thread=False, timeout=30.0, isolation_level=None)
        if target != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives a crash of this process; only
            # a power loss can drop the last few.
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    return Dialect("sqlite", connect, "qmark", "BLOB")


def postgres_dialect(url: str) -> Dialect:
    try:
        import psycopg  # type: ignore[import-not-found]
    except ImportError as exc:
        raise StoreError(
            f"the metadata database {redact(url)} is PostgreSQL, which needs the psycopg driver: "
            "pip install 'psycopg[binary]'"
        ) from exc
    return Dialect("postgresql", lambda: psycopg.connect(url), "format", "BYTEA")


def dialect_for(url: str) -> Dialect:
    """`sqlite:///relative.db`, `sqlite:////absolute.db`, `sqlite://:memory:`, a plain file path,
    or `postgresql://user:pass@host/db`."""
    if url.startswith(("postgresql://", "postgres://")):
        return postgres_dialect(url)
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if rest in (":memory:", "/:memory:"):
            return sqlite_dialect(":memory:")
        if not rest.startswith("/"):
            raise StoreError(f"invalid SQLite URL {url!r}: use sqlite:///path/to/file.db")
        return sqlite_dialect(unquote(rest[1:]) or ":memory:")
    if "://" in url:
        raise StoreError(f"unsupported database URL scheme in {redact(url)}: use sqlite:/// or postgresql://")
    return sqlite_dialect(Path(url).expanduser())


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", ":***@", 1)


# ---- the store ----------------------------------------------------------------------------


class SqlStore(LedgerTables):
    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._lock = threading.RLock()
        self._last_seq = 0
        try:
            self._conn = dialect.connect()
        except Exception as exc:
            raise StoreError(f"cannot open the metadata database ({dialect.name}): {exc}") from exc
        self._migrate()

    @classmethod
    def open(cls, url: str) -> SqlStore:
        return cls(dialect_for(url))

    @classmethod
    def sqlite(cls, path: str | Path) -> SqlStore:
        return cls(sqlite_dialect(path))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- plumbing -----------------------------------------------------------------------

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.dialect.paramstyle == "format" else statement

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Callable[[str, Sequence[Any]], Any]]:
        """One transaction; yields `execute(sql, params) -> cursor`. SQLite takes the write lock
        up front for writes, so concurrent writers (the CLI) wait instead of failing midway."""
        with self._lock:
            cursor = self._conn.cursor()
            if self.dialect.name == "sqlite":
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

            def execute(statement: str, params: Sequence[Any] = ()) -> Any:
                cursor.execute(self._sql(statement), tuple(params))
                return cursor

            try:
                yield execute
            except BaseException:
                self._conn.rollback()
                raise
            else:
                self._conn.commit()
            finally:
                cursor.close()

    def _query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._tx(write=False) as execute:
            return list(execute(statement, params).fetchall())

    def _one(self, statement: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self._query(statement, params)
        return rows[0] if rows else None

    def _next_seq(self) -> int:
        """Creation order: wall-clock microseconds, forced to increase within this process."""
        with self._lock:
            self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
            return self._last_seq

    def _migrate(self) -> None:
        with self._tx() as execute:
            for statement in _schema(self.dialect.blob):
                execute(statement)
            row = execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"the metadata database has schema version {row[0]}, newer than this server's "
                    f"{SCHEMA_VERSION}; upgrade the server"
                )
            # Future schema versions add their upgrade steps here, keyed on row[0].

    @staticmethod
    def _page(rows: list[tuple], convert: Callable[[tuple], Any], total: int) -> Page:
        return Page([convert(row) for row in rows], total)

    def _paged(
        self, table: str, columns: str, where: str, params: list[Any], limit: int | None, offset: int
    ) -> tuple[list[tuple], int]:
        with self._tx(write=False) as execute:
            total = int(execute(f"SELECT COUNT(*) FROM {table} WHERE {where}", params).fetchone()[0])
            clause, extra = "", []
            if limit is not None or offset:
                clause, extra = " LIMIT ? OFFSET ?", [total if limit is None else limit, offset]
            rows = execute(f"SELECT {columns} FROM {table} WHERE {where} ORDER BY seq{clause}", params + extra).fetchall()
        return list(rows), int(total)

    # ---- sessions -----------------------------------------------------------------------

    _SESSION = "session_id, owner, created_at, last_heartbeat, sdk_version, tags, user_metadata, project_id, display_name, finished"

    @staticmethod
    def _session(row: tuple) -> SessionRecord:
        return SessionRecord(
            session_id=row[0],
            owner=row[1],
            created_at=from_us(row[2]),  # type: ignore[arg-type]
            last_heartbeat=from_us(row[3]),  # type: ignore[arg-type]
            sdk_version=row[4],
            tags=tuple(json.loads(row[5])),
            user_metadata=from_json(row[6]),
            project_id=row[7],
            display_name=row[8],
            finished=row[9],
        )

    def put_session(self, record: SessionRecord) -> None:
        with self._tx() as execute:
            execute(
                f"""INSERT INTO sessions (seq, {self._SESSION}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (session_id) DO UPDATE SET owner = excluded.owner,
                last_heartbeat = excluded.last_heartbeat, sdk_version = excluded.sdk_version,
                tags = excluded.tags, user_metadata = excluded.user_metadata, project_id = excluded.project_id,
                display_name = excluded.display_name, finished = excluded.finished""",
                (
                    self._next_seq(),
                    record.session_id,
                    record.owner,
                    to_us(record.created_at),
                    to_us(record.last_heartbeat),
                    record.sdk_version,
                    json.dumps(list(record.tags)),
                    to_json(record.user_metadata),
                    record.project_id,
                    record.display_name,
                    record.finished,
                ),
            )

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self._one(f"SELECT {self._SESSION} FROM sessions WHERE session_id = ?", (session_id,))
        return None if row is None else self._session(row)

    def list_sessions(self, *, owner: str | None = None, limit: int | None = None, offset: int = 0) -> Page:
        where, params = ("owner = ?", [owner]) if owner is not None else ("1 = 1", [])
        rows, total = self._paged("sessions", self._SESSION, where, params, limit, offset)
        return self._page(rows, self._session, total)

    def sessions_newest_first(
        self, owner: str, *, project_ids: Sequence[str] | None = None, after: SessionCursor | None = None, limit: int
    ) -> list[SessionRecord]:
        """`owner`'s sessions, newest first, in `project_ids` if given, after `after` if given."""
        clauses, params = ["owner = ?"], [owner]
        if project_ids is not None:
            clauses.append(f"project_id IN ({', '.join('?' * len(project_ids))})" if project_ids else "1 = 0")
            params.extend(project_ids)
        if after is not None:
            created = to_us(after.created_at)
            clauses.append("(created_at < ? OR (created_at = ? AND session_id < ?))")
            params.extend([created, created, after.session_id])
        rows = self._query(
            f"SELECT {self._SESSION} FROM sessions WHERE {' AND '.join(clauses)} "
            "ORDER BY created_at DESC, session_id DESC LIMIT ?",
            [*params, limit],
        )
        return [self._session(row) for row in rows]

    def session_checkpoint_totals(
        self, session_ids: Sequence[str], alive_at: datetime
    ) -> dict[str, CheckpointTotals]:
        """Live checkpoints of each session's training runs (sessions without any are left out)."""
        if not session_ids:
            return {}
        rows = self._query(
            "SELECT r.session_id, COUNT(*), SUM(COALESCE(c.size_bytes, 0)) FROM checkpoints c "
            "JOIN training_runs r ON r.model_id = c.model_id "
            f"WHERE r.session_id IN ({', '.join('?' * len(session_ids))}) "
            "AND (c.expires_at IS NULL OR c.expires_at > ?) GROUP BY r.session_id",
            [*session_ids, to_us(alive_at)],
        )
        return {row[0]: CheckpointTotals(int(row[1]), int(row[2])) for row in rows}

    def active_sessions(self) -> list[SessionRecord]:
        rows = self._query(f"SELECT {self._SESSION} FROM sessions WHERE finished IS NULL ORDER BY seq")
        return [self._session(row) for row in rows]

    def end_active_sessions(self, reason: str) -> int:
        with self._tx() as execute:
            return execute("UPDATE sessions SET finished = ? WHERE finished IS NULL", (reason,)).rowcount

    # ---- training runs ------------------------------------------------------------------

    _RUN = "model_id, session_id, owner, base_model, lora, created_at, last_request_time, user_metadata"

    @staticmethod
    def _run(row: tuple) -> TrainingRunRecord:
        return TrainingRunRecord(
            model_id=row[0],
            session_id=row[1],
            owner=row[2],
            base_model=row[3],
            lora=_lora(row[4]),  # type: ignore[arg-type]
            created_at=from_us(row[5]),  # type: ignore[arg-type]
            last_request_time=from_us(row[6]),  # type: ignore[arg-type]
            user_metadata=from_json(row[7]),
        )

    def put_training_run(self, record: TrainingRunRecord) -> None:
        with self._tx() as execute:
            execute(
                f"""INSERT INTO training_runs (seq, {self._RUN}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (model_id) DO UPDATE SET session_id = excluded.session_id, owner = excluded.owner,
                base_model = excluded.base_model, lora = excluded.lora,
                last_request_time = excluded.last_request_time, user_metadata = excluded.user_metadata""",
                (
                    self._next_seq(),
                    record.model_id,
                    record.session_id,
                    record.owner,
                    record.base_model,
                    to_json(asdict(record.lora)),
                    to_us(record.created_at),
                    to_us(record.last_request_time),
                    to_json(record.user_metadata),
                ),
            )

    def get_training_run(self, model_id: str) -> TrainingRunRecord | None:
        row = self._one(f"SELECT {self._RUN} FROM training_runs WHERE model_id = ?", (model_id,))
        return None if row is None else self._run(row)

    def list_training_runs(
        self,
        *,
        owner: str | None = None,
        include_public: datetime | None = None,
        project_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> Page:
        """Runs of `owner` (all runs if None); with `include_public` (the current time), also
        every run with a public checkpoint that has not expired by then; with `project_id`,
        only runs whose session belongs to that project."""
        clauses: list[str] = []
        params: list[Any] = []
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if include_public is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM checkpoints c WHERE c.model_id = training_runs.model_id AND c.public = 1 "
                "AND (c.expires_at IS NULL OR c.expires_at > ?))"
            )
            params.append(to_us(include_public))
        where = " OR ".join(f"({c})" for c in clauses) if clauses else "1 = 1"
        if project_id is not None:
            where = f"({where}) AND session_id IN (SELECT session_id FROM sessions WHERE project_id = ?)"
            params.append(project_id)
        rows, total = self._paged("training_runs", self._RUN, where, params, limit, offset)
        return self._page(rows, self._run, total)

    def session_training_runs(self, session_id: str) -> list[TrainingRunRecord]:
        rows = self._query(f"SELECT {self._RUN} FROM training_runs WHERE session_id = ? ORDER BY seq", (session_id,))
        return [self._run(row) for row in rows]

    def touch_training_run(self, model_id: str, when: datetime) -> None:
        with self._tx() as execute:
            execute("UPDATE training_runs SET last_request_time = ? WHERE model_id = ?", (to_us(when), model_id))

    # ---- samplers -----------------------------------------------------------------------

    _SAMPLER = "sampler_id, session_id, base_model, created_at, model_path, owner"

    @staticmethod
    def _sampler(row: tuple) -> SamplerRecord:
        return SamplerRecord(row[0], row[1], row[2], from_us(row[3]), row[4], row[5])  # type: ignore[arg-type]

    def put_sampler(self, record: SamplerRecord) -> None:
        with self._tx() as execute:
            owner = record.owner
            if not owner:
                row = execute("SELECT owner FROM sessions WHERE session_id = ?", (record.session_id,)).fetchone()
                owner = row[0] if row is not None else ""
            execute(
                f"""INSERT INTO samplers (seq, {self._SAMPLER}) VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (sampler_id) DO UPDATE SET session_id = excluded.session_id,
                base_model = excluded.base_model, model_path = excluded.model_path, owner = excluded.owner""",
                (
                    self._next_seq(),
                    record.sampler_id,
                    record.session_id,
                    record.base_model,
                    to_us(record.created_at),
                    record.model_path,
                    owner,
                ),
            )

    def get_sampler(self, sampler_id: str) -> SamplerRecord | None:
        row = self._one(f"SELECT {self._SAMPLER} FROM samplers WHERE sampler_id = ?", (sampler_id,))
        return None if row is None else self._sampler(row)

    def session_samplers(self, session_id: str) -> list[SamplerRecord]:
        rows = self._query(f"SELECT {self._SAMPLER} FROM samplers WHERE session_id = ? ORDER BY seq", (session_id,))
        return [self._sampler(row) for row in rows]

    # ---- checkpoints --------------------------------------------------------------------

    _CHECKPOINT = (
        "model_id, kind, name, owner, created_at, size_bytes, user_metadata, expires_at, public, base_model, lora"
    )

    @staticmethod
    def _checkpoint(row: tuple) -> CheckpointRecord:
        return CheckpointRecord(
            ref=CheckpointRef(row[0], row[1], row[2]),
            owner=row[3],
            created_at=from_us(row[4]),  # type: ignore[arg-type]
            size_bytes=row[5],
            user_metadata=from_json(row[6]),
            expires_at=from_us(row[7]),
            public=bool(row[8]),
            base_model=row[9],
            lora=_lora(row[10]),
        )

    def _checkpoint_event(
        self, execute: Any, event: str, record: CheckpointRecord, when: datetime, **details: Any
    ) -> None:
        """Audit `event` on `record` in the owner's log, inside the caller's transaction."""
        run = execute("SELECT session_id FROM training_runs WHERE model_id = ?", (record.ref.model_id,)).fetchone()
        self._audit(
            execute,
            AuditEvent(
                when,
                record.owner,
                event,
                {
                    "tinker_path": record.ref.tinker_path,
                    "model_id": record.ref.model_id,
                    "checkpoint_type": record.ref.checkpoint_type,
                    "session_id": None if run is None else run[0],
                    "base_model": record.base_model,
                    "size_bytes": record.size_bytes,
                    "created_at": record.created_at.isoformat(),
                    **details,
                },
            ),
        )

    def _checkpoint_in(self, execute: Any, ref: CheckpointRef) -> CheckpointRecord | None:
        row = execute(
            f"SELECT {self._CHECKPOINT} FROM checkpoints WHERE model_id = ? AND kind = ? AND name = ?",
            (ref.model_id, ref.kind, ref.name),
        ).fetchone()
        return None if row is None else self._checkpoint(row)

    def put_checkpoint(self, record: CheckpointRecord) -> None:
        """Insert, or replace an overwritten one (which then lists as the newest); audited as
        `checkpoint_create`, or `checkpoint_overwrite` with the replaced one's size and age."""
        ref = record.ref
        with self._tx() as execute:
            previous = self._checkpoint_in(execute, ref)
            if previous is None:
                self._checkpoint_event(execute, "checkpoint_create", record, record.created_at)
            else:
                self._checkpoint_event(
                    execute,
                    "checkpoint_overwrite",
                    record,
                    record.created_at,
                    previous_size_bytes=previous.size_bytes,
                    previous_created_at=previous.created_at.isoformat(),
                )
            execute(
                f"""INSERT INTO checkpoints (seq, {self._CHECKPOINT}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (model_id, kind, name) DO UPDATE SET seq = excluded.seq, owner = excluded.owner,
                created_at = excluded.created_at, size_bytes = excluded.size_bytes,
                user_metadata = excluded.user_metadata, expires_at = excluded.expires_at,
                public = excluded.public, base_model = excluded.base_model, lora = excluded.lora""",
                (
                    self._next_seq(),
                    ref.model_id,
                    ref.kind,
                    ref.name,
                    record.owner,
                    to_us(record.created_at),
                    record.size_bytes,
                    to_json(record.user_metadata),
                    to_us(record.expires_at),
                    int(record.public),
                    record.base_model,
                    None if record.lora is None else to_json(asdict(record.lora)),
                ),
            )

    def get_checkpoint(self, ref: CheckpointRef) -> CheckpointRecord | None:
        with self._tx(write=False) as execute:
            return self._checkpoint_in(execute, ref)

    def list_checkpoints(
        self,
        *,
        model_id: str | None = None,
        owner: str | None = None,
        public: bool | None = None,
        alive_at: datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> Page:
        """Checkpoints in creation order, filtered by run, owner and publicity; with `alive_at`,
        only those that have not expired by then."""
        clauses, params = ["1 = 1"], []
        for column, value in (("model_id", model_id), ("owner", owner)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if public is not None:
            clauses.append("public = ?")
            params.append(int(public))
        if alive_at is not None:
            clauses.append("(expires_at IS NULL OR expires_at > ?)")
            params.append(to_us(alive_at))
        rows, total = self._paged("checkpoints", self._CHECKPOINT, " AND ".join(clauses), params, limit, offset)
        return self._page(rows, self._checkpoint, total)

    def delete_checkpoint(self, ref: CheckpointRef, reason: str = "deleted") -> None:
        """Forget a checkpoint; audited as `checkpoint_delete` with `reason` (`deleted` by its
        owner, `expired`, `files_missing` after a crash)."""
        with self._tx() as execute:
            record = self._checkpoint_in(execute, ref)
            if record is None:
                return
            self._checkpoint_event(execute, "checkpoint_delete", record, datetime.now(UTC), reason=reason)
            execute(
                "DELETE FROM checkpoints WHERE model_id = ? AND kind = ? AND name = ?", (ref.model_id, ref.kind, ref.name)
            )

    def set_checkpoint_public(self, ref: CheckpointRef, public: bool) -> None:
        with self._tx() as execute:
            record = self._checkpoint_in(execute, ref)
            if record is None:
                return
            event = "checkpoint_publish" if public else "checkpoint_unpublish"
            self._checkpoint_event(execute, event, record, datetime.now(UTC))
            execute(
                "UPDATE checkpoints SET public = ? WHERE model_id = ? AND kind = ? AND name = ?",
                (int(public), ref.model_id, ref.kind, ref.name),
            )

    def set_checkpoint_expiry(self, ref: CheckpointRef, expires_at: datetime | None) -> None:
        with self._tx() as execute:
            record = self._checkpoint_in(execute, ref)
            if record is None:
                return
            self._checkpoint_event(
                execute,
                "checkpoint_ttl_set",
                record,
                datetime.now(UTC),
                expires_at=None if expires_at is None else expires_at.isoformat(),
            )
            execute(
                "UPDATE checkpoints SET expires_at = ? WHERE model_id = ? AND kind = ? AND name = ?",
                (to_us(expires_at), ref.model_id, ref.kind, ref.name),
            )

    def expired_checkpoints(self, now: datetime) -> list[CheckpointRecord]:
        rows = self._query(
            f"SELECT {self._CHECKPOINT} FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY seq",
            (to_us(now),),
        )
        return [self._checkpoint(row) for row in rows]

    # ---- API keys -----------------------------------------------------------------------

    _KEY = "key_id, name, salt, secret_hash, created_at, revoked_at"

    @staticmethod
    def _key(row: tuple) -> ApiKeyRecord:
        return ApiKeyRecord(row[0], row[1], row[2], row[3], from_us(row[4]), from_us(row[5]))  # type: ignore[arg-type]

    def add_api_key(self, record: ApiKeyRecord) -> None:
        with self._tx() as execute:
            execute(
                f"INSERT INTO api_keys (seq, {self._KEY}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    self._next_seq(),
                    record.key_id,
                    record.name,
                    record.salt,
                    record.secret_hash,
                    to_us(record.created_at),
                    to_us(record.revoked_at),
                ),
            )

    def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        row = self._one(f"SELECT {self._KEY} FROM api_keys WHERE key_id = ?", (key_id,))
        return None if row is None else self._key(row)

    def list_api_keys(self) -> list[ApiKeyRecord]:
        return [self._key(row) for row in self._query(f"SELECT {self._KEY} FROM api_keys ORDER BY seq")]

    def revoke_api_key(self, key_id: str, when: datetime) -> bool:
        with self._tx() as execute:
            cursor = execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (to_us(when), key_id)
            )
            return cursor.rowcount > 0

    def has_active_api_keys(self) -> bool:
        return self._one("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1") is not None

    # ---- copy_weights idempotency -------------------------------------------------------

    def get_weight_copy(self, owner: str, idempotency_key: str) -> str | None:
        """The tinker path an earlier copy_weights with this key made for `owner`, if any."""
        row = self._one(
            "SELECT tinker_path FROM weight_copies WHERE owner = ? AND idempotency_key = ?", (owner, idempotency_key)
        )
        return None if row is None else row[0]

    def add_weight_copy(self, owner: str, idempotency_key: str, tinker_path: str, when: datetime) -> None:
        with self._tx() as execute:
            execute(
                "INSERT INTO weight_copies (owner, idempotency_key, tinker_path, created_at) VALUES (?, ?, ?, ?)",
                (owner, idempotency_key, tinker_path, to_us(when)),
            )

    # ---- futures ------------------------------------------------------------------------

    _FUTURE = "request_id, owner, status, created_at, completed_at, media_type, body"

    def add_future(self, request_id: str, owner: str, created_at: datetime) -> None:
        with self._tx() as execute:
            execute(
                "INSERT INTO futures (request_id, owner, status, created_at) VALUES (?, ?, 'pending', ?)",
                (request_id, owner, to_us(created_at)),
            )

    def finish_future(
        self, request_id: str, status: FutureStatus, media_type: str, body: bytes | None, completed_at: datetime
    ) -> None:
        with self._tx() as execute:
            execute(
                "UPDATE futures SET status = ?, media_type = ?, body = ?, completed_at = ? "
                "WHERE request_id = ? AND status = 'pending'",
                (status, media_type, body, to_us(completed_at), request_id),
            )

    def get_future(self, request_id: str) -> FutureRecord | None:
        row = self._one(f"SELECT {self._FUTURE} FROM futures WHERE request_id = ?", (request_id,))
        if row is None:
            return None
        body = None if row[6] is None else bytes(row[6])
        return FutureRecord(row[0], row[1], row[2], from_us(row[3]), from_us(row[4]), row[5], body)  # type: ignore[arg-type]

    def fail_pending_futures(self, body: bytes, when: datetime) -> int:
        """Mark every pending future failed with `body` (JSON); returns how many there were."""
        with self._tx() as execute:
            cursor = execute(
                "UPDATE futures SET status = 'failed', media_type = 'application/json', body = ?, completed_at = ? "
                "WHERE status = 'pending'",
                (body, to_us(when)),
            )
            return cursor.rowcount

    def delete_futures_before(self, cutoff: datetime) -> int:
        with self._tx() as execute:
            cursor = execute(
                "DELETE FROM futures WHERE status <> 'pending' AND completed_at < ?", (to_us(cutoff),)
            )
            return cursor.rowcount

    # ---- per-step training metrics ------------------------------------------------------

    def add_step_metrics(self, model_id: str, step: int, kind: str, metrics: dict[str, float], when: datetime) -> None:
        with self._tx() as execute:
            execute(
                "INSERT INTO step_metrics (model_id, seq, step, kind, metrics, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
                (model_id, self._next_seq(), step, kind, to_json(metrics), to_us(when)),
            )

    def step_metrics(self, model_id: str) -> list[StepMetricsRecord]:
        """A run's records in the order they were added."""
        rows = self._query(
            "SELECT step, kind, metrics, recorded_at FROM step_metrics WHERE model_id = ? ORDER BY seq", (model_id,)
        )
        return [StepMetricsRecord(model_id, int(r[0]), r[1], json.loads(r[2]), from_us(r[3])) for r in rows]  # type: ignore[arg-type]

    def latest_steps(self, model_ids: Sequence[str]) -> dict[str, int]:
        """The last optimizer step recorded for each of `model_ids` that has one."""
        if not model_ids:
            return {}
        marks = ", ".join("?" * len(model_ids))
        rows = self._query(
            f"SELECT model_id, MAX(step) FROM step_metrics WHERE kind = 'optim_step' AND model_id IN ({marks}) "
            "GROUP BY model_id",
            list(model_ids),
        )
        return {r[0]: int(r[1]) for r in rows}


def default_database_url(checkpoint_dir: Path) -> str:
    """Metadata lives next to the checkpoints it describes: `{checkpoint_dir}/tuft.db`."""
    return f"sqlite:///{(checkpoint_dir.expanduser() / 'tuft.db').resolve()}"


def open_store(url: str | None, checkpoint_dir: Path) -> SqlStore:
    return SqlStore.open(url or default_database_url(checkpoint_dir))


