"""API-key gate and the caller's identity.

Every request except health checks must carry `X-API-Key`; `ApiKeyAuth` (server.api_keys)
turns it into an owner or refuses it with a 401 JSON body. The owner is published for the
duration of the request in a context variable (`current_owner()`) and in `request.state.owner`;
lookups of owned things (sessions, models, samplers, futures, checkpoints) compare it with
the record's owner and answer 404 on a mismatch, so another tenant's ids look nonexistent.
Outside a request (background sweeps, the CLI) there is no owner and nothing is filtered.

One exception to the key requirement: a signed checkpoint download link (`GET .../archive?
expires=...&sig=...`, handed out by the archive route to older SDKs) carries its own HMAC
authorization, checked by that route, so it works with a plain HTTP client.
"""

from __future__ import annotations

import re
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api_keys import ApiKeyAuth
from server.errors import error_response

_API_KEY_HEADER = b"x-api-key"
_EXEMPT_SUFFIX = "/healthz"
_EXEMPT_PATHS = frozenset({"/metrics"})
_SIGNED_DOWNLOAD = re.compile(r"/api/v1/training_runs/[^/]+/checkpoints/[^/]+/[^/]+/archive")

_owner: ContextVar[str | None] = ContextVar("tuft_owner", default=None)


def current_owner() -> str | None:
    """The owner the current request acts for; None outside requests (no filtering)."""
    return _owner.get()


def visible_to_caller(owner: str) -> bool:
    caller = _owner.get()
    return caller is None or caller == owner


class RequireApiKey:
    def __init__(self, app: ASGIApp, keys: ApiKeyAuth) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith(_EXEMPT_SUFFIX) or scope["path"] in _EXEMPT_PATHS or _signed_download(scope):
            await self.app(scope, receive, send)
            return
        key = next((value for name, value in scope["headers"] if name == _API_KEY_HEADER), b"")
        if not key:
            await error_response(401, "missing X-API-Key header")(scope, receive, send)
            return
        owner = self.keys.owner(key.decode("latin-1").strip())
        if owner is None:
            await error_response(401, "invalid or revoked API key")(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner
        token = _owner.set(owner)
        try:
            await self.app(scope, receive, send)
        finally:
            _owner.reset(token)


def _signed_download(scope: Scope) -> bool:
    return (
        scope["method"] == "GET"
        and b"sig=" in scope.get("query_string", b"")
        and _SIGNED_DOWNLOAD.fullmatch(scope["path"]) is not None
    )
