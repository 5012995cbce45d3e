"""The authlib ↔ Starlette adapter (service/security/oauth/server.py) on its own terms:
transport security, form parsing and size, repeated parameters, JSON error shape."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.security.oauth.config import SecuritySettings
from tests.test_security_support import secret_client

TOKEN = "http://testserver/oauth/token"


async def test_oauth_over_plain_http_is_refused_outside_loopback(engine, auth_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    strict = create_app(auth_settings, engine=engine, security=SecuritySettings())  # base http://testserver
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=strict), base_url="http://testserver") as http:
        response = await http.post(TOKEN, data={"grant_type": "client_credentials"})
        assert response.status_code == 400 and response.json()["error"] == "insecure_transport"
        page = await http.get("http://testserver/oauth/authorize", params={"response_type": "code"})
        assert page.status_code == 400 and page.headers["x-frame-options"] == "DENY"


async def test_json_bodies_and_queries_are_not_token_requests(auth_app: FastAPI,
                                                              auth_client: httpx.AsyncClient) -> None:
    client, secret = secret_client(auth_app.state.security)
    as_json = await auth_client.post(TOKEN, json={"grant_type": "client_credentials"}, auth=(client.client_id, secret))
    assert as_json.status_code == 400 and as_json.json()["error"] == "unsupported_grant_type"
    in_query = await auth_client.post(TOKEN, params={"grant_type": "client_credentials"},
                                      auth=(client.client_id, secret))
    assert in_query.status_code == 400 and in_query.json()["error"] == "unsupported_grant_type"
    form = await auth_client.post(TOKEN, data={"grant_type": "client_credentials"}, auth=(client.client_id, secret))
    assert form.status_code == 200


async def test_oversized_forms_are_refused(auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.post(TOKEN, content=b"grant_type=client_credentials&x=" + b"a" * 70_000,
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413 and response.json()["error"] == "invalid_request"


@pytest.mark.parametrize("endpoint", ["token", "introspect", "revoke"])
async def test_errors_are_rfc6749_json_and_never_cached(auth_client: httpx.AsyncClient, endpoint: str) -> None:
    response = await auth_client.post(f"http://testserver/oauth/{endpoint}", data={"token": "x"})
    assert response.status_code in (400, 401)
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store" and response.headers["pragma"] == "no-cache"
    assert set(response.json()) <= {"error", "error_description", "error_uri"}


async def test_repeated_authorization_parameters_are_refused(auth_app: FastAPI,
                                                             auth_client: httpx.AsyncClient) -> None:
    client, _ = auth_app.state.security.clients.create(
        name="app", organization="Organization/hospital-yq1", scopes="user/*.rs", secret=True,
        redirect_uris=["https://app.example.cn/cb"])
    query = (f"response_type=code&client_id={client.client_id}&redirect_uri=https://app.example.cn/cb"
             "&scope=user/*.rs&scope=user/Patient.rs&state=s&aud=http://testserver/fhir&code_challenge_method=S256"
             "&code_challenge=" + "a" * 43)
    response = await auth_client.get("http://testserver/oauth/authorize?" + query)
    assert response.status_code in (302, 400)
    assert "invalid_request" in response.headers.get("location", "") + response.text
