"""Every failure becomes a JSON `{"detail": ...}` response with a Content-Length.

The SDK treats a 400 without a body as a network glitch and retries 409 for minutes, so
errors here are always explicit JSON and never 409. Unexpected exceptions are logged and
answered with a 500; the server keeps serving.
"""

from __future__ import annotations

import logging

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, ExceptionHandler, Message, Receive, Scope, Send

from tuft_jax.errors import CapacityError, InputError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the service refuses with a specific status."""

    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ApiError):
    status = 404


class Forbidden(ApiError):
    """A signed download URL that does not verify (tampered with, or expired)."""

    status = 403


class Gone(ApiError):
    """The session has finished or expired; a 410 stops the SDK's heartbeat loop."""

    status = 410


class PayloadTooLarge(ApiError):
    """A request body (or its decompressed content) over the route's limit; the SDK does not retry a 413."""

    status = 413


def error_response(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def describe_error(exc: Exception) -> tuple[int, str] | None:
    """(status, detail) of a refusal the service answers as a client error; None for a bug.
    The one mapping behind every error body, whatever shape a route family gives it."""
    if isinstance(exc, ApiError):
        return exc.status, exc.detail
    if isinstance(exc, InputError):
        return 400, str(exc)
    if isinstance(exc, msgspec.DecodeError):
        return 400, f"invalid request body: {exc}"
    if isinstance(exc, CapacityError):
        return 429, str(exc)
    if isinstance(exc, HTTPException):
        return exc.status_code, exc.detail
    return None


async def _described(_: Request, exc: Exception) -> Response:
    described = describe_error(exc)
    assert described is not None
    return error_response(*described)


EXCEPTION_HANDLERS: dict[type[Exception], ExceptionHandler] = {
    kind: _described for kind in (ApiError, InputError, msgspec.DecodeError, CapacityError, HTTPException)
}


class UnexpectedErrorMiddleware:
    """Turns an unhandled exception into a logged 500 JSON response instead of a dropped request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            detail = f"internal server error: {type(exc).__name__}: {exc}"
            await error_response(500, detail)(scope, receive, send)
