"""The admin endpoints (`AdminClient`, `tinker billing usage|checkpoint-storage`): the caller's
metered usage, its current checkpoint storage and its audit log (server.billing)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import billing
from server.http import json_response
from server.service import Service
from server.sessions import utc_now
from tuft_jax.errors import InputError


def _hour(request: Request, name: str) -> datetime:
    """An RFC 3339 query timestamp on a UTC hour boundary."""
    raw = request.query_params.get(name)
    if raw is None:
        raise InputError(f"{name} is required (an RFC 3339 timestamp on a UTC hour, e.g. 2026-07-13T00:00:00Z)")
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise InputError(f"{name} must be an RFC 3339 timestamp, got {raw[:40]!r}") from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if when.minute or when.second or when.microsecond:
        raise InputError(f"{name} must be on a UTC hour boundary, got {raw[:40]!r}")
    return when


async def billing_usage(request: Request) -> Response:
    start, end = _hour(request, "starting_on"), _hour(request, "ending_before")
    now = utc_now()
    if end <= start:
        raise InputError("ending_before must be after starting_on")
    if end - start > billing.MAX_WINDOW:
        raise InputError(f"the window may span at most {billing.MAX_WINDOW.days} days")
    if start > now:
        raise InputError("starting_on must not be in the future")
    service = Service.of(request)
    owner = request.state.owner
    await run_in_threadpool(service.usage.flush)
    report = await run_in_threadpool(billing.usage_report, service.store, owner, start, end, now)
    return json_response(report)


async def checkpoint_storage(request: Request) -> Response:
    service = Service.of(request)
    project_id = request.query_params.get("project_id") or None
    report = await run_in_threadpool(billing.storage_now, service.store, request.state.owner, project_id, utc_now())
    return json_response(report)


async def audit_log(request: Request) -> Response:
    event_type = request.query_params.get("event_type", "all")
    if event_type not in billing.AUDIT_EVENT_TYPES:
        raise InputError(f"event_type must be one of {', '.join(billing.AUDIT_EVENT_TYPES)}, got {event_type[:40]!r}")
    raw_day = request.query_params.get("day")
    try:
        day = utc_now().date() if raw_day is None else date.fromisoformat(raw_day)
    except ValueError:
        raise InputError(f"day must be a date (YYYY-MM-DD), got {raw_day[:40]!r}") from None
    service = Service.of(request)
    report = await run_in_threadpool(billing.audit_log, service.store, request.state.owner, event_type, day)
    return json_response(report)


routes = [
    Route("/api/v1/billing/usage/events", billing_usage, methods=["GET"]),
    Route("/api/v1/billing/usage/checkpoints/current", checkpoint_storage, methods=["GET"]),
    Route("/api/v1/audit", audit_log, methods=["GET"]),
]
