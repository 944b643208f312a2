"""Per-model ordering of training requests by `seq_id`, with de-duplication of retries.

The SDK numbers every training request of a model 1, 2, 3, ... (creation is 0), sends the
chunks of one forward_backward concurrently with the first chunk last, and retries with the
same `seq_id`. A request is therefore dispatched only once every lower `seq_id` of its
model has been, and a repeated `seq_id` gets the original request id back. A `seq_id`
rejected at POST time is still consumed (the SDK moved on), or the model would stall.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from server.errors import NotFound
from tuft_jax.errors import InputError

DEDUP_WINDOW = 4096
"""How many dispatched seq_ids per model are remembered for answering retries."""

Dispatch = Callable[[], None]


def _skip() -> None:
    """Placeholder dispatch for a consumed (rejected) seq_id."""


@dataclass
class _ModelQueue:
    next_seq: int = 1
    accepted: dict[int, str] = field(default_factory=dict)
    waiting: dict[int, Dispatch] = field(default_factory=dict)


class Sequencer:
    def __init__(self) -> None:
        self._models: dict[str, _ModelQueue] = {}

    def add_model(self, model_id: str) -> None:
        """Start ordering `model_id`; its creation counts as seq_id 0."""
        self._models[model_id] = _ModelQueue()

    def remove_model(self, model_id: str) -> list[str]:
        """Forget `model_id`; returns the ids of accepted requests that were never dispatched."""
        queue = self._models.pop(model_id, None)
        if queue is None:
            return []
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
        self._drain(queue)
        return request_id

    def consume(self, model_id: str, seq_id: int) -> None:
        """Mark a rejected seq_id as used so later ones do not wait for it forever."""
        queue = self._models.get(model_id)
        if queue is None or seq_id < queue.next_seq or seq_id in queue.waiting:
            return
        queue.waiting[seq_id] = _skip
        self._drain(queue)

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
        if seq_id < queue.next_seq or seq_id in queue.waiting or seq_id in queue.accepted:
            raise InputError(
                f"seq_id {seq_id} of model {model_id!r} was already used "
                "(by a rejected request, or too long ago to recognise a retry)"
            )

    @staticmethod
    def _drain(queue: _ModelQueue) -> None:
        while queue.next_seq in queue.waiting:
            dispatch = queue.waiting.pop(queue.next_seq)
            queue.accepted.pop(queue.next_seq - DEDUP_WINDOW, None)
            queue.next_seq += 1
            dispatch()
