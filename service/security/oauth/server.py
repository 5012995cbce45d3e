"""authlib's AuthorizationServer on Starlette/FastAPI.

authlib ships server integrations for Flask and Django only. This adapter does for Starlette
what ``authlib.integrations.flask_oauth2`` does for Flask, with two differences:

* Starlette reads bodies asynchronously while authlib is synchronous (and our database calls
  are too), so the router first reads the form (:func:`read_form`, size-capped,
  ``application/x-www-form-urlencoded`` only) into a :class:`StarletteOAuth2Request`, then runs
  the authlib call in the thread pool.
* The request URI given to authlib is our public URL (from ``YILIAN_BASE_URL``), never one
  built from the Host header. authlib refuses OAuth over plain http unless that URL is https
  or loopback; ``YILIAN_OAUTH_ALLOW_HTTP`` lifts this for a development host.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import OAuth2Payload, OAuth2Request
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from service.security.clients import Client
from service.security.oauth.endpoints import IntrospectionEndpoint, RevocationEndpoint
from service.security.oauth.grants import (
    AuthorizationCodeGrant,
    ClientCredentialsGrant,
    RefreshTokenGrant,
    S256CodeChallenge,
)

if TYPE_CHECKING:
    from service.security.oauth.runtime import SecurityRuntime

log = logging.getLogger("yilian.security")

#: OAuth requests are small; anything bigger is refused before it is parsed.
MAX_FORM_BYTES = 64 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"


class FormTooLarge(Exception):
    pass


async def read_form(request: Request, *, max_bytes: int = MAX_FORM_BYTES) -> list[tuple[str, str]]:
    """The url-encoded form of a POST (empty for other content types or methods)."""
    if request.method != "POST":
        return []
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != FORM_TYPE:
        return []
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FormTooLarge()
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise FormTooLarge()
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return []


class StarletteOAuth2Payload(OAuth2Payload):
    """Request parameters: the query string (GET) or the form (POST), never both merged."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._data: dict[str, str] = {}
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in items:
            self._data.setdefault(key, value)
            self._datalist[key].append(value)

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class StarletteOAuth2Request(OAuth2Request):
    def __init__(self, method: str, public_uri: str, headers: Headers, query: list[tuple[str, str]],
                 form: list[tuple[str, str]], *, allow_http: bool) -> None:
        # authlib checks transport security on the URI it is given (InsecureTransportError).
        checked = "https://" + public_uri[len("http://"):] if allow_http and public_uri.startswith("http://") \
            else public_uri
        super().__init__(method=method, uri=checked, headers=headers)
        self.uri = public_uri
        self._args = dict(reversed(query))  # first value wins, as in the payload
        self._form = dict(reversed(form))
        self.payload = StarletteOAuth2Payload(form if method == "POST" else query)
        self.launch_patient: str | None = None  # set by the consent page for launch/patient

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class YilianAuthorizationServer(AuthorizationServer):
    """authlib's server with our grants, endpoints and client lookup."""

    def __init__(self, runtime: SecurityRuntime) -> None:
        super().__init__(scopes_supported=None)
        self.runtime = runtime
        self.register_grant(AuthorizationCodeGrant, [S256CodeChallenge(required=True)])
        self.register_grant(RefreshTokenGrant)
        self.register_grant(ClientCredentialsGrant)
        self.register_endpoint(IntrospectionEndpoint)
        self.register_endpoint(RevocationEndpoint)
        self.register_client_auth_method("private_key_jwt", runtime.private_key_jwt)

    # -- authlib's framework hooks -----------------------------------------------------

    def query_client(self, client_id: str) -> Client | None:
        if not isinstance(client_id, str) or not client_id:
            return None
        return self.runtime.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Access tokens are self-contained JWTs and refresh tokens are stored by the grants
        when they are made, so there is nothing left to save here."""
        return

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        raise TypeError("build a StarletteOAuth2Request first (router._oauth_request)")

    def create_json_request(self, request: Any):  # type: ignore[no-untyped-def]
        raise NotImplementedError("no JSON endpoints (dynamic registration is not offered)")

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
        header_map = dict(headers or [])
        if isinstance(body, dict):
            content = orjson.dumps(body)
            header_map.setdefault("Content-Type", "application/json")
        else:
            content = (body or "").encode() if isinstance(body, str) else (body or b"")
        header_map.setdefault("Cache-Control", "no-store")
        header_map.setdefault("Pragma", "no-cache")
        return Response(content, status_code=status, headers=header_map)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        client = kwargs.get("client")
        log.debug("oauth %s client=%s", name, getattr(client, "client_id", None))
