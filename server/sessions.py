"""Client sessions: creation, heartbeats, finishing and expiry, and the ids derived from them.

The SDK computes training model ids itself (`{session_id}:train:{model_seq_id}`) when it
creates a model from a checkpoint, so these formats are part of the protocol.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from server.auth import current_owner, visible_to_caller
from server.errors import Gone, NotFound
from server.store import AuditEvent, SessionRecord, Store
from server.wire.types import CreateSessionRequest

OWNER = "local"
"""Owner of sessions created outside a request (tests, tools); requests use the caller's."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def model_id_for(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampler_id_for(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


class Sessions:
    def __init__(self, store: Store, *, timeout_s: float, clock: Callable[[], datetime] = utc_now) -> None:
        self._store = store
        self._timeout = timedelta(seconds=timeout_s)
        self._clock = clock

    def create(self, request: CreateSessionRequest) -> SessionRecord:
        now = self._clock()
        record = SessionRecord(
            session_id=str(uuid.uuid4()),
            owner=current_owner() or OWNER,
            created_at=now,
            last_heartbeat=now,
            sdk_version=request.sdk_version,
            tags=tuple(request.tags),
            user_metadata=request.user_metadata,
            project_id=request.project_id,
            display_name=request.display_name,
        )
        self._store.put_session(record)
        return record

    def get(self, session_id: str) -> SessionRecord:
        """The session, if it exists and belongs to the caller (another tenant's is a 404)."""
        record = self._store.get_session(session_id)
        if record is None or not visible_to_caller(record.owner):
            raise NotFound(f"unknown session {session_id!r}")
        return record

    def require_active(self, session_id: str) -> SessionRecord:
        record = self.get(session_id)
        if record.finished is not None:
            raise Gone(f"session {session_id!r} has ended ({record.finished})")
        return record

    def heartbeat(self, session_id: str) -> None:
        record = self.require_active(session_id)
        self._store.put_session(replace(record, last_heartbeat=self._clock()))

    def assign_project(self, session_id: str, project_id: str) -> None:
        """Move a session, and with it its training runs, into a project (ended ones too);
        audited as `project_session_assign`."""
        record = self.get(session_id)
        self._store.put_session(replace(record, project_id=project_id))
        details = {"session_id": session_id, "project_id": project_id, "previous_project_id": record.project_id}
        self._store.add_audit_event(AuditEvent(self._clock(), record.owner, "project_session_assign", details))

    def finish(self, session_id: str, reason: str) -> bool:
        """End an active session; False if it had already ended."""
        record = self.get(session_id)
        if record.finished is not None:
            return False
        self._store.put_session(replace(record, finished=reason))
        return True

    def expired(self) -> list[str]:
        """Active sessions whose client stopped heartbeating."""
        cutoff = self._clock() - self._timeout
        return [s.session_id for s in self._store.active_sessions() if s.last_heartbeat < cutoff]
