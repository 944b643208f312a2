"""Per-model ordering of training requests by `seq_id`, with de-duplication of retries.

The SDK numbers every training request of a model 1, 2, 3, ... (creation is 0), sends the
chunks of one forward_backward concurrently with the first chunk last, and retries with the
same `seq_id`. A request is therefore dispatched only once every lower `seq_id` of its
model has been, and a repeated `seq_id` gets the original request id back. A `seq_id`
rejected at POST time is still consumed (the SDK moved on), or the model would stall.

A rejected body that cannot even be read has no `seq_id` to consume, so no model waits
forever: once requests have waited `gap_timeout_s` for the next `seq_id`, every missing one
below the lowest waiting request is skipped (logged), and a skipped one that arrives later
is refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.config import ServerOptions
from server.errors import NotFound
from tuft_jax.errors import InputError

logger = logging.getLogger(__name__)

DEDUP_WINDOW = 4096
"""How many dispatched seq_ids per model are remembered for answering retries."""
SKIPPED_WINDOW = 64
"""How many skipped ranges per model are remembered for explaining a late arrival."""

Dispatch = Callable[[], None]


class Timer(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Timer]
"""Runs a callback after a delay, like `loop.call_later`."""


def _call_later(delay: float, callback: Callable[[], None]) -> Timer:
    return asyncio.get_running_loop().call_later(delay, callback)


def _skip() -> None:
    """Placeholder dispatch for a consumed (rejected) seq_id."""


@dataclass
class _ModelQueue:
    next_seq: int = 1
    accepted: dict[int, str] = field(default_factory=dict)
    waiting: dict[int, Dispatch] = field(default_factory=dict)
    gap_timer: Timer | None = None
    """Armed while requests wait for `next_seq`; fires after the gap timeout."""
    skipped: deque[range] = field(default_factory=lambda: deque(maxlen=SKIPPED_WINDOW))


class Sequencer:
    def __init__(
        self, gap_timeout_s: float = ServerOptions.seq_gap_timeout_s, *, call_later: CallLater = _call_later
    ) -> None:
        self._models: dict[str, _ModelQueue] = {}
        self._gap_timeout_s = gap_timeout_s
        self._call_later = call_later

    def add_model(self, model_id: str) -> None:
        """Start ordering `model_id`; its creation counts as seq_id 0."""
        self._models[model_id] = _ModelQueue()

    def remove_model(self, model_id: str) -> list[str]:
        """Forget `model_id`; returns the ids of accepted requests that were never dispatched."""
        queue = self._models.pop(model_id, None)
        if queue is None:
            return []
        if queue.gap_timer is not None:
            queue.gap_timer.cancel()
        return [queue.accepted[seq] for seq in queue.waiting if seq in queue.accepted]

    def accepted(self, model_id: str, seq_id: int) -> str | None:
        """The request id already given to (model_id, seq_id), if this is a retry."""
        return self._queue(model_id).accepted.get(seq_id)

    def submit(self, model_id: str, seq_id: int, request_id: str, dispatch: Dispatch) -> str:
        """Accept a request; `dispatch` runs once all lower seq_ids have. Returns the request id
        to answer with: the original one if (model_id, seq_id) was accepted before."""
        queue = self._queue(model_id)
        original = queue.accepted.get(seq_id)
        if original is not None:
            return original
        self.check_fresh(model_id, seq_id)
        queue.accepted[seq_id] = request_id
        queue.waiting[seq_id] = dispatch
        self._drain(model_id, queue)
        return request_id

    def consume(self, model_id: str, seq_id: int) -> None:
        """Mark a rejected seq_id as used so later ones do not wait for it forever."""
        queue = self._models.get(model_id)
        if queue is None or seq_id < queue.next_seq or seq_id in queue.waiting:
            return
        queue.waiting[seq_id] = _skip
        self._drain(model_id, queue)

    def _queue(self, model_id: str) -> _ModelQueue:
        queue = self._models.get(model_id)
        if queue is None:
            raise NotFound(f"unknown model_id {model_id!r}")
        return queue

    def check_fresh(self, model_id: str, seq_id: int) -> None:
        """Raise unless `seq_id` is still unused for `model_id` (accepted ones count as used)."""
        queue = self._queue(model_id)
        if seq_id < 1:
            raise InputError(f"seq_id must be at least 1, got {seq_id}")
        if any(seq_id in gap for gap in queue.skipped):
            raise InputError(
                f"seq_id {seq_id} of model {model_id!r} was skipped: later requests of the model waited "
                f"{self._gap_timeout_s:g} s for it, so they ran without it"
            )
        if seq_id < queue.next_seq or seq_id in queue.waiting or seq_id in queue.accepted:
            raise InputError(
                f"seq_id {seq_id} of model {model_id!r} was already used "
                "(by a rejected request, or too long ago to recognise a retry)"
            )

    def _drain(self, model_id: str, queue: _ModelQueue) -> None:
        """Dispatch what is next in order; (re)start the gap timer if requests still wait."""
        start = queue.next_seq
        while queue.next_seq in queue.waiting:
            dispatch = queue.waiting.pop(queue.next_seq)
            queue.accepted.pop(queue.next_seq - DEDUP_WINDOW, None)
            queue.next_seq += 1
            dispatch()
        if queue.next_seq == start and queue.gap_timer is not None:
            return  # still waiting for the same seq_id: its timer keeps running
        if queue.gap_timer is not None:
            queue.gap_timer.cancel()
            queue.gap_timer = None
        if queue.waiting:
            queue.gap_timer = self._call_later(self._gap_timeout_s, lambda: self._skip_gap(model_id, queue))

    def _skip_gap(self, model_id: str, queue: _ModelQueue) -> None:
        """The gap timer fired: give up on the missing seq_ids below the lowest waiting one."""
        if self._models.get(model_id) is not queue or not queue.waiting:
            return
        queue.gap_timer = None
        gap = range(queue.next_seq, min(queue.waiting))
        logger.warning(
            "model %s: skipping seq_id %s after waiting %g s for it (its request never arrived or was unreadable)",
            model_id,
            gap.start if len(gap) == 1 else f"{gap.start}..{gap.stop - 1}",
            self._gap_timeout_s,
        )
        queue.skipped.append(gap)
        queue.next_seq = gap.stop
        for seq_id in [s for s in queue.accepted if s < gap.stop - DEDUP_WINDOW]:
            del queue.accepted[seq_id]
        self._drain(model_id, queue)
