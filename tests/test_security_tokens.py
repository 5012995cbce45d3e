"""Issue #4 points 1 and 4: access tokens on FHIR requests (401 / WWW-Authenticate, the
AccessContext they give), revocation, introspection, signing-key rotation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import OctKey

from service.app import create_app
from service.config import Settings
from service.fhir.db import create_engine
from service.migrate import upgrade
from service.security.oauth.config import SecuritySettings
from service.security.oauth.keys import KeyStore
from tests.conftest import bearer
from tests.test_security_support import HOSPITAL, desk_user, rsa_key, secret_client

INTROSPECT = "http://testserver/oauth/introspect"
REVOKE = "http://testserver/oauth/revoke"
TOKEN = "http://testserver/oauth/token"


def _runtime(app: FastAPI):  # type: ignore[no-untyped-def]
    return app.state.security


async def _client_token(http: httpx.AsyncClient, client_id: str, secret: str, scope: str = "system/*.rs") -> str:
    response = await http.post(TOKEN, data={"grant_type": "client_credentials", "scope": scope},
                               auth=(client_id, secret))
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


# -- no token, bad token -------------------------------------------------------------------

async def test_no_token_is_401_with_a_bearer_challenge(auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.get("/Patient")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="yilian"'
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "login"


async def test_every_interaction_needs_a_token(auth_client: httpx.AsyncClient) -> None:
    patient = {"resourceType": "Patient", "gender": "male"}
    calls = [auth_client.get("/Patient/x"), auth_client.post("/Patient", json=patient),
             auth_client.put("/Patient/x", json={**patient, "id": "x"}), auth_client.delete("/Patient/x"),
             auth_client.get("/_history"), auth_client.get("/Patient/x/_history"),
             auth_client.post("", json={"resourceType": "Bundle", "type": "batch", "entry": []}),
             auth_client.post("/Patient/$validate", json=patient)]
    for call in calls:
        response = await call
        assert response.status_code == 401, response.request.url


async def test_unauthenticated_request_is_refused_before_its_body_is_read(auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.post("/Patient", content=b"{not json", headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 401


async def test_dev_header_is_ignored_when_auth_is_on(auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.get("/Patient", headers={"X-Yilian-Organization": HOSPITAL})
    assert response.status_code == 401


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Token abc"])
async def test_malformed_authorization_header(auth_client: httpx.AsyncClient, header: str) -> None:
    response = await auth_client.get("/Patient", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="yilian", error="invalid_request"')


async def test_garbage_token_is_invalid_token(auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.get("/Patient", headers=bearer("abc.def.ghi"))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_expired_and_not_yet_valid_tokens(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    tokens = _runtime(auth_app).tokens
    past, _ = tokens.issue_access_token(client_id="t-expired", scope=["system/*.rs"], organization=HOSPITAL,
                                        kind="backend", now=datetime.now(UTC) - timedelta(minutes=10))
    response = await auth_client.get("/Patient", headers=bearer(past))
    assert response.status_code == 401 and "expired" in response.headers["www-authenticate"]
    future, _ = tokens.issue_access_token(client_id="t-future", scope=["system/*.rs"], organization=HOSPITAL,
                                          kind="backend", now=datetime.now(UTC) + timedelta(minutes=2))
    response = await auth_client.get("/Patient", headers=bearer(future))
    assert response.status_code == 401 and "not valid yet" in response.headers["www-authenticate"]


async def test_forged_tokens_are_refused(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    runtime = _runtime(auth_app)
    genuine, _ = runtime.tokens.issue_access_token(client_id="t-forge", scope=["system/*.cruds"],
                                                   organization=HOSPITAL, kind="backend")
    header = jwt.decode(genuine, runtime.keys.signer()).header
    claims = runtime.tokens.verify(genuine).claims
    impostor = rsa_key(header["kid"])  # same kid, another key
    forged = jwt.encode({"alg": "RS256", "kid": header["kid"], "typ": "at+jwt"}, claims, impostor)
    hmac = jwt.encode({"alg": "HS256", "kid": header["kid"], "typ": "at+jwt"}, claims,
                      OctKey.import_key(b"0123456789abcdef0123456789abcdef"), algorithms=["HS256"])
    other_audience = jwt.encode(header, {**claims, "aud": "https://elsewhere.example/fhir"}, runtime.keys.signer())
    other_issuer = jwt.encode(header, {**claims, "iss": "https://elsewhere.example/oauth"}, runtime.keys.signer())
    for token, reason in ((forged, "signature"), (hmac, "not issued by this server"),
                          (other_audience, "another server"), (other_issuer, "another issuer")):
        response = await auth_client.get("/Patient", headers=bearer(token))
        assert response.status_code == 401 and reason in response.headers["www-authenticate"], reason


# -- the AccessContext a token gives -----------------------------------------------------------

def test_token_claims_become_the_access_context(auth_app: FastAPI) -> None:
    tokens = _runtime(auth_app).tokens
    token, expires_in = tokens.issue_access_token(client_id="desk-app", scope=["patient/*.rs", "launch/patient"],
                                                  organization=HOSPITAL, kind="user", user="wang",
                                                  practitioner="PractitionerRole/pr-1", patient="p-42")
    assert expires_in <= 3600
    ctx = tokens.verify(token).context()
    assert ctx.client_id == "desk-app" and ctx.organization == HOSPITAL and ctx.user == "wang"
    assert ctx.practitioner == "PractitionerRole/pr-1" and ctx.patient == "Patient/p-42"
    assert ctx.scopes == frozenset({"patient/*.rs", "launch/patient"}) and not ctx.system


# -- revocation ------------------------------------------------------------------------------

async def test_revoked_token_is_401(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret = secret_client(_runtime(auth_app))
    token = await _client_token(auth_client, client.client_id, secret)
    assert (await auth_client.get("/Organization", headers=bearer(token))).status_code == 200
    revoked = await auth_client.post(REVOKE, data={"token": token}, auth=(client.client_id, secret))
    assert revoked.status_code == 200
    response = await auth_client.get("/Organization", headers=bearer(token))
    assert response.status_code == 401 and "revoked" in response.headers["www-authenticate"]


async def test_revocation_reaches_other_workers(auth_app: FastAPI, auth_client: httpx.AsyncClient, engine,
                                                auth_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Another worker (another app on the same database) re-reads the revocation list; with
    revocation_refresh_seconds=0 on the next request, by default within 2 seconds."""
    other = create_app(auth_settings, engine=engine, security=SecuritySettings(oauth_allow_http=True,
                                                                               revocation_refresh_seconds=0))
    client, secret = secret_client(_runtime(auth_app))
    token = await _client_token(auth_client, client.client_id, secret)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://testserver/fhir") as http:
        assert (await http.get("/Organization", headers=bearer(token))).status_code == 200
        await auth_client.post(REVOKE, data={"token": token}, auth=(client.client_id, secret))
        assert (await http.get("/Organization", headers=bearer(token))).status_code == 401


async def test_a_client_revokes_only_its_own_tokens(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    owner, owner_secret = secret_client(_runtime(auth_app))
    other, other_secret = secret_client(_runtime(auth_app))
    token = await _client_token(auth_client, owner.client_id, owner_secret)
    refused = await auth_client.post(REVOKE, data={"token": token}, auth=(other.client_id, other_secret))
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert (await auth_client.get("/Organization", headers=bearer(token))).status_code == 200
    unknown = await auth_client.post(REVOKE, data={"token": "no-such-token"}, auth=(owner.client_id, owner_secret))
    assert unknown.status_code == 200  # RFC 7009 2.2: an invalid token is not an error


async def test_disabling_a_client_or_user_stops_their_tokens(auth_app: FastAPI,
                                                             auth_client: httpx.AsyncClient) -> None:
    runtime = _runtime(auth_app)
    client, secret = secret_client(runtime)
    token = await _client_token(auth_client, client.client_id, secret)
    runtime.clients.disable(client.client_id)
    runtime.tokens.revocations.reload()  # what the next refresh (≤ 2 s) does in every worker
    assert (await auth_client.get("/Organization", headers=bearer(token))).status_code == 401
    user = desk_user(runtime)
    user_token, _ = runtime.tokens.issue_access_token(client_id="desk", scope=["user/*.rs"], organization=HOSPITAL,
                                                      kind="user", user=user.username)
    assert (await auth_client.get("/Organization", headers=bearer(user_token))).status_code == 200
    runtime.users.disable(user.username)
    runtime.tokens.revocations.reload()
    assert (await auth_client.get("/Organization", headers=bearer(user_token))).status_code == 401


# -- introspection ---------------------------------------------------------------------------

async def test_introspection_of_active_and_revoked_tokens(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret = secret_client(_runtime(auth_app))
    token = await _client_token(auth_client, client.client_id, secret, "system/Patient.rs")
    answer = await auth_client.post(INTROSPECT, data={"token": token}, auth=(client.client_id, secret))
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["active"] is True and body["scope"] == "system/Patient.rs" and body["client_id"] == client.client_id
    assert body["exp"] > time.time()
    await auth_client.post(REVOKE, data={"token": token}, auth=(client.client_id, secret))
    after = await auth_client.post(INTROSPECT, data={"token": token}, auth=(client.client_id, secret))
    assert after.json() == {"active": False}
    garbage = await auth_client.post(INTROSPECT, data={"token": "garbage"}, auth=(client.client_id, secret))
    assert garbage.json() == {"active": False}


async def test_introspection_shows_the_patient_context(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    runtime = _runtime(auth_app)
    resource_server, secret = runtime.clients.create(name="resource server", organization=HOSPITAL,
                                                     scopes="yilian/introspect", secret=True)
    token, _ = runtime.tokens.issue_access_token(client_id="someone-else", scope=["patient/*.rs"],
                                                 organization=HOSPITAL, kind="user", user="li", patient="p-7")
    body = (await auth_client.post(INTROSPECT, data={"token": token},
                                   auth=(resource_server.client_id, secret))).json()
    assert body["active"] is True and body["patient"] == "p-7" and body["client_id"] == "someone-else"


async def test_introspection_needs_client_authentication(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret = secret_client(_runtime(auth_app))
    token = await _client_token(auth_client, client.client_id, secret)
    anonymous = await auth_client.post(INTROSPECT, data={"token": token})
    assert anonymous.status_code in (400, 401) and anonymous.json()["error"] == "invalid_client"
    stranger, stranger_secret = secret_client(_runtime(auth_app))
    other = await auth_client.post(INTROSPECT, data={"token": token}, auth=(stranger.client_id, stranger_secret))
    assert other.json() == {"active": False}  # not its token, and no yilian/introspect scope


# -- signing keys ----------------------------------------------------------------------------

async def test_key_rotation_keeps_the_previous_key_published(auth_app: FastAPI,
                                                             auth_client: httpx.AsyncClient) -> None:
    runtime = _runtime(auth_app)
    before, _ = runtime.tokens.issue_access_token(client_id="t-rot", scope=["system/*.rs"], organization=HOSPITAL,
                                                  kind="backend")
    old_kid = jwt.decode(before, runtime.keys.signer()).header["kid"]
    new_kid = runtime.keys.rotate()
    assert new_kid != old_kid
    after, _ = runtime.tokens.issue_access_token(client_id="t-rot", scope=["system/*.rs"], organization=HOSPITAL,
                                                 kind="backend")
    assert jwt.decode(after, runtime.keys.signer()).header["kid"] == new_kid
    kids = {k["kid"] for k in (await auth_client.get("http://testserver/oauth/jwks")).json()["keys"]}
    assert {old_kid, new_kid} <= kids
    for token in (before, after):
        assert (await auth_client.get("/Organization", headers=bearer(token))).status_code == 200


def test_keys_are_made_on_first_use_rotated_when_old_and_retired(tmp_path: Path) -> None:
    """On a database of its own: retiring keys would disturb the other tests' tokens."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    upgrade(url)
    engine = create_engine(url)
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    keys = KeyStore(engine, rotation=timedelta(days=30), clock=lambda: now[0], cache_seconds=0)
    first = keys.signer().kid
    assert keys.signer().kid == first and [k["kid"] for k in keys.jwks()["keys"]] == [first]
    now[0] += timedelta(days=31)  # due for rotation: the next signer makes a new key
    second = keys.signer().kid
    assert second != first and {k["kid"] for k in keys.jwks()["keys"]} == {first, second}
    now[0] += timedelta(days=31)  # the first key has had its second period: unpublished
    third = keys.signer().kid
    assert {k["kid"] for k in keys.jwks()["keys"]} == {second, third}
    fourth = keys.rotate(retire_previous=True)
    assert [k["kid"] for k in keys.jwks()["keys"]] == [fourth] and keys.public_key(third) is None
    engine.dispose()
