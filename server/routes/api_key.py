"""The caller's own API key (`/api/v1/auth/apikey/me`), which `tinker auth login` uses to check
a pasted key before storing it.

GET answers with the key's public metadata (the middleware has already refused a missing,
unknown or revoked key with a 401). This server has no user accounts: the key's owner id, the
tenant everything it creates belongs to, stands where hosted Tinker names the user's email.

DELETE revokes the presented key itself, never another, as the SDK documents it. `tinker auth
logout` sends it only for keys the CLI minted itself (found only in old credential files); a
key pasted into `tinker auth login` is just forgotten locally and stays active, as a logout
should leave it. A key accepted unregistered (open mode) has no record to revoke: a 400.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api_keys import ANONYMOUS_PREFIX, KEY_PREFIX
from server.http import json_response
from server.service import Service
from server.sessions import utc_now
from server.wire.types import ApiKeyDetails, ApiKeyOrgDetails, ApiKeyUserDetails, SelfApiKeyResponse
from tuft_jax.errors import InputError

ORGANIZATION = "TuFT-JAX (self-hosted)"
_UNREGISTERED_NOTE = f"an unregistered {KEY_PREFIX} key, accepted because this server runs without registered keys"


async def get_own_key(request: Request) -> Response:
    owner: str = request.state.owner
    record = Service.of(request).store.get_api_key(owner)
    details = ApiKeyDetails(
        org_details=ApiKeyOrgDetails(name=ORGANIZATION), user_details=ApiKeyUserDetails(email=owner)
    )
    if record is None:  # an open-mode owner: ANONYMOUS_PREFIX + hex digits
        key_id = int(owner.removeprefix(ANONYMOUS_PREFIX), 16)
        response = SelfApiKeyResponse(key_id=key_id, name="unregistered key", note=_UNREGISTERED_NOTE, details=details)
    else:
        response = SelfApiKeyResponse(key_id=int(record.key_id, 16), name=record.name, note="", details=details)
    return json_response(response)


async def revoke_own_key(request: Request) -> Response:
    owner: str = request.state.owner
    if not Service.of(request).store.revoke_api_key(owner, utc_now()):
        raise InputError("this API key is not registered on this server, so there is nothing to revoke")
    return json_response({})


routes = [
    Route("/api/v1/auth/apikey/me", get_own_key, methods=["GET"]),
    Route("/api/v1/auth/apikey/me", revoke_own_key, methods=["DELETE"]),
]
