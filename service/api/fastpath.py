"""Read, search, create and booking without FastAPI's router and dependency solver.

``GET [type]/[id]``, ``GET [type]?...`` and ``POST [type]`` are most of what a HIS sends;
``POST Appointment/$hold`` and ``$book`` are what a clinic at 8 a.m. sends.
FastAPI resolves each of them by walking the routes of every included router — twice, once to
match and once to handle — and by solving the same dependency graph on every request; for a
read that was a quarter of its CPU (and ~0.9 ms of a booking's ~8 in process). This ASGI
layer recognises exactly those shapes and calls the same dependencies (``service.api.deps``)
and handlers (``service.api.rest``, ``service.api.capacity``) in the order FastAPI would,
and answers errors through the same handlers (``service.api.errors``);
every other request goes on to FastAPI unchanged. The routes stay registered, so the OpenAPI
document still describes these interactions; ``tests/test_fastpath.py`` checks that no other
route claims the shapes taken here and that both paths answer alike.

It sits inside the privacy middleware (audit and masking see its answers like any other) and
is installed by ``create_app``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import capacity, errors, rest
from service.api.deps import access_context, fhir_call, resource_body
from service.fhir.validation import known_resource_types

# A FHIR id (R4 datatypes: [A-Za-z0-9\-\.]{1,64}); anything else in that position is another
# route's literal ($find, _history, _search) or a bad id that FastAPI's route answers.
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")

Handler = Callable[[Request], Awaitable[Response]]

#: Appointment operations taken here (IHE ITI Scheduling), by the path segment after the type.
_OPERATIONS: dict[str, Callable[..., Response]] = {"$hold": capacity.hold, "$book": capacity.book}


class FastPath:
    """ASGI middleware answering read, search, create, $hold and $book itself; see the module
    docstring."""

    def __init__(self, app: ASGIApp, *, prefix: str = "/fhir") -> None:
        self.app = app
        self.prefix = prefix.rstrip("/") + "/"
        self.types = known_resource_types()
        # What FastAPI's routing would have left in the scope: the audit names the interaction
        # after the route's endpoint and the resource after the path parameters.
        self.routes = {route.endpoint: route for route in (*rest.router.routes, *capacity.router.routes)
                       if isinstance(route, APIRoute)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._match(scope) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except Exception as exc:
            answer = errors.handler_for(exc)
            if answer is None:
                raise  # a bug: the audit records it on the way up, Starlette answers 500
            response = await answer(request, exc)
        await response(scope, receive, send)

    def _select(self, scope: Scope, endpoint: Callable[..., Response], **path_params: str) -> None:
        route = self.routes[endpoint]
        scope["route"], scope["endpoint"] = route, endpoint
        scope["path_params"] = path_params

    def _match(self, scope: Scope) -> Handler | None:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if not path.startswith(self.prefix):
            return None
        resource_type, slash, resource_id = path[len(self.prefix):].partition("/")
        if resource_type not in self.types:
            return None
        method = scope["method"]
        if not slash:
            if method == "GET":
                self._select(scope, rest.search_type, resource_type=resource_type)
                return lambda request: _search(request, resource_type)
            if method == "POST":
                self._select(scope, rest.create, resource_type=resource_type)
                return lambda request: _create(request, resource_type)
            return None
        if method == "GET" and _FHIR_ID.match(resource_id):
            self._select(scope, rest.read, resource_type=resource_type, resource_id=resource_id)
            return lambda request: _read(request, resource_type, resource_id)
        operation = _OPERATIONS.get(resource_id) if resource_type == "Appointment" else None
        if method == "POST" and operation is not None:
            self._select(scope, operation)
            return lambda request: _operation(request, operation)
        return None


# Each handler resolves its dependencies in the order FastAPI does for the route: the router's
# access check first (an anonymous caller is refused before its body is read), then the
# route's own parameters left to right.

async def _read(request: Request, resource_type: str, resource_id: str) -> Response:
    call = await fhir_call(request, await access_context(request))
    return await run_in_threadpool(rest.read, resource_id, resource_type, call)


async def _search(request: Request, resource_type: str) -> Response:
    call = await fhir_call(request, await access_context(request))
    return await run_in_threadpool(rest.search_type, resource_type, call)


async def _create(request: Request, resource_type: str) -> Response:
    ctx = await access_context(request)
    body = await resource_body(request)
    call = await fhir_call(request, ctx)
    return await run_in_threadpool(rest.create, resource_type, body, call)


async def _operation(request: Request, endpoint: Callable[..., Response]) -> Response:
    ctx = await access_context(request)
    body = await resource_body(request)
    call = await fhir_call(request, ctx)
    return await run_in_threadpool(endpoint, body, call)
