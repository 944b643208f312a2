"""Download links that carry their own authorization: an HMAC over the path and an expiry.

Some downloads are fetched by a plain HTTP client with no API key (SDKs <= 0.25 fetch a
checkpoint archive, `tinker session export-trace` fetches a trace), so the route that hands
out the link signs it for the caller who could read the resource, and the route that serves
it accepts the signature instead of a key. `server.auth` exempts exactly the paths in
`SIGNED_PATHS` when they carry a `sig` parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from starlette.datastructures import URL
from starlette.requests import Request

from server.errors import NotFound

LINK_LIFETIME_S = 900
"""How long a signed link stays valid."""
SIGNED_PATHS = (
    re.compile(r"/api/v1/training_runs/[^/]+/checkpoints/[^/]+/[^/]+/archive"),
    re.compile(r"/api/v1/sessions/[^/]+/trace"),
)
"""GET paths a signed link may name (matched whole)."""
_SECRET = secrets.token_bytes(32)
"""Per process, so a restart invalidates outstanding links."""


def _signature(path: str, expires: int) -> str:
    return hmac.new(_SECRET, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def sign(url: URL) -> tuple[str, int]:
    """A link to `url`'s path valid for LINK_LIFETIME_S seconds, and when it expires (epoch s)."""
    expires = int(time.time()) + LINK_LIFETIME_S
    link = url.replace(query=f"expires={expires}&sig={_signature(url.path, expires)}")
    return str(link), expires


def check(request: Request) -> None:
    """Raise NotFound unless the request carries a valid, unexpired signature for its path."""
    try:
        expires = int(request.query_params.get("expires", ""))
    except ValueError:
        expires = 0
    signature = request.query_params.get("sig", "")
    expected = _signature(request.url.path, expires)
    if not hmac.compare_digest(signature.encode(), expected.encode()) or expires < time.time():
        raise NotFound("this download link is invalid or has expired")
