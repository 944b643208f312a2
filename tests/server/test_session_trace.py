"""Session traces: bounded per session and in sessions, rendered as Trace Event Format."""

from __future__ import annotations

import pytest

from server import session_trace
from server.session_trace import SessionTraces, TracedRequest


def slices(traces: SessionTraces, session_id: str) -> list[dict]:
    return [e for e in traces.render(session_id)["traceEvents"] if e["ph"] == "X"]


def test_events_are_bounded_per_session_and_in_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_trace, "EVENTS_PER_SESSION", 3)
    monkeypatch.setattr(session_trace, "TRACED_SESSIONS", 2)
    traces = SessionTraces()
    for i in range(5):
        traces.started(f"r{i}", TracedRequest("s1", "s1:train:0", "optim_step"))
        traces.finished(f"r{i}", "done")
    trace = traces.render("s1")
    assert [e["args"]["request_id"] for e in slices(traces, "s1")] == ["r2", "r3", "r4"], "the oldest are dropped"
    assert trace["otherData"]["dropped_events"] == 2

    traces.started("a", TracedRequest("s2", "s2:sample:0", "sample"))
    traces.started("b", TracedRequest("s1", "s1:train:0", "optim_step"))
    traces.started("c", TracedRequest("s3", "s3:train:0", "forward"))
    assert slices(traces, "s2") == [], "the least recently active session is forgotten"
    assert len(slices(traces, "s1")) == 3 and len(slices(traces, "s3")) == 1
    traces.finished("a", "done")  # a request of a forgotten session finishing is harmless


def test_rendering() -> None:
    traces = SessionTraces()
    traces.started("r1", TracedRequest("s", "s:train:0", "forward_backward"))
    traces.started("r2", TracedRequest("s", "s:sample:0", "sample"))
    traces.finished("r1", "failed", "boom")
    trace = traces.render("s")
    threads = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert threads == {1: "s:train:0", 2: "s:sample:0"}, "one track per model or sampler"
    failed, pending = slices(traces, "s")
    assert (failed["name"], failed["args"]["outcome"], failed["args"]["error"]) == ("forward_backward", "failed", "boom")
    assert pending["args"]["outcome"] == "pending" and "error" not in pending["args"] and pending["dur"] >= 0
    assert slices(traces, "unknown") == []
