"""The admin API: OAuth clients and desk users.

Every call needs an access token carrying the ``yilian/admin`` scope. Only backend clients
(client_credentials) can be granted it, and only when registered with it explicitly
(``yilian clients add ... --scopes "yilian/admin"``): ``system/*.cruds`` on FHIR data does
not make a hospital's HIS an administrator of the gateway. Desk users cannot obtain it; the
``yilian clients`` / ``yilian users`` commands on the server are the other way in.

Secrets and generated passwords are in the creation response only, never again.
"""

from __future__ import annotations

import secrets
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from service.security.clients import ClientError
from service.security.oauth.bearer import BearerError, authenticate, require_scope
from service.security.oauth.runtime import SecurityRuntime
from service.security.scopes import ADMIN_SCOPE
from service.security.users import UserError

router = APIRouter(prefix="/admin", tags=["admin"])


def admin_runtime(request: Request) -> SecurityRuntime:
    runtime: SecurityRuntime = request.app.state.security
    access = authenticate(request, runtime)
    require_scope(access, ADMIN_SCOPE)
    return runtime


class ClientIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    organization: str = Field(description="Organization/<id> the client acts for")
    scope: str = Field(description="space-separated scopes the client may be granted")
    token_endpoint_auth_method: Literal["client_secret_basic", "private_key_jwt", "none"]
    jwks: dict | None = None
    jwks_uri: str | None = None
    redirect_uris: list[str] = []
    grant_types: list[str] | None = None


class UserIn(BaseModel):
    username: str
    organization: str = Field(description="Organization/<id> the user works for")
    practitioner_role: str | None = Field(None, description="PractitionerRole/<id>, optional")
    display_name: str = ""
    password: str | None = Field(None, description="omitted: one is generated and returned once")


def _error(status: int, message: str) -> BearerError:
    return BearerError(status, message, error="invalid_request")


@router.get("/clients")
def list_clients(runtime: SecurityRuntime = Depends(admin_runtime)) -> list[dict]:
    return [c.as_json() for c in runtime.clients.list()]


@router.post("/clients", status_code=201)
def create_client(body: ClientIn, runtime: SecurityRuntime = Depends(admin_runtime)) -> dict:
    method = body.token_endpoint_auth_method
    if method == "private_key_jwt" and (body.jwks is None) == (body.jwks_uri is None):
        raise _error(400, "private_key_jwt needs exactly one of jwks and jwks_uri")
    try:
        client, secret = runtime.clients.create(
            name=body.name, organization=body.organization, scopes=body.scope,
            secret=method == "client_secret_basic", jwks=body.jwks if method == "private_key_jwt" else None,
            jwks_url=body.jwks_uri if method == "private_key_jwt" else None, public=method == "none",
            redirect_uris=body.redirect_uris, grant_types=body.grant_types)
    except ClientError as exc:
        raise _error(400, str(exc)) from None
    answer = client.as_json()
    if secret:
        answer["client_secret"] = secret
    return answer


@router.get("/clients/{client_id}")
def get_client(client_id: str, runtime: SecurityRuntime = Depends(admin_runtime)) -> dict:
    client = runtime.clients.get(client_id, include_disabled=True)
    if client is None:
        raise _error(404, f"no client {client_id}")
    return client.as_json()


@router.delete("/clients/{client_id}", status_code=204)
def disable_client(client_id: str, runtime: SecurityRuntime = Depends(admin_runtime)) -> Response:
    if not runtime.clients.disable(client_id):
        raise _error(404, f"no enabled client {client_id}")
    runtime.tokens.revocations.reload()  # its tokens stop here at once, elsewhere within seconds
    return Response(status_code=204)


@router.get("/users")
def list_users(runtime: SecurityRuntime = Depends(admin_runtime)) -> list[dict]:
    return [u.as_json() for u in runtime.users.list()]


@router.post("/users", status_code=201)
def create_user(body: UserIn, runtime: SecurityRuntime = Depends(admin_runtime)) -> dict:
    password = body.password or secrets.token_urlsafe(12)
    try:
        user = runtime.users.create(body.username, password, organization=body.organization,
                                    practitioner_role=body.practitioner_role, display_name=body.display_name)
    except UserError as exc:
        raise _error(400, str(exc)) from None
    answer = user.as_json()
    if body.password is None:
        answer["password"] = password
    return answer


@router.post("/users/{username}/unlock", status_code=204)
def unlock_user(username: str, runtime: SecurityRuntime = Depends(admin_runtime)) -> Response:
    if not runtime.users.unlock(username):
        raise _error(404, f"no user {username}")
    return Response(status_code=204)


@router.delete("/users/{username}", status_code=204)
def disable_user(username: str, runtime: SecurityRuntime = Depends(admin_runtime)) -> Response:
    if not runtime.users.disable(username):
        raise _error(404, f"no enabled user {username}")
    runtime.tokens.revocations.reload()
    return Response(status_code=204)


async def _bearer_error(request: Request, exc: Exception) -> Response:
    """RFC 6750 errors outside /fhir (the FHIR API answers OperationOutcomes instead)."""
    assert isinstance(exc, BearerError)
    import orjson

    body = {"error": exc.error or {401: "unauthorized", 429: "rate_limited"}.get(exc.status, "error"),
            "error_description": exc.description}
    return Response(orjson.dumps(body), status_code=exc.status, media_type="application/json",
                    headers={**exc.headers, "Cache-Control": "no-store"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(BearerError, _bearer_error)
