"""API-key gate: every request except health checks must carry `X-API-Key`.

Any key is accepted for now (the SDK itself insists on the `tml-` prefix); checking keys
against a store comes later and plugs in here.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response

_API_KEY_HEADER = b"x-api-key"
_EXEMPT_SUFFIX = "/healthz"


class RequireApiKey:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and not scope["path"].endswith(_EXEMPT_SUFFIX)
            and not any(name == _API_KEY_HEADER and value for name, value in scope["headers"])
        ):
            await error_response(401, "missing X-API-Key header")(scope, receive, send)
            return
        await self.app(scope, receive, send)
