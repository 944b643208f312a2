"""Durable service records: sessions, training runs, samplers, checkpoints, API keys, futures,
the idempotency keys of copy_weights calls, and the ledger (metered usage, the audit log, per-key
quotas).

`Store` is the interface the service programs against; `server.store_sql.SqlStore` implements
it on SQLite (the default, one file next to the checkpoints) or PostgreSQL. Live engine state
(adapter slots, protobuf results) is not here: it does not survive a restart.

Every record that a tenant can see carries an `owner` (an API key id, or in open mode a hash
of the presented key); the routes compare it with the caller's before answering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from server.paths import CheckpointRef
from tuft_jax.types import LoraConfig


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    owner: str
    created_at: datetime
    last_heartbeat: datetime
    sdk_version: str = ""
    tags: tuple[str, ...] = ()
    user_metadata: dict[str, Any] | None = None
    project_id: str | None = None
    display_name: str | None = None
    finished: str | None = None
    """Why the session ended (`success`, `errored`, `interrupted`, `expired`, `server_restarted`);
    None while active."""


@dataclass(frozen=True)
class TrainingRunRecord:
    model_id: str
    session_id: str
    owner: str
    base_model: str
    lora: LoraConfig
    created_at: datetime
    last_request_time: datetime
    user_metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class SamplerRecord:
    sampler_id: str
    session_id: str
    base_model: str
    created_at: datetime
    model_path: str | None = None
    owner: str = ""
    """Empty means "the owner of `session_id`", filled in by the store."""


@dataclass(frozen=True)
class CheckpointRecord:
    ref: CheckpointRef
    owner: str
    created_at: datetime
    size_bytes: int | None = None
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None
    public: bool = False
    base_model: str = ""
    lora: LoraConfig | None = None
    """Geometry of the saved adapter (rank, trained groups), checked before it is loaded."""

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    name: str
    salt: str
    """Hex; the key's secret part is stored only as sha256(salt + secret)."""
    secret_hash: str
    created_at: datetime
    revoked_at: datetime | None = None


FutureStatus = Literal["pending", "done", "failed"]


@dataclass(frozen=True)
class FutureRecord:
    request_id: str
    owner: str
    status: FutureStatus
    created_at: datetime
    completed_at: datetime | None = None
    media_type: str | None = None
    body: bytes | None = None
    """The encoded result for JSON results and failures; None for protobuf results, which are
    kept in memory only."""


@dataclass(frozen=True)
class SessionCursor:
    """Where a newest-first listing of sessions resumes: after this (created_at, session_id)."""

    created_at: datetime
    session_id: str


@dataclass(frozen=True)
class CheckpointTotals:
    """How many live checkpoints a session's training runs hold, and their bytes."""

    count: int = 0
    size_bytes: int = 0


UsageKind = Literal["training", "sampling_prefill", "sampling_sample"]


@dataclass(frozen=True)
class UsageRow:
    """Tokens one owner used of one kind in one UTC hour, per session and base model."""

    bucket_start: datetime
    owner: str
    session_id: str | None
    base_model: str
    kind: UsageKind
    tokens: int


@dataclass(frozen=True)
class AuditEvent:
    """One entry of an owner's audit log: `event` is `<resource>_<action>`."""

    timestamp: datetime
    owner: str
    event: str
    details: dict[str, Any]


@dataclass(frozen=True)
class Quota:
    """Limits on one API key; None means unlimited."""

    max_concurrent_runs: int | None = None
    max_tokens_per_day: int | None = None


@dataclass(frozen=True)
class Page:
    """One page of a listing plus the total size of the listing."""

    items: list[Any]
    total: int


@dataclass(frozen=True)
class StepMetricsRecord:
    """What one forward_backward or optim_step (`kind`) of a training run reported, filed under
    the optimizer step it belongs to (server.step_metrics)."""

    model_id: str
    step: int
    kind: str
    metrics: dict[str, float]
    recorded_at: datetime


class Store(Protocol):
    # ---- sessions ----
    def put_session(self, record: SessionRecord) -> None: ...
    def get_session(self, session_id: str) -> SessionRecord | None: ...
    def list_sessions(self, *, owner: str | None = None, limit: int | None = None, offset: int = 0) -> Page: ...
    def sessions_newest_first(
        self, owner: str, *, project_ids: Sequence[str] | None = None, after: SessionCursor | None = None, limit: int
    ) -> list[SessionRecord]: ...
    def session_checkpoint_totals(
        self, session_ids: Sequence[str], alive_at: datetime
    ) -> dict[str, CheckpointTotals]: ...
    def active_sessions(self) -> list[SessionRecord]: ...
    def end_active_sessions(self, reason: str) -> int: ...

    # ---- training runs ----
    def put_training_run(self, record: TrainingRunRecord) -> None: ...
    def get_training_run(self, model_id: str) -> TrainingRunRecord | None: ...
    def list_training_runs(
        self,
        *,
        owner: str | None = None,
        include_public: datetime | None = None,
        project_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> Page: ...
    def session_training_runs(self, session_id: str) -> list[TrainingRunRecord]: ...
    def touch_training_run(self, model_id: str, when: datetime) -> None: ...

    # ---- samplers ----
    def put_sampler(self, record: SamplerRecord) -> None: ...
    def get_sampler(self, sampler_id: str) -> SamplerRecord | None: ...
    def session_samplers(self, session_id: str) -> list[SamplerRecord]: ...

    # ---- checkpoints ----
    def put_checkpoint(self, record: CheckpointRecord) -> None: ...
    def get_checkpoint(self, ref: CheckpointRef) -> CheckpointRecord | None: ...
    def list_checkpoints(
        self,
        *,
        model_id: str | None = None,
        owner: str | None = None,
        public: bool | None = None,
        alive_at: datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> Page: ...
    def delete_checkpoint(self, ref: CheckpointRef, reason: str = "deleted") -> None: ...
    def set_checkpoint_public(self, ref: CheckpointRef, public: bool) -> None: ...
    def set_checkpoint_expiry(self, ref: CheckpointRef, expires_at: datetime | None) -> None: ...
    def expired_checkpoints(self, now: datetime) -> list[CheckpointRecord]: ...

    # ---- API keys ----
    def add_api_key(self, record: ApiKeyRecord) -> None: ...
    def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...
    def list_api_keys(self) -> list[ApiKeyRecord]: ...
    def revoke_api_key(self, key_id: str, when: datetime) -> bool: ...
    def has_active_api_keys(self) -> bool: ...

    # ---- copy_weights idempotency ----
    def get_weight_copy(self, owner: str, idempotency_key: str) -> str | None: ...
    def add_weight_copy(self, owner: str, idempotency_key: str, tinker_path: str, when: datetime) -> None: ...

    # ---- futures ----
    def add_future(self, request_id: str, owner: str, created_at: datetime) -> None: ...
    def finish_future(
        self, request_id: str, status: FutureStatus, media_type: str, body: bytes | None, completed_at: datetime
    ) -> None: ...
    def get_future(self, request_id: str) -> FutureRecord | None: ...
    def fail_pending_futures(self, body: bytes, when: datetime) -> int: ...
    def delete_futures_before(self, cutoff: datetime) -> int: ...

    # ---- ledger: usage, audit log, quotas ----
    def add_usage(self, rows: Sequence[UsageRow]) -> None: ...
    def usage_between(self, owner: str, start: datetime, end: datetime) -> list[UsageRow]: ...
    def usage_tokens_since(self, owner: str, since: datetime) -> int: ...
    def add_audit_event(self, event: AuditEvent) -> None: ...
    def audit_events(
        self, owner: str, start: datetime, end: datetime, prefixes: Sequence[str] | None = None
    ) -> list[AuditEvent]: ...
    def set_quota(self, key_id: str, quota: Quota) -> None: ...
    def get_quota(self, key_id: str) -> Quota: ...

    def close(self) -> None: ...

    # ---- per-step training metrics (the dashboard's curves) ----
    def add_step_metrics(
        self, model_id: str, step: int, kind: str, metrics: dict[str, float], when: datetime
    ) -> None: ...
    def step_metrics(self, model_id: str) -> list[StepMetricsRecord]: ...
    def latest_steps(self, model_ids: Sequence[str]) -> dict[str, int]: ...
