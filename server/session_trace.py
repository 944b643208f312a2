"""What each session's training and sampling requests did and when, for `export_session_trace`.

Every such request is a future (`server.futures`), so the future registry records an event
when a request is accepted and completes it when its result or failure is stored: kind,
request id, the model or sampler it ran on, start and end times, outcome and error. Events
live in memory only (a restart starts every trace afresh), at most `EVENTS_PER_SESSION` per
session (the oldest are dropped first) for the `TRACED_SESSIONS` most recently active
sessions.

A trace is rendered in the Trace Event Format (JSON), which https://ui.perfetto.dev and
chrome://tracing open directly: one track per model or sampler, one slice per request.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal

EVENTS_PER_SESSION = 4096
TRACED_SESSIONS = 256

Outcome = Literal["pending", "done", "failed"]


@dataclass(frozen=True)
class TracedRequest:
    """Where a request belongs in a trace."""

    session_id: str
    track: str
    """The model or sampler the request runs on."""
    kind: str
    """What it does: `forward_backward`, `optim_step`, `sample`, ..."""


@dataclass(slots=True)
class TraceEvent:
    request_id: str
    request: TracedRequest
    started_s: float
    """Wall-clock seconds since the epoch."""
    ended_s: float | None = None
    outcome: Outcome = "pending"
    error: str | None = None


@dataclass
class _SessionEvents:
    events: deque[TraceEvent] = field(default_factory=lambda: deque(maxlen=EVENTS_PER_SESSION))
    dropped: int = 0


class SessionTraces:
    def __init__(self) -> None:
        self._sessions: OrderedDict[str, _SessionEvents] = OrderedDict()
        self._running: dict[str, TraceEvent] = {}

    def started(self, request_id: str, request: TracedRequest) -> None:
        session = self._sessions.pop(request.session_id, None) or _SessionEvents()
        self._sessions[request.session_id] = session
        while len(self._sessions) > TRACED_SESSIONS:
            self._sessions.popitem(last=False)
        if len(session.events) == session.events.maxlen:
            session.dropped += 1
        event = TraceEvent(request_id, request, time.time())
        session.events.append(event)
        self._running[request_id] = event

    def finished(self, request_id: str, outcome: Outcome, error: str | None = None) -> None:
        event = self._running.pop(request_id, None)
        if event is not None:
            event.ended_s, event.outcome, event.error = time.time(), outcome, error

    def render(self, session_id: str) -> dict[str, Any]:
        """The session's trace as a Trace Event Format document."""
        session = self._sessions.get(session_id) or _SessionEvents()
        now = time.time()
        tracks: dict[str, int] = {}
        slices = []
        for event in session.events:
            tid = tracks.setdefault(event.request.track, len(tracks) + 1)
            args: dict[str, Any] = {"request_id": event.request_id, "outcome": event.outcome}
            if event.error is not None:
                args["error"] = event.error
            end = event.ended_s if event.ended_s is not None else now
            slices.append(
                {
                    "name": event.request.kind,
                    "cat": event.outcome,
                    "ph": "X",
                    "pid": 1,
                    "tid": tid,
                    "ts": round(event.started_s * 1e6),
                    "dur": max(0, round((end - event.started_s) * 1e6)),
                    "args": args,
                }
            )
        names = [_metadata("process_name", 0, f"session {session_id}")]
        names += [_metadata("thread_name", tid, track) for track, tid in tracks.items()]
        return {
            "traceEvents": names + slices,
            "displayTimeUnit": "ms",
            "otherData": {"session_id": session_id, "exported_at_s": now, "dropped_events": session.dropped},
        }


def _metadata(name: str, tid: int, value: str) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": 1, "tid": tid, "args": {"name": value}}
