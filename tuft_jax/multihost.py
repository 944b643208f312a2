"""Multi-controller JAX: every process runs the same engine calls in the same order.

Process 0 serves HTTP. Each engine method that touches devices is marked `@collective`:
on process 0 it first broadcasts its name and arguments (pickled) to the other processes,
which run `serve_worker` — a loop that replays each call on their own engine — so all
processes enter every jitted computation together over the global mesh.
"""

from __future__ import annotations

import functools
import logging
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_SHUTDOWN = "__shutdown__"
_ANNOUNCING = threading.RLock()
"""Held by process 0 from announcing a call to its end, so calls of several engines never interleave."""
_inside = threading.local()


@dataclass(frozen=True)
class ProcessGroup:
    coordinator_address: str
    num_processes: int
    process_id: int


def initialize(group: ProcessGroup) -> None:
    """Joins the JAX process group and starts every local backend (gloo serves CPU collectives)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=group.coordinator_address, num_processes=group.num_processes, process_id=group.process_id
    )
    jax.devices()


def _broadcast_bytes(payload: bytes | None) -> bytes:
    """Sends process 0's bytes to all processes (others pass None). Sizes are rounded up to a
    power of two so only a few broadcast programs are ever compiled."""
    size = np.array([0 if payload is None else len(payload)], np.int32)
    size = int(multihost_utils.broadcast_one_to_all(size)[0])
    buffer = np.zeros(1 << max(size - 1, 0).bit_length(), np.uint8)
    if payload is not None:
        buffer[:size] = np.frombuffer(payload, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size])


@dataclass(frozen=True)
class Broadcaster:
    """Process 0's sender of one engine's calls."""

    engine_name: str

    def send(self, method: str, args: tuple, kwargs: dict) -> None:
        _broadcast_bytes(pickle.dumps((self.engine_name, method, args, kwargs)))


def shutdown_workers() -> None:
    """Ends `serve_workers` on the other processes, then leaves the group with them (process 0,
    at exit; leaving together keeps the coordinator up until every process has let go)."""
    with _ANNOUNCING:
        _broadcast_bytes(pickle.dumps((_SHUTDOWN, "", (), {})))
    jax.distributed.shutdown()


def collective(method: F) -> F:
    """Marks an engine method that every process must run; process 0 announces it first.

    A collective call made inside another is not announced: the other processes reach it by
    running the outer call's body."""

    @functools.wraps(method)
    def announced(self, *args: Any, **kwargs: Any) -> Any:
        if self.broadcaster is None or getattr(_inside, "active", False):
            return method(self, *args, **kwargs)
        with _ANNOUNCING:
            self.broadcaster.send(method.__name__, args, kwargs)
            _inside.active = True
            try:
                return method(self, *args, **kwargs)
            finally:
                _inside.active = False

    announced.collective_body = method
    return announced  # type: ignore[return-value]


def serve_workers(engines: dict[str, Any]) -> None:
    """Replays process 0's engine calls until it shuts down (processes other than 0)."""
    while True:
        engine_name, method, args, kwargs = pickle.loads(_broadcast_bytes(None))
        if engine_name == _SHUTDOWN:
            jax.distributed.shutdown()
            return
        engine = engines[engine_name]
        try:
            getattr(type(engine), method).collective_body(engine, *args, **kwargs)
        except Exception:
            logger.exception("engine call %s failed on this process (process 0 reports it to the client)", method)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array's full value as numpy on every process."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
