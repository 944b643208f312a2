"""The Starlette application: routes, error handling, auth, body limits, and the background lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware

from server import checkpoint_files
from server.api_keys import ApiKeyAuth
from server.auth import RequireApiKey
from server.config import ServerOptions
from server.engine_api import EngineAPI
from server.errors import EXCEPTION_HANDLERS, UnexpectedErrorMiddleware
from server.futures import FutureRegistry
from server.http import LimitBodySize
from server import metrics
from server.routes import (
    admin,
    anthropic_compat,
    api_key,
    bootstrap,
    copy_weights,
    dashboard,
    futures,
    openai_compat,
    rest,
    sampling,
    sessions,
    training,
)
from server.sequencer import Sequencer
from server.service import Service
from server.session_trace import SessionTraces
from server.sessions import Sessions, utc_now
from server.store import Store
from server.store_sql import open_store
from server.url_signing import UrlSigner

logger = logging.getLogger(__name__)


def build_app(
    engines: dict[str, EngineAPI],
    checkpoint_dir: Path,
    *,
    options: ServerOptions | None = None,
    store: Store | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> Starlette:
    """An app serving `engines` (keyed by base model name); engine workers run while it is up.

    Metadata goes to `store`, by default the SQLite database `{checkpoint_dir}/tuft.db`.
    `on_shutdown` runs last when the app stops (e.g. releasing the other processes of a
    multi-host engine; uvicorn may end the process right after the app stops).
    `app.state.shutting_down` is an event the server sets (on the app's loop) when it begins
    to stop, so long-polls answer at once instead of holding the shutdown.
    """
    options = options or ServerOptions()
    if store is None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(None, checkpoint_dir)
    traces = SessionTraces()
    service = Service(
        engines=engines,
        checkpoint_dir=checkpoint_dir,
        options=options,
        store=store,
        futures=FutureRegistry(ttl_s=options.future_ttl_s, journal=store, traces=traces),
        sessions=Sessions(store, timeout_s=options.session_timeout_s),
        metrics=metrics.Metrics(),
        url_signer=UrlSigner.load_or_create(checkpoint_dir),
        sequencer=Sequencer(options.seq_gap_timeout_s),
        traces=traces,
    )
    keys = ApiKeyAuth(store, options.auth, cache_s=options.auth_cache_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        service.recover()
        await asyncio.to_thread(checkpoint_files.recover, store, checkpoint_dir)
        if options.auth == "required" and not store.has_active_api_keys():
            logger.warning("--auth required but no API key exists: every request will be refused (tuft api-key create)")
        service.start()
        sweeper = asyncio.create_task(_sweep_forever(service))
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.to_thread(service.stop)
            service.metrics.close()
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)

    app = Starlette(
        routes=[
            *bootstrap.routes,
            *training.routes,
            *sampling.routes,
            *futures.routes,
            *sessions.routes,
            *rest.routes,
            *copy_weights.routes,
            *api_key.routes,
            *admin.routes,
            *metrics.routes,
            *openai_compat.routes,
            *anthropic_compat.routes,
            *dashboard.routes,
        ],
        middleware=[
            Middleware(UnexpectedErrorMiddleware),
            Middleware(LimitBodySize, limit_for=_body_limits(options)),
            Middleware(RequireApiKey, keys=keys),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.shutting_down = asyncio.Event()
    return app


def _body_limits(options: ServerOptions) -> Callable[[str], int]:
    """Body limit by path: the routes whose bodies carry token data or prompts, and the rest."""
    limits = {
        "/api/v1/forward_backward": options.max_forward_backward_bytes,
        "/api/v1/asample": options.max_sample_body_bytes,
        **dict.fromkeys((*openai_compat.PROMPT_PATHS, *anthropic_compat.PROMPT_PATHS), options.max_sample_body_bytes),
    }
    return lambda path: limits.get(path, options.max_json_body_bytes)


async def _sweep_forever(service: Service) -> None:
    while True:
        await asyncio.sleep(service.options.sweep_interval_s)
        try:
            service.sweep()
            await asyncio.to_thread(checkpoint_files.delete_expired, service.store, service.checkpoint_dir, utc_now())
        except Exception:
            logger.exception("periodic cleanup failed")
