"""What `tinker billing usage`, `tinker billing checkpoint-storage` and the audit log show,
built from the ledger (server.store_ledger_sql) for one owner.

Every API key is its own organization here, so a key sees its own usage and events only.
Rows are hourly, as Tinker's: tokens by (hour, kind, base model, session); checkpoints saved
per hour; storage in gigabyte-hours (1 GB = 10^9 bytes) per hour and base model, from each
checkpoint's lifetime: the live ones since they were saved, deleted or overwritten ones from
the audit events that recorded their end (written in the same transaction as the change, so
the two cannot disagree).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from server.routes.rest import string_metadata
from server.store import AuditEvent, Store
from server.usage import day_start, hour_of
from server.wire.billing_types import (
    AuditLogEntry,
    AuditLogResponse,
    BillingEventInfo,
    BillingUsageEvent,
    BillingUsageResponse,
    BillingUsageSession,
    CheckpointBillingEvent,
    CurrentCheckpointStorageUsageItem,
    CurrentCheckpointStorageUsageResponse,
    SamplingPrefillBillingEvent,
    SamplingSampleBillingEvent,
    StorageBillingEvent,
    TrainingBillingEvent,
)

HOUR = timedelta(hours=1)
GIGABYTE = 10**9
MAX_WINDOW = timedelta(days=14)
AUDIT_EVENT_TYPES = {
    "all": None,
    "checkpoints": ("checkpoint_",),
    "projects": ("project_",),
    "teams": ("team_",),
    "organizations": ("organization_",),
}
"""The audit log's `event_type` filter: event-name prefixes (this server has no teams or
organizations beyond the key itself, so those two are always empty)."""
_SAVES = ("checkpoint_create", "checkpoint_overwrite")


@dataclass(frozen=True)
class _Lifetime:
    """A stored checkpoint version: `size_bytes` held from `start` until `end`."""

    base_model: str
    size_bytes: int
    start: datetime
    end: datetime


def usage_report(store: Store, owner: str, start: datetime, end: datetime, now: datetime) -> BillingUsageResponse:
    """Hourly usage of `owner` in `[start, end)`, ordered by bucket then descending quantity."""
    user_name = _user_name(store, owner)
    rows: list[tuple[datetime, float, str | None, str | None, BillingEventInfo]] = []
    for usage in store.usage_between(owner, start, end):
        info: BillingEventInfo
        if usage.kind == "training":
            info = TrainingBillingEvent(token_count=usage.tokens)
        elif usage.kind == "sampling_prefill":
            info = SamplingPrefillBillingEvent(cached=False, token_count=usage.tokens)
        else:
            info = SamplingSampleBillingEvent(token_count=usage.tokens)
        rows.append((usage.bucket_start, usage.tokens, usage.base_model, usage.session_id, info))
    events = store.audit_events(owner, start, max(end, now) + HOUR, ("checkpoint_",))
    saves: dict[tuple[datetime, str, str | None], int] = defaultdict(int)
    for event in events:
        if event.event in _SAVES and event.timestamp < end:
            saves[(hour_of(event.timestamp), event.details.get("base_model", ""), event.details.get("session_id"))] += 1
    for (bucket, base_model, session_id), count in saves.items():
        rows.append((bucket, count, base_model, session_id, CheckpointBillingEvent(count=count)))
    for (bucket, base_model), gigabyte_hours in _storage(store, owner, events, start, min(end, now)).items():
        rows.append((bucket, gigabyte_hours, base_model, None, StorageBillingEvent(gigabyte_hours=gigabyte_hours)))
    rows.sort(key=lambda row: (row[0], -row[1]))
    sessions = {session_id for *_, session_id, _ in rows if session_id is not None}
    records = {session_id: store.get_session(session_id) for session_id in sorted(sessions)}
    return BillingUsageResponse(
        data=[
            BillingUsageEvent(
                bucket_start=bucket,
                bucket_end=bucket + HOUR,
                event_info=info,
                base_model=base_model or None,
                user_id=owner,
                user_name=user_name,
                session_id=session_id,
                project_id=None if session_id is None or records[session_id] is None else records[session_id].project_id,
            )
            for bucket, _, base_model, session_id, info in rows
        ],
        sessions={
            session_id: BillingUsageSession(user_metadata=None if record is None else string_metadata(record.user_metadata))
            for session_id, record in records.items()
        },
    )


def _storage(
    store: Store, owner: str, events: list[AuditEvent], start: datetime, end: datetime
) -> dict[tuple[datetime, str], float]:
    """Gigabyte-hours per (hour, base model) in `[start, end)`."""
    totals: dict[tuple[datetime, str], float] = defaultdict(float)
    for life in _lifetimes(store, owner, events, end):
        first, last = max(life.start, start), min(life.end, end)
        bucket = hour_of(first)
        while bucket < last:
            overlap = min(bucket + HOUR, last) - max(bucket, first)
            totals[(bucket, life.base_model)] += life.size_bytes / GIGABYTE * (overlap / HOUR)
            bucket += HOUR
    return totals


def _lifetimes(store: Store, owner: str, events: list[AuditEvent], now: datetime) -> Iterator[_Lifetime]:
    for record in store.list_checkpoints(owner=owner).items:
        yield _Lifetime(record.base_model, record.size_bytes or 0, record.created_at, now)
    for event in events:
        details = event.details
        if event.event == "checkpoint_delete":
            size, born = details.get("size_bytes"), details.get("created_at")
        elif event.event == "checkpoint_overwrite":
            size, born = details.get("previous_size_bytes"), details.get("previous_created_at")
        else:
            continue
        if born is not None:
            yield _Lifetime(details.get("base_model", ""), size or 0, datetime.fromisoformat(born), event.timestamp)


def storage_now(store: Store, owner: str, project_id: str | None, now: datetime) -> CurrentCheckpointStorageUsageResponse:
    """The owner's live checkpoints, by the project of the session that saved them."""
    groups: dict[str | None, list[int]] = defaultdict(lambda: [0, 0])
    projects: dict[str, str | None] = {}
    for record in store.list_checkpoints(owner=owner, alive_at=now).items:
        model_id = record.ref.model_id
        if model_id not in projects:
            run = store.get_training_run(model_id)
            session = None if run is None else store.get_session(run.session_id)
            projects[model_id] = None if session is None else session.project_id
        project = projects[model_id]
        if project_id is not None and project != project_id:
            continue
        groups[project][0] += 1
        groups[project][1] += record.size_bytes or 0
    user_name = _user_name(store, owner)
    return CurrentCheckpointStorageUsageResponse(
        data=[
            CurrentCheckpointStorageUsageItem(
                checkpoint_count=count,
                size_bytes=size,
                size_gigabytes=size / GIGABYTE,
                project_id=project,
                org_user_urn=owner,
                user_name=user_name,
            )
            for project, (count, size) in sorted(groups.items(), key=lambda item: item[0] or "")
        ]
    )


def audit_log(store: Store, owner: str, event_type: str, day: date) -> AuditLogResponse:
    start = day_start(day)
    entries = []
    for event in store.audit_events(owner, start, start + timedelta(days=1), AUDIT_EVENT_TYPES[event_type]):
        details = event.details
        checkpoint = event.event.startswith("checkpoint_")
        entries.append(
            AuditLogEntry(
                timestamp=event.timestamp,
                event=event.event,
                event_details=details,
                model_id=details.get("model_id") if checkpoint else None,
                tinker_path=details.get("tinker_path") if checkpoint else None,
                purpose=details.get("purpose") if event.event == "checkpoint_read" else None,
            )
        )
    return AuditLogResponse(entries=entries)


def _user_name(store: Store, owner: str) -> str | None:
    record = store.get_api_key(owner)
    return None if record is None else record.name
