"""Per-request dependencies: the store, the caller's access context, wire preferences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from service.api.wire import Prefer, read_body, read_resource, response_media_type
from service.config import Settings
from service.fhir.access import AccessContext
from service.fhir.errors import NotFound, TooManyRequests, Unauthorized
from service.fhir.store import ResourceStore
from service.fhir.validation import known_resource_types

# With YILIAN_AUTH=off (development only) the caller names the organization it acts for in
# this header; with authorization on (the default) it is ignored and the token decides.
DEV_ORGANIZATION_HEADER = "x-yilian-organization"
# FHIR routes anyone may call without a token (discovery). The SMART configuration is served
# by the security router, outside the FHIR router, so it never reaches this dependency.
PUBLIC_ROUTES = frozenset({"/fhir/metadata"})


async def access_context(request: Request) -> AccessContext:
    """Who is calling: from the verified Bearer token (auth on), else from the dev header.

    Runs first for every FHIR route (a router-level dependency in ``create_app``), so an
    unauthenticated request is refused before its body is read. No or bad token → 401 with
    ``WWW-Authenticate: Bearer`` (``error="invalid_token"`` when bad); over the client's rate
    limit → 429 with ``Retry-After``. The context is kept on ``request.state.access_context``.
    """
    cached = getattr(request.state, "access_context", None)
    if isinstance(cached, AccessContext):
        return cached
    from service.security.oauth.bearer import BearerError, authenticate

    security = request.app.state.security
    if not security.enabled:
        organization = request.headers.get(DEV_ORGANIZATION_HEADER)
        ctx = AccessContext(client_id="anonymous", organization=organization or None)
    elif _app_path(request) in PUBLIC_ROUTES:
        ctx = AccessContext.anonymous()
    else:
        try:
            # verifying may read the database (revocations, keys): off the event loop
            ctx = (await run_in_threadpool(authenticate, request, security)).context()
        except BearerError as exc:
            error = TooManyRequests if exc.status == 429 else Unauthorized
            raise error(exc.description, headers=exc.headers) from None
    request.state.access_context = ctx
    return ctx


def _app_path(request: Request) -> str:
    """The request path inside the app (without a root_path the server is mounted under)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


@dataclass(frozen=True)
class Call:
    """Everything a FHIR handler needs about the request it is answering."""

    request: Request
    store: ResourceStore
    settings: Settings
    ctx: AccessContext
    media_type: str
    prefer: Prefer

    @property
    def base_url(self) -> str:
        return self.settings.base_url.rstrip("/")

    def query_items(self) -> list[tuple[str, str]]:
        """Query parameters without the ones that are about the wire, not the search."""
        return [(k, v) for k, v in self.request.query_params.multi_items() if k not in ("_format", "_pretty")]

    def query_string(self) -> str:
        from urllib.parse import urlencode

        return urlencode(self.query_items())


async def fhir_call(request: Request, ctx: AccessContext = Depends(access_context)) -> Call:
    state = request.app.state
    return Call(request=request, store=state.store, settings=state.settings, ctx=ctx,
                media_type=response_media_type(request), prefer=Prefer.from_request(request))


async def known_type(resource_type: str) -> str:
    """Path parameter check: unknown resource types are 404, as the spec asks."""
    if resource_type not in known_resource_types():
        raise NotFound(f"'{resource_type}' is not a FHIR R4 resource type this server knows")
    return resource_type


async def resource_body(request: Request) -> dict[str, Any]:
    return await read_resource(request, max_bytes=request.app.state.settings.max_body_bytes)


async def any_body(request: Request) -> Any:
    return await read_body(request, max_bytes=request.app.state.settings.max_body_bytes, allow_patch=True)
