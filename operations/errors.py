"""The one error body every failure answers with, and the handlers that turn exceptions into it.

    {"error": {"type": "invalid_request_error", "code": "invalid_base64", "message": "... what to fix ...",
               "request_id": "req_5f2b..."}}

Errors are raised where they are decided, as `ApiError(status, code, message)`; the handlers below also
shape FastAPI's validation errors, Starlette's 404/405 and database outages the same way. Anything unexpected
becomes a 500 of the same shape in ledger/request_log.RequestLogMiddleware, which records it.
"""

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from redis.exceptions import (ConnectionError as RedisConnectionError, MasterDownError, OutOfMemoryError, ReadOnlyError,
                              TimeoutError as RedisTimeoutError, TryAgainError)
from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from operations.request_ids import current_request_id, new_request_id

logger = logging.getLogger("classify")

TRANSIENT_DATABASE_ERRORS = ("locked", "busy", "disk", "unable to open", "readonly", "connection")
# PostgreSQL's SQLSTATE classes that clear by themselves: connection lost, out of resources (too many
# connections), operator intervention (shutting down, cancelled), rolled back (deadlock, serialisation);
# and 55P03, a lock not granted within DB_TIMEOUT_S.
TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")
LOCK_NOT_AVAILABLE = "55P03"
ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
MAX_LISTED_PROBLEMS = 10  # a list of a million wrong items gets a short answer, not a megabyte one
MAX_QUOTED_CHARS = 100  # what a message quotes of the client's input: a field name of 15 MiB is not sent back
MAX_MESSAGE_CHARS = 2000  # every message, whatever it quotes: an error body stays small


class ErrorDetail(BaseModel):
    type: str = Field(examples=["invalid_request_error"])
    code: str = Field(examples=["invalid_base64"])
    message: str = Field(examples=["`image` is not valid base64: send the file's bytes base64-encoded."])
    request_id: str = Field(examples=["req_5f2b0c9e8d7a4b1c9e0f3a2d1b4c6e8f"],
                            description="Also in the X-Request-ID header and the server's log: quote it when reporting.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers or {}


class NotAdmitted(ApiError):
    """A request refused before it could be admitted, for its connection or the server's room rather than what it
    asks: never counted against the key's limit."""


class MalformedBody(NotAdmitted):
    """The body broke HTTP/1.1's framing (a bad chunk, a chunked body cut short): edge/request_body.py raises it from
    the app's read of the body."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, "invalid_http", f"The request body is not valid HTTP/1.1 ({reason}); send it with a "
                                              "Content-Length, or as well-formed chunks.")


def clipped(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text`, cut to `limit` characters if longer, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def database_unavailable() -> ApiError:
    return ApiError(503, "database_unavailable",
                    "The server's database is busy or unreachable; retry after the Retry-After seconds.",
                    {"Retry-After": "1"})


def limiter_unavailable() -> ApiError:
    return ApiError(503, "rate_limiter_unavailable",
                    "The server's rate limiter (Redis) is unreachable; retry after the Retry-After seconds.",
                    {"Retry-After": "1"})


def internal_error() -> ApiError:
    return ApiError(500, "internal_error", "The server failed unexpectedly; this is a bug. Retry later.")


def json_error(error: ApiError, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    error_type = ERROR_TYPES.get(error.status_code, "invalid_request_error")
    request_id = current_request_id.get() or new_request_id()
    body = ErrorResponse(error=ErrorDetail(type=error_type, code=error.code,
                                           message=clipped(error.message, MAX_MESSAGE_CHARS), request_id=request_id))
    return JSONResponse(body.model_dump(), status_code=error.status_code, headers={**(extra_headers or {}), **error.headers})


def error_response(request: Request, status_code: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    request.state.error_code = code  # the request log records it
    # A request that was admitted and then failed still tells the client where its limit stands.
    return json_error(ApiError(status_code, code, message, headers), getattr(request.state, "rate_limit_headers", {}))


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    path = clipped(request.url.path)
    if exc.status_code == 404:
        message = f"No such endpoint: {path}. The API is described at /docs."
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "another method")
        message = f"{clipped(request.method)} is not allowed on {path}; use {allowed}."
    else:
        message = str(exc.detail)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    return error_response(request, exc.status_code, code, message, exc.headers)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    problems = []
    for error in errors[:MAX_LISTED_PROBLEMS]:
        where = clipped(".".join(str(part) for part in error["loc"]))
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    if len(errors) > MAX_LISTED_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_LISTED_PROBLEMS} more")
    return error_response(request, 422, "invalid_request", "Fix the request: " + "; ".join(problems) + ".")


def is_database_unavailable(exc: Exception) -> bool:
    """A database that is there but cannot be used just now (locked, full, unreachable): a 503 that clears by
    itself. Any other database error (a missing table, a bad query) is a bug: a 500."""
    if isinstance(exc, PoolTimeoutError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    if not isinstance(exc, OperationalError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)  # PostgreSQL's; None when psycopg failed before an answer
    if sqlstate is not None:
        return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate == LOCK_NOT_AVAILABLE
    message = str(exc.orig).lower()
    return any(word in message for word in TRANSIENT_DATABASE_ERRORS)


async def handle_database_error(request: Request, exc: Exception) -> JSONResponse:
    if not is_database_unavailable(exc):
        logger.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
        return await handle_api_error(request, internal_error())
    logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return await handle_api_error(request, database_unavailable())


async def handle_redis_error(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("rate limiter unavailable on %s %s: %s", request.method, request.url.path, exc)
    return await handle_api_error(request, limiter_unavailable())


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(DBAPIError, handle_database_error)
    app.add_exception_handler(PoolTimeoutError, handle_database_error)
    # Redis being unreachable or slow (ConnectionError covers a Redis still loading its data); its other
    # errors, a bad script or command, are bugs: 500s.
    # Down, or up but unable to take writes just now (a failover's read-only replica, maxmemory): all pass.
    for redis_trouble in (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError, MasterDownError,
                          TryAgainError):
        app.add_exception_handler(redis_trouble, handle_redis_error)
