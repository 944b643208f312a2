"""What is loaded right now: training models and samplers with their engine adapter slots.

`slot` fields are written on the engine's worker thread, by the job that creates the
adapter, and read by later jobs on the same thread; the event loop only reads them once
the creating request has completed.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from server.wire.types import UntypedAPIFuture
from tuft_jax.errors import InputError

BASE_MODEL_SLOT = 0


@dataclass
class LiveModel:
    model_id: str
    session_id: str
    base_model: str
    create_request_id: str
    """Answer to a retried create_model / create-via-load for this id."""
    slot: int | None = None
    optim_steps: int = 0
    """Optimizer steps this run has taken; counted on the worker thread (server.step_metrics)."""

    def require_slot(self) -> int:
        if self.slot is None:
            raise InputError(f"model {self.model_id!r} has no adapter (its creation failed)")
        return self.slot


@dataclass
class LiveSampler:
    sampler_id: str
    session_id: str
    base_model: str
    slot: int | None = None
    loading: asyncio.Future[None] | None = None
    """Set while a checkpoint is being loaded, so a retried create waits for the same load."""
    recent: OrderedDict[int, UntypedAPIFuture] = field(default_factory=OrderedDict)
    """Replies to recent asample calls by seq_id, for retries."""

    def require_slot(self) -> int:
        if self.slot is None:
            raise InputError(f"sampler {self.sampler_id!r} has no weights loaded")
        return self.slot

    def remember(self, seq_id: int, reply: UntypedAPIFuture, capacity: int) -> None:
        self.recent[seq_id] = reply
        while len(self.recent) > capacity:
            self.recent.popitem(last=False)
