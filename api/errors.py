"""Every error leaves as JSON `{"error": {"code", "message"}}` with a fitting status; no traces."""

from __future__ import annotations

import logging
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.quotas import QuotaExceededError
from modules.errors import (
    BadInputError,
    IncompatibleError,
    InvalidParamsError,
    McaasError,
    ModelFormatError,
    NotFoundError,
    UnsafeModelError,
)

logger = logging.getLogger("api")


class UnauthorizedError(McaasError):
    """No API key, or one we do not know (HTTP 401)."""

    code = "unauthorized"


class PayloadTooLargeError(BadInputError):
    """An upload over the size cap (HTTP 413)."""

    code = "too_large"


class ConflictError(McaasError):
    """The request does not fit the resource's state, e.g. stopping a finished job (HTTP 409)."""

    code = "conflict"


class UnavailableError(McaasError):
    """A backend (Redis, S3, DynamoDB, ECS) did not answer (HTTP 503)."""

    code = "unavailable"


# Most specific first: NotFoundError and the model errors are BadInputErrors too.
STATUS_OF: tuple[tuple[type[McaasError], int], ...] = (
    (UnauthorizedError, 401),
    (QuotaExceededError, 429),
    (PayloadTooLargeError, 413),
    (ConflictError, 409),
    (UnavailableError, 503),
    (NotFoundError, 404),
    (UnsafeModelError, 422),
    (ModelFormatError, 422),
    (IncompatibleError, 422),
    (InvalidParamsError, 422),
    (BadInputError, 400),
)

_HTTP_CODES = {
    400: "bad_input",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "quota_exceeded",
}


def error_body(code: str, message: str) -> dict[str, Any]:
    """The one error shape."""
    return {"error": {"code": code, "message": message}}


def status_for(exc: McaasError) -> int:
    """The HTTP status for one of our errors."""
    for kind, status in STATUS_OF:
        if isinstance(exc, kind):
            return status
    return 500


async def _mcaas_error(request: Request, exc: Exception) -> JSONResponse:
    exc = cast(McaasError, exc)  # registered for McaasError only
    status = status_for(exc)
    if status == 500:
        logger.error("unmapped %s on %s %s: %s", type(exc).__name__, request.method, request.url)
        return JSONResponse(error_body("internal", "internal server error"), status_code=500)
    # Every refusal is logged (hostile uploads included), clipped so a crafted input
    # cannot flood the log.
    logger.warning(
        "refused %s %s: %d %s: %.300s", request.method, request.url.path, status, exc.code, exc
    )
    headers = {"WWW-Authenticate": "ApiKey"} if status == 401 else None
    if isinstance(exc, QuotaExceededError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse(error_body(exc.code, str(exc)), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "(body)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    exc = cast(RequestValidationError, exc)
    message = _describe_validation(exc)
    logger.warning(
        "refused %s %s: 422 invalid_request: %.300s", request.method, request.url.path, message
    )
    return JSONResponse(error_body("invalid_request", message), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    exc = cast(StarletteHTTPException, exc)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    logger.warning(
        "refused %s %s: %d %s: %.300s",
        request.method,
        request.url.path,
        exc.status_code,
        code,
        exc.detail,
    )
    return JSONResponse(
        error_body(code, str(exc.detail)),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The trace goes to the server log only; the client learns nothing about internals.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal", "internal server error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the same JSON shape."""
    app.add_exception_handler(McaasError, _mcaas_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
