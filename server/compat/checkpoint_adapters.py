"""Adapters loaded from checkpoints for the OpenAI- and Anthropic-compatible routes.

Those APIs name the weights in every request (`model`) and have no sampling session to hold
them, so a loaded checkpoint is kept here and shared by every request that names it (who may
read a checkpoint is checked per request, before this cache is consulted). Beyond `capacity`,
the least recently used adapters that no request is using are released.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass


@dataclass
class _Loaded:
    base_model: str
    slot: asyncio.Future[int]
    users: int = 0


class CheckpointAdapters:
    def __init__(self, capacity: int, release: Callable[[str, Callable[[], int | None]], None]) -> None:
        """`release(base_model, slot)` frees an adapter on its engine (`Service.release_slot`)."""
        self.capacity = capacity
        self._release = release
        self._loaded: OrderedDict[Hashable, _Loaded] = OrderedDict()

    @contextlib.asynccontextmanager
    async def lease(
        self, key: Hashable, base_model: str, load: Callable[[], asyncio.Future[int]]
    ) -> AsyncIterator[int]:
        """The adapter of checkpoint `key`, loaded with `load()` unless it already is; it stays
        loaded while the lease is held. A failed load is forgotten, so the next request retries."""
        entry = self._loaded.get(key)
        if entry is None:
            entry = self._loaded[key] = _Loaded(base_model, load())
            entry.slot.add_done_callback(lambda _: self._loaded_or_failed(key, entry))
        self._loaded.move_to_end(key)
        entry.users += 1
        try:
            yield await asyncio.shield(entry.slot)
        finally:
            entry.users -= 1
            self._release_idle_beyond_capacity()

    def _loaded_or_failed(self, key: Hashable, entry: _Loaded) -> None:
        if entry.slot.cancelled() or entry.slot.exception() is not None:
            if self._loaded.get(key) is entry:
                del self._loaded[key]
            return
        self._release_idle_beyond_capacity()

    def _release_idle_beyond_capacity(self) -> None:
        idle = [key for key, entry in self._loaded.items() if entry.users == 0 and entry.slot.done()]
        for key in idle[: max(0, len(self._loaded) - self.capacity)]:
            entry = self._loaded.pop(key)
            self._release(entry.base_model, entry.slot.result)

