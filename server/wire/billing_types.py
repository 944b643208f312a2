"""JSON bodies of the admin endpoints (`AdminClient`, `tinker billing ...`): billing usage,
current checkpoint storage and the audit log, as in tinker 0.38's `types`.

Cost and rate fields (`estimated_cost_usd`, `effective_rate_*`) are left out: a self-hosted
server has no price list, and the SDK reads their absence as "not available" (`null`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.wire.types import Response


class TrainingBillingEvent(Response, tag_field="type", tag="training"):
    token_count: int


class SamplingPrefillBillingEvent(Response, tag_field="type", tag="sampling_prefill"):
    cached: bool
    token_count: int


class SamplingSampleBillingEvent(Response, tag_field="type", tag="sampling_sample"):
    token_count: int


class CheckpointBillingEvent(Response, tag_field="type", tag="checkpoint"):
    count: int


class StorageBillingEvent(Response, tag_field="type", tag="storage"):
    gigabyte_hours: float
    free: bool = False


BillingEventInfo = (
    TrainingBillingEvent
    | SamplingPrefillBillingEvent
    | SamplingSampleBillingEvent
    | CheckpointBillingEvent
    | StorageBillingEvent
)


class BillingUsageEvent(Response):
    bucket_start: datetime
    bucket_end: datetime
    event_info: BillingEventInfo
    base_model: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    session_id: str | None = None
    project_id: str | None = None


class BillingUsageSession(Response):
    user_metadata: dict[str, str] | None = None


class BillingUsageResponse(Response):
    data: list[BillingUsageEvent]
    sessions: dict[str, BillingUsageSession]


class CurrentCheckpointStorageUsageItem(Response):
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    project_id: str | None = None
    org_user_urn: str | None = None
    user_name: str | None = None


class CurrentCheckpointStorageUsageResponse(Response):
    data: list[CurrentCheckpointStorageUsageItem]


class AuditLogEntry(Response):
    timestamp: datetime
    event: str
    event_details: dict[str, Any]
    model_id: str | None = None
    tinker_path: str | None = None
    purpose: str | None = None


class AuditLogResponse(Response):
    entries: list[AuditLogEntry]
