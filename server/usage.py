"""Token metering per API key: training, prompt (prefill) and sampled tokens, by UTC hour.

What counts, for every request that completes (failed requests count nothing):
- `training`: every token of every datum of a forward or forward_backward call;
- `sampling_prefill`: the prompt's tokens, once per request (its `num_samples` samples share
  the prompt's KV blocks, so it is computed once);
- `sampling_sample`: the tokens generated, summed over the request's samples.
The Tinker `asample` route and the OpenAI- and Anthropic-compatible routes are metered alike.

Counts are kept in memory and written to the store in one transaction per flush: at every
sweep (`ServerOptions.sweep_interval_s`), before any usage is read, and at shutdown. So the
engine thread never waits on the database, and a `kill -9` loses at most one sweep interval
of metering. `tokens_today` (the daily quota) includes what is not yet flushed.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import TypeVar

from server.sessions import utc_now
from server.store import Store, UsageKind, UsageRow
from tuft_jax.types import Datum, SampleResult

T = TypeVar("T")

_Key = tuple[datetime, str, str | None, str, UsageKind]
"""(hour bucket, owner, session_id, base model, kind)"""


def hour_of(when: datetime) -> datetime:
    return when.replace(minute=0, second=0, microsecond=0)


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def next_day(when: datetime) -> datetime:
    return day_start(when.date()) + timedelta(days=1)


def training_tokens(data: list[Datum]) -> int:
    return sum(int(datum.tokens.size) for datum in data)


class UsageMeter:
    def __init__(self, store: Store, clock: Callable[[], datetime] = utc_now) -> None:
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[_Key, int] = defaultdict(int)
        self._today: dict[str, tuple[date, int]] = {}
        """owner -> (UTC day, tokens counted that day, unflushed included), once looked up."""

    def record(self, owner: str | None, session_id: str | None, base_model: str, kind: UsageKind, tokens: int) -> None:
        """Count `tokens` now; thread-safe and cheap (the engine thread calls it)."""
        if owner is None or tokens <= 0:
            return
        now = self._clock()
        with self._lock:
            self._pending[(hour_of(now), owner, session_id, base_model, kind)] += tokens
            counted = self._today.get(owner)
            if counted is not None and counted[0] == now.date():
                self._today[owner] = (counted[0], counted[1] + tokens)

    def metered_sample(
        self,
        owner: str | None,
        session_id: str | None,
        base_model: str,
        prompt_tokens: int,
        finish: Callable[[SampleResult], T],
    ) -> Callable[[SampleResult], T]:
        """`finish` that first counts the request's prompt and sampled tokens."""

        def metered(result: SampleResult) -> T:
            self.record(owner, session_id, base_model, "sampling_prefill", prompt_tokens)
            sampled = sum(len(sequence.tokens) for sequence in result.sequences)
            self.record(owner, session_id, base_model, "sampling_sample", sampled)
            return finish(result)

        return metered

    def tokens_today(self, owner: str) -> int:
        """Tokens of every kind the owner used since 00:00 UTC."""
        today = self._clock().date()
        with self._lock:
            counted = self._today.get(owner)
            if counted is not None and counted[0] == today:
                return counted[1]
            self._flush_locked()
            total = self._store.usage_tokens_since(owner, day_start(today))
            self._today[owner] = (today, total)
            return total

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        rows = [UsageRow(*key, tokens) for key, tokens in self._pending.items()]
        self._store.add_usage(rows)
        self._pending.clear()
