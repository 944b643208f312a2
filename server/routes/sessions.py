"""Session search, projects and trace exports (`RestClient.search_sessions`,
`assign_session_project`, `export_session_trace`).

A project is a label on a session; a session's training runs are in its project, so the
training-run listing's `project_id` filter and search's `project_ids` follow a session that
moves. Sessions belong to the key that created them, so every search scope ends at the
caller's own sessions: `accessible` is what the caller can access (its own), and a `user`
scope finds something only if it names the caller. Another key's session is a 404 here as
everywhere.

A trace export is built on request and is ready at once: the answer is a link, signed for
the caller (`Service.signed_url`), to the trace document (server.session_trace), which the
CLI downloads with a plain HTTP client.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.auth import current_owner
from server.errors import NotFound
from server.http import json_response, read_json
from server.routes.rest import string_metadata
from server.service import Service
from server.sessions import utc_now
from server.store import SessionCursor, SessionRecord
from server.wire.types import (
    ActiveStatus,
    ActiveStatusQuery,
    AssignSessionProjectRequest,
    ClientFinishedStatus,
    ClientFinishedStatusQuery,
    ClientFinishReason,
    SessionSearchCursor,
    SessionSearchRequest,
    SessionSearchResponse,
    SessionSummary,
    SessionTraceExportResponse,
    StatusQuery,
    UserSearchOwner,
)

SEARCH_BATCH = 200
"""Sessions read from the store at a time while matching a search."""
_CLIENT_FINISHED = ("success", "errored", "interrupted")


# ---- search -----------------------------------------------------------------------------------


def _status(record: SessionRecord) -> ActiveStatus | ClientFinishedStatus | None:
    if record.finished is None:
        return ActiveStatus()
    if record.finished in _CLIENT_FINISHED:
        return ClientFinishedStatus(reason=ClientFinishReason(type=record.finished))  # type: ignore[arg-type]
    return None


def _status_matches(record: SessionRecord, query: StatusQuery) -> bool:
    """This server never cancels or fails a session, so those queries match nothing."""
    if isinstance(query, ActiveStatusQuery):
        return record.finished is None
    if isinstance(query, ClientFinishedStatusQuery):
        return record.finished in (query.reasons or _CLIENT_FINISHED)
    return False


def _matches(record: SessionRecord, search: SessionSearchRequest) -> bool:
    if search.session_id is not None or search.display_name is not None:
        name = (record.display_name or "").casefold()
        named = search.display_name is not None and all(w in name for w in search.display_name.casefold().split())
        if record.session_id != search.session_id and not named:
            return False
    metadata = string_metadata(record.user_metadata) or {}
    if any(metadata.get(key) != value for key, value in search.user_metadata.items()):
        return False
    return search.statuses is None or any(_status_matches(record, query) for query in search.statuses)


def _search(service: Service, owner: str, search: SessionSearchRequest) -> tuple[list[SessionRecord], bool]:
    """Up to `search.limit` matching sessions after the cursor, newest first, and whether more match."""
    if isinstance(search.owner, UserSearchOwner) and owner not in search.owner.owner_urns:
        return [], False
    cursor = search.cursor
    after = None if cursor is None else SessionCursor(cursor.last_created_at, cursor.last_session_id)
    matched: list[SessionRecord] = []
    while True:
        batch = service.store.sessions_newest_first(
            owner, project_ids=search.project_ids, after=after, limit=SEARCH_BATCH
        )
        for record in batch:
            if _matches(record, search):
                matched.append(record)
                if len(matched) > search.limit:
                    return matched[: search.limit], True
        if len(batch) < SEARCH_BATCH:
            return matched, False
        after = SessionCursor(batch[-1].created_at, batch[-1].session_id)


async def search_sessions(request: Request) -> Response:
    search = await read_json(request, SessionSearchRequest)
    service = Service.of(request)
    records, more = _search(service, request.state.owner, search)
    totals = service.store.session_checkpoint_totals([r.session_id for r in records], utc_now())
    summaries = []
    for record in records:
        total = totals.get(record.session_id)
        summaries.append(
            SessionSummary(
                session_id=record.session_id,
                created_at=record.created_at,
                owner=record.owner,
                project_id=record.project_id or "",
                checkpoints_count=0 if total is None else total.count,
                status=_status(record),
                display_name=record.display_name,
                user_metadata=string_metadata(record.user_metadata),
                checkpoint_storage_bytes=0 if total is None else total.size_bytes,
            )
        )
    last = records[-1] if more else None
    next_cursor = None if last is None else SessionSearchCursor(last.created_at, last.session_id)
    return json_response(SessionSearchResponse(sessions=summaries, next_cursor=next_cursor))


# ---- projects ---------------------------------------------------------------------------------


async def assign_project(request: Request) -> Response:
    body = await read_json(request, AssignSessionProjectRequest)
    Service.of(request).sessions.assign_project(request.path_params["session_id"], body.project_id)
    return json_response({})


# ---- traces -----------------------------------------------------------------------------------


async def export_trace(request: Request) -> Response:
    service = Service.of(request)
    session = service.sessions.get(request.path_params["session_id"])
    link = service.signed_url(request, _trace_path(session.session_id), service.url_expiry())
    return json_response(SessionTraceExportResponse(status="ready", url=link))


def _trace_path(session_id: str) -> str:
    return f"/api/v1/sessions/{session_id}/trace"


async def session_trace(request: Request) -> Response:
    """The trace document: for the session's owner, or for a signed link without a key."""
    service = Service.of(request)
    session_id = request.path_params["session_id"]
    if current_owner() is None:
        valid = service.url_signer.is_valid(_trace_path(session_id), request.query_params)
        if not valid or service.store.get_session(session_id) is None:
            raise NotFound("this download link is invalid or has expired")
    else:
        service.sessions.get(session_id)
    response = json_response(service.traces.render(session_id))
    response.headers["Content-Disposition"] = f'attachment; filename="{session_id}.trace.json"'
    return response


routes = [
    Route("/api/v1/sessions/search", search_sessions, methods=["POST"]),
    Route("/api/v1/sessions/{session_id}/project", assign_project, methods=["PUT"]),
    Route("/api/v1/sessions/{session_id}/trace_export", export_trace, methods=["GET"]),
    Route("/api/v1/sessions/{session_id}/trace", session_trace, methods=["GET"]),
]
