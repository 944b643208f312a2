"""Future registry: long-poll wake-up, hold expiry, failures, TTL."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from server.errors import NotFound
from server.futures import JSON, PROTOBUF, FutureRegistry
from server.wire.types import CreateModelResponse
from tuft_jax.errors import InputError


def run(coro):
    return asyncio.run(coro)


def test_wait_wakes_on_completion() -> None:
    async def scenario() -> None:
        registry = FutureRegistry()
        request_id = registry.create()
        waiter = asyncio.create_task(registry.wait(request_id, hold_s=5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        registry.complete(request_id, CreateModelResponse(model_id="s:train:0"))
        result = await asyncio.wait_for(waiter, 1)
        assert result is not None and result.media_type == JSON
        assert msgspec.json.decode(result.body) == {"type": "create_model", "model_id": "s:train:0"}

    run(scenario())


def test_wait_returns_none_after_hold() -> None:
    async def scenario() -> None:
        registry = FutureRegistry()
        assert await registry.wait(registry.create(), hold_s=0.01) is None

    run(scenario())


def test_unknown_request_id() -> None:
    with pytest.raises(NotFound):
        run(FutureRegistry().wait("nope", hold_s=0))


def test_bytes_are_protobuf_and_first_completion_wins() -> None:
    async def scenario() -> None:
        registry = FutureRegistry()
        request_id = registry.create()
        registry.complete(request_id, b"\x0a\x00")
        registry.fail(request_id, RuntimeError("late"))
        result = await registry.wait(request_id, hold_s=0)
        assert result is not None and (result.body, result.media_type) == (b"\x0a\x00", PROTOBUF)

    run(scenario())


@pytest.mark.parametrize(
    ("exc", "category", "message"),
    [(InputError("bad target"), "user", "bad target"), (RuntimeError("boom"), "server", "RuntimeError: boom")],
)
def test_failures(exc: Exception, category: str, message: str) -> None:
    async def scenario() -> None:
        registry = FutureRegistry()
        request_id = registry.create()
        failing: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        registry.settle_from(request_id, failing)
        failing.set_exception(exc)
        result = await registry.wait(request_id, hold_s=1)
        assert result is not None
        assert msgspec.json.decode(result.body) == {"error": message, "category": category}

    run(scenario())


def test_garbage_collection_keeps_pending_and_recent() -> None:
    now = [1000.0]
    registry = FutureRegistry(ttl_s=60, clock=lambda: now[0])
    old, recent, pending = registry.create(), registry.create(), registry.create()
    registry.complete(old, b"")
    now[0] += 50
    registry.complete(recent, b"")
    now[0] += 20
    assert registry.collect_garbage() == 1
    with pytest.raises(NotFound):
        run(registry.wait(old, hold_s=0))
    assert run(registry.wait(recent, hold_s=0)) is not None
    assert run(registry.wait(pending, hold_s=0)) is None
