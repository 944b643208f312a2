"""The ledger tables of `SqlStore`: metered token usage, the audit log and per-key quotas.

Usage is stored pre-aggregated, one row per (UTC hour, owner, session, base model, kind), so a
busy server writes a handful of rows per flush and a 14-day billing window reads at most a few
thousand. The audit log is append-only; checkpoint events are written by `SqlStore` in the same
transaction as the change they describe, so the storage accounting derived from them
(server.billing) can never disagree with the checkpoints table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from server.sql_values import from_json, from_us, to_json, to_us
from server.store import AuditEvent, Quota, UsageRow

Execute = Callable[[str, Sequence[Any]], Any]

NO_SESSION = ""
"""The `session_id` column's value for usage outside any Tinker session (the OpenAI- and
Anthropic-compatible endpoints); part of the primary key, so never NULL."""

LEDGER_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS usage (
        bucket BIGINT NOT NULL, owner TEXT NOT NULL, session_id TEXT NOT NULL, base_model TEXT NOT NULL,
        kind TEXT NOT NULL, tokens BIGINT NOT NULL, PRIMARY KEY (owner, bucket, session_id, base_model, kind))""",
    """CREATE TABLE IF NOT EXISTS audit_events (
        seq BIGINT PRIMARY KEY, owner TEXT NOT NULL, at BIGINT NOT NULL, event TEXT NOT NULL, details TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_events_by_owner ON audit_events (owner, at)",
    """CREATE TABLE IF NOT EXISTS quotas (
        key_id TEXT PRIMARY KEY, max_concurrent_runs BIGINT, max_tokens_per_day BIGINT)""",
]


class LedgerTables:
    """Mixed into `SqlStore`, whose transaction helpers it uses."""

    _tx: Callable[..., AbstractContextManager[Execute]]
    _query: Callable[[str, Sequence[Any]], list[tuple]]
    _one: Callable[[str, Sequence[Any]], tuple | None]
    _next_seq: Callable[[], int]

    # ---- usage ------------------------------------------------------------------------------

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add the rows' tokens to what is already counted (one transaction)."""
        with self._tx() as execute:
            for row in rows:
                execute(
                    """INSERT INTO usage (bucket, owner, session_id, base_model, kind, tokens)
                    VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, bucket, session_id, base_model, kind)
                    DO UPDATE SET tokens = usage.tokens + excluded.tokens""",
                    (
                        to_us(row.bucket_start),
                        row.owner,
                        row.session_id or NO_SESSION,
                        row.base_model,
                        row.kind,
                        row.tokens,
                    ),
                )

    def usage_between(self, owner: str, start: datetime, end: datetime) -> list[UsageRow]:
        """The owner's usage rows with `start <= bucket < end`, oldest bucket first."""
        rows = self._query(
            """SELECT bucket, session_id, base_model, kind, tokens FROM usage
            WHERE owner = ? AND bucket >= ? AND bucket < ? ORDER BY bucket, tokens DESC""",
            (owner, to_us(start), to_us(end)),
        )
        return [
            UsageRow(from_us(r[0]), owner, r[1] or None, r[2], r[3], int(r[4]))  # type: ignore[arg-type]
            for r in rows
        ]

    def usage_tokens_since(self, owner: str, since: datetime) -> int:
        row = self._one("SELECT SUM(tokens) FROM usage WHERE owner = ? AND bucket >= ?", (owner, to_us(since)))
        return 0 if row is None or row[0] is None else int(row[0])

    # ---- audit log --------------------------------------------------------------------------

    def add_audit_event(self, event: AuditEvent) -> None:
        with self._tx() as execute:
            self._audit(execute, event)

    def _audit(self, execute: Execute, event: AuditEvent) -> None:
        execute(
            "INSERT INTO audit_events (seq, owner, at, event, details) VALUES (?, ?, ?, ?, ?)",
            (self._next_seq(), event.owner, to_us(event.timestamp), event.event, to_json(event.details)),
        )

    def audit_events(
        self, owner: str, start: datetime, end: datetime, prefixes: Sequence[str] | None = None
    ) -> list[AuditEvent]:
        """The owner's events with `start <= timestamp < end` in the order they happened; with
        `prefixes`, only events whose name starts with one of them."""
        rows = self._query(
            "SELECT at, event, details FROM audit_events WHERE owner = ? AND at >= ? AND at < ? ORDER BY seq",
            (owner, to_us(start), to_us(end)),
        )
        return [
            AuditEvent(from_us(at), owner, event, from_json(details))  # type: ignore[arg-type]
            for at, event, details in rows
            if prefixes is None or event.startswith(tuple(prefixes))
        ]

    # ---- quotas -----------------------------------------------------------------------------

    def set_quota(self, key_id: str, quota: Quota) -> None:
        with self._tx() as execute:
            execute(
                """INSERT INTO quotas (key_id, max_concurrent_runs, max_tokens_per_day) VALUES (?, ?, ?)
                ON CONFLICT (key_id) DO UPDATE SET max_concurrent_runs = excluded.max_concurrent_runs,
                max_tokens_per_day = excluded.max_tokens_per_day""",
                (key_id, quota.max_concurrent_runs, quota.max_tokens_per_day),
            )

    def get_quota(self, key_id: str) -> Quota:
        row = self._one("SELECT max_concurrent_runs, max_tokens_per_day FROM quotas WHERE key_id = ?", (key_id,))
        return Quota() if row is None else Quota(row[0], row[1])

