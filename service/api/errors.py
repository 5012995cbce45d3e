"""Turn every error into an OperationOutcome, in exactly one place."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from uuid import uuid4

import orjson
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.fhir.errors import FhirError, Issue, operation_outcome

log = logging.getLogger("yilian.api")

_HTTP_ISSUE_CODES = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden", 413: "too-costly"}


def outcome_response(status: int, issues: list[Issue], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(operation_outcome(issues)), status_code=status, headers=headers,
                    media_type="application/fhir+json; charset=utf-8")


async def _fhir_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)
    return outcome_response(exc.status, exc.issues, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no FHIR endpoint at {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not supported on {request.url.path}"
    else:
        message = str(exc.detail)
    code = _HTTP_ISSUE_CODES.get(exc.status_code, "processing")
    return outcome_response(exc.status_code, [Issue("error", code, message)], dict(exc.headers or {}))


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    issues = [
        Issue("error", "invalid", f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}")
        for err in exc.errors()
    ]
    return outcome_response(400, issues)


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    # The database refused a connection (restart, max_connections, pool timeout) or broke one
    # off: nothing was written (the transaction did not commit), and trying again shortly is
    # the right answer, so this is a 503, not a 500.
    reference = uuid4().hex[:12]
    log.error("database unavailable %s on %s %s: %s", reference, request.method, request.url.path, exc)
    return outcome_response(503, [Issue("error", "transient", "the database is not available right now; nothing "
                                        f"was changed; retry shortly (reference {reference})")],
                            {"Retry-After": "1"})


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Never show a stack trace to the caller; log it with a reference they can quote.
    reference = uuid4().hex[:12]
    log.exception("unexpected error %s on %s %s", reference, request.method, request.url.path)
    return outcome_response(500, [Issue("fatal", "exception", f"internal error; quote reference {reference}")])


Handler = Callable[[Request, Exception], Awaitable[Response]]

# The answers to the errors we expect. Anything else is a bug: ``_unexpected`` answers 500,
# from Starlette's outermost middleware, after the exception has gone up through the audit.
_HANDLERS: dict[type[Exception], Handler] = {
    FhirError: _fhir_error,
    StarletteHTTPException: _http_error,
    RequestValidationError: _validation_error,
    sqlalchemy.exc.OperationalError: _database_unavailable,
    sqlalchemy.exc.TimeoutError: _database_unavailable,  # no pooled connection free
}


def handler_for(exc: Exception) -> Handler | None:
    """The handler ``install`` registered for ``exc`` (Starlette's lookup: nearest class in the
    MRO), or None for an unexpected error; for callers that answer outside FastAPI's router
    (``service.api.fastpath``)."""
    for cls in type(exc).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def install(app: FastAPI) -> None:
    for cls, handler in _HANDLERS.items():
        app.add_exception_handler(cls, handler)
    app.add_exception_handler(Exception, _unexpected)
