"""Optional per-key quotas: training runs alive at once, and tokens per UTC day.

An operator sets them with `tuft api-key create --max-runs N --tokens-per-day N` or `tuft
api-key quota KEY_ID ...`; keys without a quota (and open-mode keys) are unlimited. A request
over a quota is refused with 429 and a `detail` naming the limit: both limits free up by
themselves (a run ends, the day turns), which is what 429 means to the SDK. It waits and
retries (sampling until the quota frees; training calls for five minutes), and a request the
SDK gives up on has changed nothing, so it can simply be sent again later.

The token check runs before a request is queued: it is refused when the tokens already
counted today plus the tokens it is known to bring (its training tokens, or its prompt) would
pass the limit. Sampled tokens are counted once generated, so the request that crosses the
limit by its output completes and the next one is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from server.errors import ApiError
from server.sessions import utc_now
from server.store import Quota, Store
from server.usage import UsageMeter, next_day


class QuotaExceeded(ApiError):
    status = 429


class Quotas:
    """Quota lookups are cached for `cache_s` seconds, so a changed quota applies within that time."""

    def __init__(
        self, store: Store, meter: UsageMeter, *, cache_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._meter = meter
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: dict[str, tuple[Quota, float]] = {}

    def of(self, owner: str) -> Quota:
        now = self._clock()
        with self._lock:
            cached = self._cached.get(owner)
        if cached is not None and cached[1] > now:
            return cached[0]
        quota = self._store.get_quota(owner)
        with self._lock:
            self._cached[owner] = (quota, now + self._cache_s)
        return quota

    def check_runs(self, owner: str | None, running: int) -> None:
        """Before a new training run: `running` are the owner's runs alive now."""
        if owner is None:
            return
        limit = self.of(owner).max_concurrent_runs
        if limit is not None and running >= limit:
            raise QuotaExceeded(
                f"quota reached: API key {owner} may have at most {limit} training run(s) at once and has "
                f"{running}; end a session (or let it expire) to start another"
            )

    def check_tokens(self, owner: str | None, tokens: int) -> None:
        """Before queueing a request that brings `tokens` known tokens."""
        if owner is None:
            return
        limit = self.of(owner).max_tokens_per_day
        if limit is None:
            return
        used = self._meter.tokens_today(owner)
        if used + tokens > limit:
            resets = next_day(utc_now()).isoformat().replace("+00:00", "Z")
            raise QuotaExceeded(
                f"quota reached: API key {owner} may use {limit} tokens per day (UTC); it has used {used} today "
                f"and this request brings {tokens} more; the count resets at {resets}"
            )
