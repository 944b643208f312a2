"""The dashboard's static page: one HTML file, its script and stylesheet, shipped as package data.

They are served without an API key (the page asks for the key and sends it on its own data
requests, server.routes.dashboard), under a Content-Security-Policy that allows only this
server's own script, styles and connections: nothing is fetched from anywhere else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

ASSETS = {
    "/dashboard": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
}
"""Path -> (file in this package, media type)."""
PUBLIC_PATHS = frozenset(ASSETS)

_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _content(name: str) -> bytes:
    return (resources.files(__package__) / name).read_bytes()


def endpoint(path: str) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint serving the asset at `path` (a key of `ASSETS`)."""
    name, media_type = ASSETS[path]

    async def serve(_: Request) -> Response:
        return Response(_content(name), media_type=media_type, headers=_HEADERS)

    return serve
