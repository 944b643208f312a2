"""The Starlette application: routes, error handling, auth, and the background lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware

from server.auth import RequireApiKey
from server.config import ServerOptions
from server.engine_api import EngineAPI
from server.errors import EXCEPTION_HANDLERS, UnexpectedErrorMiddleware
from server.futures import FutureRegistry
from server.routes import bootstrap, futures, rest, sampling, training
from server.service import Service
from server.sessions import Sessions
from server.store import MemoryStore, Store

logger = logging.getLogger(__name__)


def build_app(
    engines: dict[str, EngineAPI],
    checkpoint_dir: Path,
    *,
    options: ServerOptions | None = None,
    store: Store | None = None,
) -> Starlette:
    """An app serving `engines` (keyed by base model name); engine workers run while it is up."""
    options = options or ServerOptions()
    store = store or MemoryStore()
    service = Service(
        engines=engines,
        checkpoint_dir=checkpoint_dir,
        options=options,
        store=store,
        futures=FutureRegistry(ttl_s=options.future_ttl_s),
        sessions=Sessions(store, timeout_s=options.session_timeout_s),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        service.start()
        sweeper = asyncio.create_task(_sweep_forever(service))
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.to_thread(service.stop)

    app = Starlette(
        routes=[*bootstrap.routes, *training.routes, *sampling.routes, *futures.routes, *rest.routes],
        middleware=[Middleware(UnexpectedErrorMiddleware), Middleware(RequireApiKey)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.service = service
    return app


async def _sweep_forever(service: Service) -> None:
    while True:
        await asyncio.sleep(service.options.sweep_interval_s)
        try:
            service.sweep()
        except Exception:
            logger.exception("periodic cleanup failed")
