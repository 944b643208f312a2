"""The usage meter: counts batched in memory, flushed as aggregated rows, the daily total for
quotas including what is not flushed yet, and the day boundary in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from server.store_sql import SqlStore
from server.usage import UsageMeter
from tuft_jax.types import SampledSequence, SampleResult


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_counts_are_aggregated_per_hour_and_flushed_once(tmp_path: Path) -> None:
    store = SqlStore.sqlite(tmp_path / "db.sqlite")
    clock = Clock(datetime(2026, 5, 1, 10, 15, tzinfo=UTC))
    meter = UsageMeter(store, clock)
    meter.record("alice", "s1", "m", "training", 5)
    meter.record("alice", "s1", "m", "training", 7)
    clock.now += timedelta(hours=1)
    meter.record("alice", "s1", "m", "training", 1)
    meter.record(None, "s1", "m", "training", 100)  # no caller: nothing to bill
    assert store.usage_between("alice", clock.now - timedelta(days=1), clock.now + timedelta(days=1)) == []
    meter.flush()
    meter.flush()
    rows = store.usage_between("alice", clock.now - timedelta(days=1), clock.now + timedelta(days=1))
    assert [(r.bucket_start.hour, r.session_id, r.tokens) for r in rows] == [(10, "s1", 12), (11, "s1", 1)]


def test_tokens_today_includes_unflushed_counts_and_resets_at_midnight_utc(tmp_path: Path) -> None:
    store = SqlStore.sqlite(tmp_path / "db.sqlite")
    clock = Clock(datetime(2026, 5, 1, 23, 30, tzinfo=UTC))
    meter = UsageMeter(store, clock)
    meter.record("alice", None, "m", "sampling_prefill", 4)
    assert meter.tokens_today("alice") == 4
    meter.record("alice", None, "m", "sampling_sample", 6)
    assert meter.tokens_today("alice") == 10
    meter.flush()
    assert UsageMeter(store, clock).tokens_today("alice") == 10, "a restarted server reads the flushed count"
    clock.now += timedelta(hours=1)
    assert meter.tokens_today("alice") == 0
    assert meter.tokens_today("bob") == 0


def test_metered_sample_counts_the_prompt_once_and_every_sampled_token(tmp_path: Path) -> None:
    store = SqlStore.sqlite(tmp_path / "db.sqlite")
    clock = Clock(datetime(2026, 5, 1, 9, tzinfo=UTC))
    meter = UsageMeter(store, clock)
    finish = meter.metered_sample("alice", "s1", "m", 3, lambda result: len(result.sequences))
    sequences = [SampledSequence([1, 2], [0.0, 0.0], "stop"), SampledSequence([1, 2, 3], [0.0] * 3, "length")]
    assert finish(SampleResult(sequences)) == 2
    meter.flush()
    rows = store.usage_between("alice", clock.now - timedelta(hours=1), clock.now + timedelta(hours=1))
    assert {r.kind: r.tokens for r in rows} == {"sampling_prefill": 3, "sampling_sample": 5}
