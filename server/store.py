"""Durable service records: sessions, training runs, samplers, checkpoints.

`Store` is the interface the service uses; `MemoryStore` keeps everything in dicts (a SQLite
implementation will replace it). Both are used from the event loop thread only. Live engine
state (adapter slots) is not here: it does not survive a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

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
    """Why the session ended (`success`, `errored`, `interrupted`, `expired`); None while active."""


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


@dataclass(frozen=True)
class CheckpointRecord:
    ref: CheckpointRef
    created_at: datetime
    size_bytes: int | None = None
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class Page:
    """One page of a listing plus the total size of the listing."""

    items: list[Any]
    total: int


class Store(Protocol):
    def put_session(self, record: SessionRecord) -> None: ...
    def get_session(self, session_id: str) -> SessionRecord | None: ...
    def list_sessions(self, *, limit: int, offset: int) -> Page: ...
    def active_sessions(self) -> list[SessionRecord]: ...

    def put_training_run(self, record: TrainingRunRecord) -> None: ...
    def get_training_run(self, model_id: str) -> TrainingRunRecord | None: ...
    def list_training_runs(self, *, limit: int, offset: int) -> Page: ...
    def session_training_runs(self, session_id: str) -> list[TrainingRunRecord]: ...
    def touch_training_run(self, model_id: str, when: datetime) -> None: ...

    def put_sampler(self, record: SamplerRecord) -> None: ...
    def get_sampler(self, sampler_id: str) -> SamplerRecord | None: ...
    def session_samplers(self, session_id: str) -> list[SamplerRecord]: ...

    def put_checkpoint(self, record: CheckpointRecord) -> None: ...
    def get_checkpoint(self, ref: CheckpointRef) -> CheckpointRecord | None: ...
    def list_checkpoints(self, *, model_id: str | None = None, limit: int | None = None, offset: int = 0) -> Page: ...
    def delete_checkpoint(self, ref: CheckpointRef) -> None: ...


def _page(items: list[Any], limit: int | None, offset: int) -> Page:
    end = None if limit is None else offset + limit
    return Page(items[offset:end], len(items))


class MemoryStore:
    """`Store` in process memory; listings come back in creation order."""

    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self._runs: dict[str, TrainingRunRecord] = {}
        self._samplers: dict[str, SamplerRecord] = {}
        self._checkpoints: dict[CheckpointRef, CheckpointRecord] = {}

    def put_session(self, record: SessionRecord) -> None:
        self._sessions[record.session_id] = record

    def get_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    def list_sessions(self, *, limit: int, offset: int) -> Page:
        return _page(list(self._sessions.values()), limit, offset)

    def active_sessions(self) -> list[SessionRecord]:
        return [s for s in self._sessions.values() if s.finished is None]

    def put_training_run(self, record: TrainingRunRecord) -> None:
        self._runs[record.model_id] = record

    def get_training_run(self, model_id: str) -> TrainingRunRecord | None:
        return self._runs.get(model_id)

    def list_training_runs(self, *, limit: int, offset: int) -> Page:
        return _page(list(self._runs.values()), limit, offset)

    def session_training_runs(self, session_id: str) -> list[TrainingRunRecord]:
        return [r for r in self._runs.values() if r.session_id == session_id]

    def touch_training_run(self, model_id: str, when: datetime) -> None:
        record = self._runs.get(model_id)
        if record is not None:
            self._runs[model_id] = replace(record, last_request_time=when)

    def put_sampler(self, record: SamplerRecord) -> None:
        self._samplers[record.sampler_id] = record

    def get_sampler(self, sampler_id: str) -> SamplerRecord | None:
        return self._samplers.get(sampler_id)

    def session_samplers(self, session_id: str) -> list[SamplerRecord]:
        return [s for s in self._samplers.values() if s.session_id == session_id]

    def put_checkpoint(self, record: CheckpointRecord) -> None:
        self._checkpoints.pop(record.ref, None)  # an overwrite moves to the end, like a new one
        self._checkpoints[record.ref] = record

    def get_checkpoint(self, ref: CheckpointRef) -> CheckpointRecord | None:
        return self._checkpoints.get(ref)

    def list_checkpoints(self, *, model_id: str | None = None, limit: int | None = None, offset: int = 0) -> Page:
        items = [c for c in self._checkpoints.values() if model_id is None or c.ref.model_id == model_id]
        return _page(items, limit, offset)

    def delete_checkpoint(self, ref: CheckpointRef) -> None:
        self._checkpoints.pop(ref, None)
