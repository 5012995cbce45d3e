"""Issue #4 point 1 (token endpoint, client_credentials): SMART Backend Services with
private_key_jwt (RS384, ES384) and simple HIS clients with client_secret_basic.

Every refusal of a client assertion is ``invalid_client``. Keys are generated here.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oauth2.rfc7523.assertion import private_key_jwt_sign
from fastapi import FastAPI
from joserfc import jwt

from tests.conftest import bearer
from tests.test_security_support import (  # noqa: F401  (live_server is a fixture)
    TOKEN_URL,
    LiveServer,
    assertion,
    backend_client,
    backend_form,
    ec_key,
    live_server,
    public_jwks,
    rsa_key,
    secret_client,
)

TOKEN = "http://testserver/oauth/token"


def _runtime(app: FastAPI):  # type: ignore[no-untyped-def]
    return app.state.security


async def _token(http: httpx.AsyncClient, form: dict[str, str], **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    return await http.post(TOKEN, data=form, **kwargs)


def _expect_invalid_client(response: httpx.Response, needle: str) -> None:
    assert response.status_code in (400, 401), response.text
    body = response.json()
    assert body["error"] == "invalid_client", body
    assert needle.lower() in body.get("error_description", "").lower(), body
    assert response.headers["cache-control"] == "no-store"


# -- the happy paths ---------------------------------------------------------------------------

@pytest.mark.parametrize("make_key", [rsa_key, ec_key], ids=["RS384", "ES384"])
async def test_backend_service_gets_a_short_lived_system_token(auth_app: FastAPI, auth_client: httpx.AsyncClient,
                                                               make_key) -> None:  # type: ignore[no-untyped-def]
    key = make_key()
    client = backend_client(_runtime(auth_app), key)
    response = await _token(auth_client, backend_form(assertion(key, client.client_id), "system/Patient.rs"))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store" and response.headers["pragma"] == "no-cache"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "system/Patient.rs"
    assert 0 < body["expires_in"] <= 300
    assert "refresh_token" not in body
    claims = _runtime(auth_app).tokens.verify(body["access_token"]).claims
    assert claims["exp"] - claims["iat"] <= 300
    assert claims["organization"] == client.organization and claims["client_id"] == client.client_id
    search = await auth_client.get("/Patient", headers=bearer(body["access_token"]))
    assert search.status_code == 200


async def test_client_secret_basic_for_simple_his_clients(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret = secret_client(_runtime(auth_app))
    response = await _token(auth_client, {"grant_type": "client_credentials", "scope": "system/Observation.rs"},
                            auth=(client.client_id, secret))
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] <= 300
    wrong = await _token(auth_client, {"grant_type": "client_credentials"}, auth=(client.client_id, secret + "x"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"


async def test_only_registered_scopes_are_granted(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key, scopes="system/Patient.rs system/Observation.rs")
    wider = await _token(auth_client, backend_form(assertion(key, client.client_id),
                                                   "system/Patient.cruds system/Observation.rs"))
    assert wider.status_code == 200 and wider.json()["scope"] == "system/Observation.rs"
    nothing = await _token(auth_client, backend_form(assertion(key, client.client_id), "system/Patient.d"))
    assert nothing.status_code == 400 and nothing.json()["error"] == "invalid_scope"
    user_scope = await _token(auth_client, backend_form(assertion(key, client.client_id), "user/Patient.rs"))
    assert user_scope.json()["error"] == "invalid_scope"


# -- every refusal is invalid_client -----------------------------------------------------------

async def test_replayed_jti_is_refused(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key)
    token = assertion(key, client.client_id)
    assert (await _token(auth_client, backend_form(token))).status_code == 200
    _expect_invalid_client(await _token(auth_client, backend_form(token)), "used before")
    # the same jti in a fresh assertion is a replay too
    again = assertion(key, client.client_id, jti=jwt.decode(token, key, algorithms=["RS384"]).claims["jti"])
    _expect_invalid_client(await _token(auth_client, backend_form(again)), "used before")


async def test_replay_is_refused_by_another_worker(auth_app: FastAPI, auth_client: httpx.AsyncClient, engine,
                                                   auth_settings, security_settings) -> None:  # type: ignore[no-untyped-def]
    """Used jtis are in the database: a second app (another worker) refuses the replay."""
    from service.app import create_app

    other = create_app(auth_settings, engine=engine, security=security_settings)
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key)
    token = assertion(key, client.client_id)
    assert (await _token(auth_client, backend_form(token))).status_code == 200
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://testserver") as http:
        _expect_invalid_client(await http.post(TOKEN, data=backend_form(token)), "used before")


async def test_expired_assertion(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key)
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, client.client_id, now=int(time.time()) - 600))), "expired")


async def test_not_yet_valid_assertion(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key)
    ahead = int(time.time()) + 120
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, client.client_id, extra={"nbf": ahead}))), "not valid yet")
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, client.client_id, extra={"iat": ahead}))), "not valid yet")


async def test_exp_more_than_five_minutes_ahead(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key)
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, client.client_id, exp_in=3600))), "five minutes")


async def test_wrong_audience(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key)
    for aud in ("http://testserver/fhir", "https://other.example/oauth/token"):
        _expect_invalid_client(await _token(auth_client, backend_form(
            assertion(key, client.client_id, aud=aud))), "aud")


async def test_wrong_kid(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key, other = rsa_key("k-one"), rsa_key("k-two")
    client = backend_client(_runtime(auth_app), key)
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, client.client_id, kid="k-unknown"))), "no key with kid")
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, client.client_id, kid=""))), "kid")
    # a kid the client has, but signed with another key: the kid selects the key, and it fails
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(other, client.client_id, kid="k-one"))), "signature")


async def test_kid_selects_exactly_one_key_of_the_right_type(auth_app: FastAPI,
                                                             auth_client: httpx.AsyncClient) -> None:
    rsa, ec = rsa_key("rsa-1"), ec_key("ec-1")
    client = backend_client(_runtime(auth_app), rsa, ec)
    assert (await _token(auth_client, backend_form(assertion(ec, client.client_id)))).status_code == 200
    assert (await _token(auth_client, backend_form(assertion(rsa, client.client_id)))).status_code == 200
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(rsa, client.client_id, kid="ec-1"))), "not an RSA key")


async def test_other_algorithms_are_refused(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key)
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, client.client_id, alg="RS256"))), "RS384 or ES384")


async def test_iss_and_sub_must_be_the_client(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    client = backend_client(_runtime(auth_app), key)
    other = backend_client(_runtime(auth_app), rsa_key())
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, client.client_id, iss=other.client_id))), "iss and sub")
    # signed by client's key but claiming to be the other client: the other's keys do not verify it
    _expect_invalid_client(await _token(auth_client, backend_form(
        assertion(key, other.client_id, kid=key.kid))), "kid")


async def test_unknown_and_disabled_clients(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    _expect_invalid_client(await _token(auth_client, backend_form(assertion(key, "no-such-client"))),
                           "no client")
    client = backend_client(_runtime(auth_app), key)
    assert _runtime(auth_app).clients.disable(client.client_id)
    _expect_invalid_client(await _token(auth_client, backend_form(assertion(key, client.client_id))), "no client")


async def test_garbage_assertion(auth_client: httpx.AsyncClient) -> None:
    _expect_invalid_client(await _token(auth_client, backend_form("not.a.jwt")), "")


# -- jwks_url clients ----------------------------------------------------------------------------

@pytest.fixture
def jwks_host() -> Iterator[tuple[str, dict]]:
    """A tiny JWKS host on a loopback port (what a client's own server would publish)."""
    published: dict = {"keys": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(published).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", published
    server.shutdown()
    thread.join(timeout=5)


async def test_client_registered_with_a_jwks_url(auth_app: FastAPI, auth_client: httpx.AsyncClient,
                                                 jwks_host: tuple[str, dict]) -> None:
    url, published = jwks_host
    key = ec_key()
    published.update(public_jwks(key))
    client, _ = _runtime(auth_app).clients.create(name="jwks-url client", organization="Organization/hospital-yq1",
                                                  scopes="system/*.rs", jwks_url=url)
    assert (await _token(auth_client, backend_form(assertion(key, client.client_id)))).status_code == 200


# -- authlib's own client, over real HTTP ------------------------------------------------------

class SmartPrivateKeyJWT(PrivateKeyJWT):
    """authlib's PrivateKeyJWT signs for an hour by default; SMART allows five minutes."""

    def sign(self, auth, token_endpoint):  # type: ignore[no-untyped-def]
        return private_key_jwt_sign(auth.client_secret, client_id=auth.client_id, token_endpoint=token_endpoint,
                                    alg=self.alg, header=self.headers, expires_in=240)


@pytest.mark.parametrize("make_key, alg", [(rsa_key, "RS384"), (ec_key, "ES384")], ids=["RS384", "ES384"])
async def test_authlib_client_completes_the_backend_services_flow(live_server: LiveServer, make_key,  # noqa: F811
                                                                  alg: str) -> None:  # type: ignore[no-untyped-def]
    key = make_key()
    client = backend_client(live_server.runtime, key, scopes="system/Patient.rs system/Organization.rs")
    async with httpx.AsyncClient() as http:
        config = (await http.get(live_server.fhir + "/.well-known/smart-configuration")).json()
    async with AsyncOAuth2Client(client_id=client.client_id, client_secret=key,
                                 token_endpoint_auth_method=SmartPrivateKeyJWT(config["token_endpoint"], alg=alg,
                                                                                headers={"kid": key.kid}),
                                 scope="system/Organization.rs") as oauth:
        token = await oauth.fetch_token(config["token_endpoint"], grant_type="client_credentials")
        assert token["scope"] == "system/Organization.rs" and token["expires_in"] <= 300
        response = await oauth.get(live_server.fhir + "/Organization?_count=1")
        assert response.status_code == 200 and response.json()["resourceType"] == "Bundle"
        refused = await oauth.get(live_server.fhir + "/Patient?_count=1")
        assert refused.status_code == 403
    assert TOKEN_URL != config["token_endpoint"]  # the live server has its own absolute URLs
