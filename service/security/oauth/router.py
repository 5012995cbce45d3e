"""HTTP endpoints of the authorization server.

=====================================  =====================================================
``GET /fhir/.well-known/smart-configuration``  SMART discovery (JSON, whatever Accept says)
``GET /oauth/jwks``                     our public signing keys (``jwks_uri``)
``GET|POST /oauth/authorize``           authorization code + PKCE; login / consent page
``POST /oauth/token``                   authorization_code, refresh_token, client_credentials
``POST /oauth/introspect``              RFC 7662
``POST /oauth/revoke``                  RFC 7009
``POST /oauth/logout``                  ends the desk user's session
=====================================  =====================================================

Errors on /oauth are RFC 6749 JSON (``{"error": ..., "error_description": ...}``) or, on the
authorization endpoint, a redirect to the client with ``error=`` once the client and its
redirect URI are known, and an HTML page before that (never a redirect to an unchecked URI).
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from typing import Any
from urllib.parse import urlsplit

import orjson
from authlib.oauth2.rfc6749.errors import OAuth2Error
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.fhir.access import AccessContext
from service.fhir.errors import FhirError
from service.security.audit import record_login
from service.security.oauth import pages
from service.security.oauth.runtime import SecurityRuntime
from service.security.oauth.server import (
    FormTooLarge,
    StarletteOAuth2Request,
    read_form,
)
from service.security.scopes import LAUNCH_PATIENT
from service.security.users import LoginFailed

router = APIRouter()

SESSION_COOKIE = "yilian_session"
CSRF_COOKIE = "yilian_csrf"
#: Parameters of the authorization request carried through the consent form.
AUTHORIZE_PARAMS = ("response_type", "client_id", "redirect_uri", "scope", "state", "aud", "code_challenge",
                    "code_challenge_method", "launch")
_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_\-]{20,100}$")

SMART_CAPABILITIES = [
    "launch-standalone", "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
    "permission-v1", "permission-v2", "permission-patient", "permission-user", "permission-offline",
    "permission-online", "context-standalone-patient",
]
SCOPES_SUPPORTED = [
    "launch/patient", "offline_access", "online_access",
    "patient/*.rs", "patient/*.read", "user/*.cruds", "user/*.rs", "user/*.read", "user/*.write",
    "system/*.cruds", "system/*.rs", "system/*.read", "system/*.write", "yilian/introspect", "yilian/admin",
]


def runtime_of(request: Request) -> SecurityRuntime:
    return request.app.state.security  # type: ignore[no-any-return]


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _oauth_error(runtime: SecurityRuntime, error: OAuth2Error) -> Response:
    return runtime.server.handle_error_response(None, error)  # type: ignore[no-any-return]


def _oauth_request(request: Request, runtime: SecurityRuntime, *, query: list[tuple[str, str]],
                   form: list[tuple[str, str]]) -> StarletteOAuth2Request:
    """An authlib request for ``request`` (may raise InsecureTransportError)."""
    return StarletteOAuth2Request(request.method, runtime.urls.public(request.url.path, request.url.query),
                                  request.headers, query, form, allow_http=runtime.settings.oauth_allow_http)


# -- discovery ------------------------------------------------------------------------------

@router.get("/fhir/.well-known/smart-configuration", tags=["SMART on FHIR"])
def smart_configuration(request: Request) -> Response:
    """SMART App Launch 2.x discovery document (always JSON)."""
    urls = runtime_of(request).urls
    return _json({
        "issuer": urls.issuer,
        "jwks_uri": urls.jwks,
        "authorization_endpoint": urls.authorize,
        "token_endpoint": urls.token,
        "introspection_endpoint": urls.introspect,
        "revocation_endpoint": urls.revoke,
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "response_types_supported": ["code"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": SMART_CAPABILITIES,
    })


@router.get("/oauth/jwks", tags=["OAuth"])
async def jwks(request: Request) -> Response:
    """Our public token-signing keys (the current one and the previous one during rotation)."""
    body = await run_in_threadpool(runtime_of(request).keys.jwks)
    return _json(body, headers={"Cache-Control": "public, max-age=300"})


# -- token, introspection, revocation -------------------------------------------------------

async def _form_request(request: Request) -> StarletteOAuth2Request | Response:
    runtime = runtime_of(request)
    try:
        form = await read_form(request)
        return _oauth_request(request, runtime, query=[], form=form)
    except FormTooLarge:
        return _json({"error": "invalid_request", "error_description": "the request body is too large"}, 413,
                     {"Cache-Control": "no-store", "Pragma": "no-cache"})
    except OAuth2Error as error:
        return _oauth_error(runtime, error)


@router.post("/oauth/token", tags=["OAuth"])
async def token(request: Request) -> Response:
    """Token endpoint: authorization_code (+PKCE), refresh_token, client_credentials."""
    oauth_request = await _form_request(request)
    if isinstance(oauth_request, Response):
        return oauth_request
    return await run_in_threadpool(_token, request, runtime_of(request), oauth_request)


def _token(request: Request, runtime: SecurityRuntime, oauth_request: StarletteOAuth2Request) -> Response:
    """Issue (or refuse) a token, and leave the attempt in the audit trail either way: a token
    grant is how machines and apps log in."""
    response = runtime.server.create_token_response(oauth_request)
    client = getattr(oauth_request, "client", None)
    client_id = client.client_id if client is not None else _claimed_client_id(request, oauth_request)
    grant_type = oauth_request.payload.grant_type or "(none)"
    detail = f"token request, grant_type={grant_type}"
    if response.status_code != 200:
        detail += f": {_oauth_error_code(response)}"
    _audit_login(request, getattr(oauth_request.user, "username", None), response.status_code == 200,
                 client_id=client_id, detail=detail)
    return response  # type: ignore[no-any-return]


def _claimed_client_id(request: Request, oauth_request: StarletteOAuth2Request) -> str | None:
    """The client id a failed request claimed (form field or HTTP Basic user), for the record."""
    if oauth_request.payload.client_id:
        return str(oauth_request.payload.client_id)
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("basic "):
        try:
            return base64.b64decode(authorization[6:]).decode().split(":", 1)[0] or None
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _oauth_error_code(response: Response) -> str:
    try:
        return str(orjson.loads(bytes(response.body)).get("error", response.status_code))
    except (orjson.JSONDecodeError, AttributeError):
        return str(response.status_code)


def _audit_login(request: Request, user: str | None, succeeded: bool, *, client_id: str | None,
                 detail: str) -> None:
    """Durably record a login attempt before answering (fails closed: no record, no token)."""
    record_login(request.app.state.audit_queue, user, succeeded, client_id=client_id,
                 address=request.client.host if request.client else None, detail=detail)


@router.post("/oauth/introspect", tags=["OAuth"])
async def introspect(request: Request) -> Response:
    """RFC 7662 token introspection (the caller authenticates as a client)."""
    oauth_request = await _form_request(request)
    if isinstance(oauth_request, Response):
        return oauth_request
    return await run_in_threadpool(runtime_of(request).server.create_endpoint_response, "introspection",
                                   oauth_request)


@router.post("/oauth/revoke", tags=["OAuth"])
async def revoke(request: Request) -> Response:
    """RFC 7009 token revocation: access tokens stop within seconds in every worker."""
    oauth_request = await _form_request(request)
    if isinstance(oauth_request, Response):
        return oauth_request
    return await run_in_threadpool(runtime_of(request).server.create_endpoint_response, "revocation",
                                   oauth_request)


# -- authorization endpoint -----------------------------------------------------------------

@router.get("/oauth/authorize", tags=["OAuth"])
async def authorize_get(request: Request) -> Response:
    """Check the authorization request, then show the login / consent page."""
    runtime = runtime_of(request)
    try:
        oauth_request = _oauth_request(request, runtime, query=list(request.query_params.multi_items()), form=[])
    except OAuth2Error as error:
        return pages.message_page("授权失败 Authorization failed", error.get_error_description() or error.error,
                                  status=400)
    return await run_in_threadpool(_show_consent, request, runtime, oauth_request)


@router.post("/oauth/authorize", tags=["OAuth"])
async def authorize_post(request: Request) -> Response:
    """The consent form: log in (unless a session exists), pick a patient when asked, decide.
    Without a ``decision`` field the POST is the authorization request itself."""
    runtime = runtime_of(request)
    try:
        form = await read_form(request)
        oauth_request = _oauth_request(request, runtime, query=[], form=form)
    except FormTooLarge:
        return pages.message_page("请求过大 Request too large", "the form is too large", status=413)
    except OAuth2Error as error:
        return pages.message_page("授权失败 Authorization failed", error.get_error_description() or error.error,
                                  status=400)
    fields = dict(reversed(form))
    if "decision" not in fields:  # an authorization request sent by POST (SMART allows GET or POST)
        return await run_in_threadpool(_show_consent, request, runtime, oauth_request)
    return await run_in_threadpool(_decide, request, runtime, oauth_request, fields)


def _show_consent(request: Request, runtime: SecurityRuntime, oauth_request: StarletteOAuth2Request, *,
                  error: str | None = None, status: int = 200, patient: str = "") -> Response:
    try:
        grant = runtime.server.get_consent_grant(request=oauth_request, end_user=None)
    except OAuth2Error as exc:
        return _authorization_error(runtime, exc)
    user = runtime.users.session_user(request.cookies.get(SESSION_COOKIE))
    csrf = request.cookies.get(CSRF_COOKIE)
    if not csrf or not _TOKEN_SHAPE.match(csrf):
        csrf = secrets.token_urlsafe(24)
    data = oauth_request.payload.data
    hidden = {name: data[name] for name in AUTHORIZE_PARAMS if data.get(name) is not None}
    hidden["csrf_token"] = csrf
    scopes = (oauth_request.scope or "").split()
    response = pages.consent_page(
        action=runtime.urls.authorize, client_name=grant.client.name, scopes=scopes, hidden=hidden,
        logged_in_as=user.display_name or user.username if user else None, ask_patient=LAUNCH_PATIENT in scopes,
        patient=patient, error=error, redirect_origin=pages.origin_of(grant.redirect_uri or ""), status=status)
    _set_cookie(response, runtime, CSRF_COOKIE, csrf, samesite="strict")
    return response


def _decide(request: Request, runtime: SecurityRuntime, oauth_request: StarletteOAuth2Request,
            form: dict[str, str]) -> Response:
    csrf_cookie = request.cookies.get(CSRF_COOKIE, "")
    if not csrf_cookie or not hmac.compare_digest(csrf_cookie, form.get("csrf_token", "")):
        return pages.message_page("表单已失效 Form expired",
                                  "the form is no longer valid (cookies off, or opened elsewhere): start again from "
                                  "the application", status=400)
    try:
        grant = runtime.server.get_consent_grant(request=oauth_request, end_user=None)
    except OAuth2Error as exc:
        return _authorization_error(runtime, exc)
    if form.get("decision") != "approve":
        return _with_page_headers(runtime.server.create_authorization_response(
            request=oauth_request, grant_user=None, grant=grant))
    session = request.cookies.get(SESSION_COOKIE)
    user = runtime.users.session_user(session)
    new_session: str | None = None
    if user is None:
        username = form.get("username", "")
        try:
            user = runtime.users.authenticate(username, form.get("password", ""))
        except LoginFailed as failed:
            _audit_login(request, username[:64] or None, False, client_id=oauth_request.payload.client_id,
                         detail=f"desk login refused: {failed}")
            return _show_consent(request, runtime, oauth_request, error=str(failed), status=401,
                                 patient=form.get("patient", ""))
        _audit_login(request, user.username, True, client_id=oauth_request.payload.client_id, detail="desk login")
        new_session = runtime.users.start_session(user.username)
    if LAUNCH_PATIENT in (oauth_request.scope or "").split():
        patient = form.get("patient", "").strip().removeprefix("Patient/")
        problem = _check_patient(request, patient)
        if problem:
            response = _show_consent(request, runtime, oauth_request, error=problem, status=400, patient=patient)
            if new_session:
                _set_cookie(response, runtime, SESSION_COOKIE, new_session, samesite="lax")
            return response
        oauth_request.launch_patient = patient
    response = _with_page_headers(runtime.server.create_authorization_response(
        request=oauth_request, grant_user=user, grant=grant))
    if new_session:
        _set_cookie(response, runtime, SESSION_COOKIE, new_session, samesite="lax")
    return response


def _check_patient(request: Request, patient: str) -> str | None:
    """Why ``patient`` cannot be the launch context, or None when it can."""
    if not _PATIENT_ID.match(patient):
        return "请输入患者 ID / enter the id of a Patient (letters, digits, '-' and '.')"
    try:
        request.app.state.store.read(AccessContext.internal("oauth-consent"), "Patient", patient)
    except FhirError:
        return f"没有该患者 / there is no Patient/{patient}"
    return None


@router.post("/oauth/logout", tags=["OAuth"])
async def logout(request: Request) -> Response:
    runtime = runtime_of(request)
    await run_in_threadpool(runtime.users.end_session, request.cookies.get(SESSION_COOKIE))
    response = pages.message_page("已退出 Logged out", "您已退出登录 / you are logged out", status=200, error=False)
    response.delete_cookie(SESSION_COOKIE, path=_cookie_path(runtime))
    return response


def _authorization_error(runtime: SecurityRuntime, error: OAuth2Error) -> Response:
    """Back to the client when its redirect URI is known and checked; else our own page."""
    if error.redirect_uri:
        return _with_page_headers(runtime.server.handle_error_response(None, error))
    return pages.message_page("授权失败 Authorization failed",
                              f"{error.error}: {error.get_error_description() or ''}".strip(": "), status=400)


def _with_page_headers(response: Response) -> Response:
    for name, value in pages.security_headers().items():
        response.headers.setdefault(name, value)
    return response


def _cookie_path(runtime: SecurityRuntime) -> str:
    return (urlsplit(runtime.urls.root).path.rstrip("/") or "") + "/oauth"


def _set_cookie(response: Response, runtime: SecurityRuntime, name: str, value: str, *, samesite: str) -> None:
    secure = runtime.urls.root.startswith("https://")
    max_age = runtime.settings.session_max_hours * 3600 if name == SESSION_COOKIE else None
    response.set_cookie(name, value, max_age=max_age, path=_cookie_path(runtime), secure=secure, httponly=True,
                        samesite=samesite)  # type: ignore[arg-type]
