"""Bearer tokens on incoming requests (RFC 6750): find, verify, rate-limit.

Used by ``service.api.deps.access_context`` for ``/fhir`` and by the admin API. Failures
are :class:`BearerError`; the FHIR side turns them into OperationOutcomes, the admin API
into RFC 6750 JSON — both with the ``WWW-Authenticate: Bearer`` challenge.
"""

from __future__ import annotations

from starlette.requests import Request

from service.security.oauth.runtime import SecurityRuntime
from service.security.oauth.tokens import AccessToken, InvalidToken
from service.security.ratelimit import RateLimiter

REALM = "yilian"


class BearerError(Exception):
    """401 (no or bad token), 403 (insufficient scope) or 429 (rate limit)."""

    def __init__(self, status: int, description: str, *, error: str | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.status in (401, 403):
            challenge = f'Bearer realm="{REALM}"'
            if self.error:
                safe = self.description.replace("\\", "").replace('"', "'")
                challenge += f', error="{self.error}", error_description="{safe}"'
            headers["WWW-Authenticate"] = challenge
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return headers


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise BearerError(401, "the Authorization header must be 'Bearer <access token>'", error="invalid_request")
    return value.strip()


def authenticate(request: Request, runtime: SecurityRuntime, *, rate_limit: bool = True) -> AccessToken:
    """The verified access token of ``request``, or BearerError."""
    token = bearer_token(request)
    if token is None:
        raise BearerError(401, "this endpoint needs an access token (Authorization: Bearer ...); "
                               f"get one at {runtime.urls.token}")
    try:
        access = runtime.tokens.verify(token)
    except InvalidToken as exc:
        raise BearerError(401, str(exc), error="invalid_token") from None
    if rate_limit:
        wait = runtime.rate_limiter.acquire(access.client_id)
        if wait is not None:
            raise BearerError(429, f"client {access.client_id} sends requests faster than its rate limit; "
                                   f"retry after {RateLimiter.retry_after(wait)} s",
                              retry_after=RateLimiter.retry_after(wait))
    return access


def require_scope(access: AccessToken, scope: str) -> None:
    if scope not in access.scope.split():
        raise BearerError(403, f"this endpoint needs the scope {scope}", error="insufficient_scope")
