"""API-key gate and the caller's identity.

Every request except the few listed in `_PUBLIC` must carry an API key, in `X-API-Key` (the
Tinker and Anthropic clients) or as `Authorization: Bearer <key>` (the OpenAI client); `ApiKeyAuth`
(server.api_keys) turns it into an owner or refuses it with a 401 JSON body. Exemptions
match the method and the whole path exactly, so a checkpoint or run named `healthz` is
never mistaken for a health check.

Who the running code acts for lives in a context variable with three states:

- an owner (a `str`): a request with an accepted key. Lookups of owned things (sessions,
  models, samplers, futures, checkpoints) compare it with the record's owner and answer 404
  on a mismatch, so another tenant's ids look nonexistent. It is also `request.state.owner`;
- `Caller.ANONYMOUS`: a request without an authenticated caller (an exempt route). It owns
  nothing: every ownership check fails, so a route reached without a key can reveal nothing;
- `Caller.SYSTEM`, the default: code outside any request (background sweeps, recovery, the
  CLI, tests calling the service directly), which sees everything.

Signed downloads (a `GET` of a path in `server.url_signing.SIGNED_PATHS` with
`?expires=...&sig=...`: an external_weights checkpoint's files, checkpoint archives for older
SDKs, session traces) carry their own HMAC authorization, checked by the route that serves
them, so they work with a plain HTTP client.
"""

from __future__ import annotations

import enum
from contextvars import ContextVar
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api_keys import ApiKeyAuth
from server.dashboard import PUBLIC_PATHS as DASHBOARD_ASSETS
from server.errors import error_response
from server.url_signing import SIGNED_PATHS

_API_KEY_HEADER = b"x-api-key"
_AUTHORIZATION_HEADER = b"authorization"
_BEARER = b"bearer "
_PUBLIC = frozenset(
    {("GET", "/healthz"), ("GET", "/api/v1/healthz"), ("GET", "/metrics"), *(("GET", p) for p in DASHBOARD_ASSETS)}
)
"""(method, path) answered without a key: liveness probes, Prometheus scrapes and the
dashboard's static page (its data requests carry a key). A HEAD counts as its GET, as the
router treats it."""


class Caller(enum.Enum):
    """Who the running code acts for when it is not an API key's owner."""

    SYSTEM = "system"
    """Outside any request: nothing is filtered."""
    ANONYMOUS = "anonymous"
    """A request without an authenticated caller: owns nothing."""


_owner: ContextVar[str | Caller] = ContextVar("tuft_owner", default=Caller.SYSTEM)


def current_owner() -> str | None:
    """The owner the current request acts for; None without an authenticated caller."""
    caller = _owner.get()
    return caller if isinstance(caller, str) else None


def visible_to_caller(owner: str) -> bool:
    """Whether the running code may see a thing owned by `owner`."""
    caller = _owner.get()
    return caller is Caller.SYSTEM or caller == owner


class RequireApiKey:
    def __init__(self, app: ASGIApp, keys: ApiKeyAuth) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http" or _exempt(scope):
            await self._as(Caller.ANONYMOUS, scope, receive, send)
            return
        key = _api_key(scope)
        if not key:
            await error_response(401, "missing API key: send an X-API-Key or an Authorization: Bearer header")(
                scope, receive, send
            )
            return
        owner = self.keys.owner(key.decode("latin-1"))
        if owner is None:
            await error_response(401, "invalid or revoked API key")(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner
        await self._as(owner, scope, receive, send)

    async def _as(self, caller: str | Caller, scope: Scope, receive: Receive, send: Send) -> None:
        token = _owner.set(caller)
        try:
            await self.app(scope, receive, send)
        finally:
            _owner.reset(token)


def _api_key(scope: Scope) -> bytes:
    """`X-API-Key`, else the token of `Authorization: Bearer`; empty when neither is sent."""
    headers = dict(scope["headers"])
    key = headers.get(_API_KEY_HEADER, b"")
    authorization = headers.get(_AUTHORIZATION_HEADER, b"")
    if not key and authorization[: len(_BEARER)].lower() == _BEARER:
        key = authorization[len(_BEARER) :]
    return key.strip()


def _exempt(scope: Scope) -> bool:
    method = "GET" if scope["method"] == "HEAD" else scope["method"]
    return (method, scope["path"]) in _PUBLIC or _signed_download(scope)


def _signed_download(scope: Scope) -> bool:
    return (
        scope["method"] == "GET"
        and any(pattern.fullmatch(scope["path"]) for pattern in SIGNED_PATHS)
        and "sig" in parse_qs(scope.get("query_string", b"").decode("latin-1"))
    )
