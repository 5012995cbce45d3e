"""Issue #4 points 1-2: authorization code + PKCE (S256 for every client), the desk staff's
login / consent page, patient launch, refresh tokens (bound to the client, narrowing only)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
from authlib.integrations.httpx_client import AsyncOAuth2Client
from fastapi import FastAPI

from service.fhir.access import AccessContext
from service.security.clients import Client
from service.security.users import UserStore
from tests.conftest import BASE, bearer
from tests.test_security_support import (  # noqa: F401  (live_server is a fixture)
    HOSPITAL,
    DeskUser,
    LiveServer,
    desk_user,
    ensure_organizations,
    form_fields,
    live_server,
    pkce,
)

AUTHORIZE = "http://testserver/oauth/authorize"
TOKEN = "http://testserver/oauth/token"
REDIRECT = "https://app.example.cn/callback"
USER_SCOPES = "user/*.rs patient/*.rs launch/patient offline_access"


def _runtime(app: FastAPI):  # type: ignore[no-untyped-def]
    return app.state.security


def _app_client(app: FastAPI, *, public: bool = False, scopes: str = USER_SCOPES) -> tuple[Client, str | None]:
    return _runtime(app).clients.create(name="desk app" if public else "desk web app", organization=HOSPITAL,
                                        scopes=scopes, secret=not public, public=public, redirect_uris=[REDIRECT])


def _params(client: Client, challenge: str | None, *, scope: str = "user/*.rs offline_access",
            method: str | None = "S256", aud: str | None = BASE, **extra: str) -> dict[str, str]:
    params = {"response_type": "code", "client_id": client.client_id, "redirect_uri": REDIRECT, "scope": scope,
              "state": secrets.token_urlsafe(8), **extra}
    if aud is not None:
        params["aud"] = aud
    if challenge is not None:
        params["code_challenge"] = challenge
    if method is not None:
        params["code_challenge_method"] = method
    return params


def _redirect_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT)
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def _login_and_approve(http: httpx.AsyncClient, params: dict[str, str], user: DeskUser | None, *,
                             patient: str | None = None, decision: str = "approve") -> httpx.Response:
    page = await http.get(AUTHORIZE, params=params)
    assert page.status_code == 200, page.text
    form = form_fields(page.text)
    form["decision"] = decision
    if user is not None:
        form.update(username=user.username, password=user.password)
    if patient is not None:
        form["patient"] = patient
    return await http.post(AUTHORIZE, data=form)


async def _code(http: httpx.AsyncClient, client: Client, user: DeskUser, challenge: str, **kwargs: str) -> str:
    params = _params(client, challenge, **kwargs)
    response = await _login_and_approve(http, params, user, patient=kwargs.get("patient"))
    answer = _redirect_params(response)
    assert answer["state"] == params["state"]
    return answer["code"]


async def _exchange(http: httpx.AsyncClient, client: Client, secret: str | None, code: str,
                    verifier: str | None) -> httpx.Response:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    if verifier is not None:
        form["code_verifier"] = verifier
    if secret is None:
        form["client_id"] = client.client_id
        return await http.post(TOKEN, data=form)
    return await http.post(TOKEN, data=form, auth=(client.client_id, secret))


# -- the happy path --------------------------------------------------------------------------

async def test_confidential_client_with_pkce_gets_user_tokens(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret = _app_client(auth_app)
    user = desk_user(_runtime(auth_app), practitioner_role="PractitionerRole/desk-1")
    verifier, challenge = pkce()
    code = await _code(auth_client, client, user, challenge)
    response = await _exchange(auth_client, client, secret, code, verifier)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store" and response.headers["pragma"] == "no-cache"
    body = response.json()
    assert body["scope"] == "user/*.rs offline_access" and 0 < body["expires_in"] <= 3600
    assert body["refresh_token"]
    token = _runtime(auth_app).tokens.verify(body["access_token"])
    ctx = token.context()
    assert (ctx.user, ctx.organization, ctx.practitioner) == (user.username, HOSPITAL, "PractitionerRole/desk-1")
    assert (await auth_client.get("/Organization?_count=1", headers=bearer(body["access_token"]))).status_code == 200


async def test_public_client_with_pkce(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app, public=True)
    user = desk_user(_runtime(auth_app))
    verifier, challenge = pkce()
    code = await _code(auth_client, client, user, challenge, scope="user/Patient.rs")
    response = await _exchange(auth_client, client, None, code, verifier)
    assert response.status_code == 200, response.text
    assert "refresh_token" not in response.json()  # no offline_access asked for


async def test_authorization_request_by_post(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    verifier, challenge = pkce()
    page = await auth_client.post(AUTHORIZE, data=_params(client, challenge))
    assert page.status_code == 200 and 'name="password"' in page.text
    form = {**form_fields(page.text), "decision": "approve", "username": user.username, "password": user.password}
    answer = _redirect_params(await auth_client.post(AUTHORIZE, data=form))
    assert (await _exchange(auth_client, client, secret, answer["code"], verifier)).status_code == 200


async def test_consent_page_security_headers(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app)
    page = await auth_client.get(AUTHORIZE, params=_params(client, pkce()[1]))
    assert page.status_code == 200
    headers = page.headers
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "form-action 'self' https://app.example.cn" in csp
    assert "<script" not in page.text
    assert 'name="password"' in page.text and "desk web app" in page.text


# -- PKCE: S256, required from everyone ------------------------------------------------------

async def test_pkce_plain_is_refused(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app)
    verifier = secrets.token_urlsafe(48)
    answer = _redirect_params(await auth_client.get(AUTHORIZE, params=_params(client, verifier, method="plain")))
    assert answer["error"] == "invalid_request" and "S256" in answer["error_description"]


async def test_missing_pkce_is_refused_for_confidential_clients_too(auth_app: FastAPI,
                                                                     auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app)  # confidential: has a secret
    answer = _redirect_params(await auth_client.get(AUTHORIZE, params=_params(client, None, method=None)))
    assert answer["error"] == "invalid_request" and "PKCE" in answer["error_description"]
    no_method = _redirect_params(await auth_client.get(AUTHORIZE, params=_params(client, pkce()[1], method=None)))
    assert no_method["error"] == "invalid_request"


async def test_code_verifier_is_required_and_checked(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    _, challenge = pkce()
    missing = await _exchange(auth_client, client, secret, await _code(auth_client, client, user, challenge), None)
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    wrong = await _exchange(auth_client, client, secret, await _code(auth_client, client, user, challenge),
                            pkce()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"


async def test_a_code_works_once(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    verifier, challenge = pkce()
    code = await _code(auth_client, client, user, challenge)
    assert (await _exchange(auth_client, client, secret, code, verifier)).status_code == 200
    again = await _exchange(auth_client, client, secret, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


async def test_code_is_bound_to_its_client(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app)
    other, other_secret = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    verifier, challenge = pkce()
    code = await _code(auth_client, client, user, challenge)
    stolen = await _exchange(auth_client, other, other_secret, code, verifier)
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"


# -- the authorization request ---------------------------------------------------------------

async def test_aud_must_be_our_fhir_base(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app)
    for aud in ("https://other.example/fhir", None):
        answer = _redirect_params(await auth_client.get(AUTHORIZE, params=_params(client, pkce()[1], aud=aud)))
        assert answer["error"] == "invalid_request" and "aud" in answer["error_description"]


async def test_unknown_client_or_redirect_gets_a_page_not_a_redirect(auth_app: FastAPI,
                                                                      auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app)
    params = _params(client, pkce()[1])
    evil = await auth_client.get(AUTHORIZE, params={**params, "redirect_uri": "https://evil.example/cb"})
    assert evil.status_code == 400 and "location" not in evil.headers
    assert evil.headers["x-frame-options"] == "DENY"
    unknown = await auth_client.get(AUTHORIZE, params={**params, "client_id": "nobody"})
    assert unknown.status_code == 400 and "location" not in unknown.headers


async def test_deny_redirects_with_access_denied(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    response = await _login_and_approve(auth_client, _params(client, pkce()[1]), user, decision="deny")
    assert _redirect_params(response)["error"] == "access_denied"


async def test_form_without_csrf_token_is_refused(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, _ = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    page = await auth_client.get(AUTHORIZE, params=_params(client, pkce()[1]))
    form = {**form_fields(page.text), "decision": "approve", "username": user.username, "password": user.password}
    form["csrf_token"] = "forged-" + secrets.token_urlsafe(20)
    response = await auth_client.post(AUTHORIZE, data=form)
    assert response.status_code == 400 and "location" not in response.headers


# -- desk users: login, lockout, session ----------------------------------------------------

async def test_wrong_password_and_lockout(auth_app: FastAPI, engine) -> None:  # type: ignore[no-untyped-def]
    runtime = _runtime(auth_app)
    client, _ = _app_client(auth_app)
    user = desk_user(runtime)
    wrong = DeskUser(user.username, "not-the-password-at-all", user.organization)
    transport = httpx.ASGITransport(app=auth_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        for _ in range(runtime.settings.login_max_failures):
            response = await _login_and_approve(http, _params(client, pkce()[1]), wrong)
            assert response.status_code == 401 and "location" not in response.headers
            assert "wrong" in response.text
        locked = await _login_and_approve(http, _params(client, pkce()[1]), user)
        assert locked.status_code == 401, "the right password is refused while the account is locked"
        assert runtime.users.get(user.username).locked_until is not None
        runtime.users.unlock(user.username)
        assert (await _login_and_approve(http, _params(client, pkce()[1]), user)).status_code == 302


async def test_a_session_spares_the_second_login(auth_app: FastAPI) -> None:
    client, _ = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=auth_app), base_url="http://testserver") as http:
        assert (await _login_and_approve(http, _params(client, pkce()[1]), user)).status_code == 302
        page = await http.get(AUTHORIZE, params=_params(client, pkce()[1]))
        assert user.username in page.text and 'name="password"' not in page.text
        assert (await _login_and_approve(http, _params(client, pkce()[1]), None)).status_code == 302
        await http.post("http://testserver/oauth/logout")
        page = await http.get(AUTHORIZE, params=_params(client, pkce()[1]))
        assert 'name="password"' in page.text


def test_sessions_time_out(engine) -> None:  # type: ignore[no-untyped-def]
    now = [datetime(2026, 3, 1, 9, 0, tzinfo=UTC)]
    users = UserStore(engine, clock=lambda: now[0], session_idle=timedelta(minutes=15),
                      session_max=timedelta(hours=8))
    name = f"sess-{secrets.token_hex(4)}"
    users.create(name, secrets.token_urlsafe(16), organization=HOSPITAL)
    session = users.start_session(name)
    now[0] += timedelta(minutes=10)
    assert users.session_user(session) is not None  # touched: idle time starts again
    now[0] += timedelta(minutes=16)
    assert users.session_user(session) is None  # idle too long
    session = users.start_session(name)
    for _ in range(40):  # in use all day, never idle for long
        now[0] += timedelta(minutes=14)
        if users.session_user(session) is None:
            break
    assert now[0] - datetime(2026, 3, 1, 9, 26, tzinfo=UTC) <= timedelta(hours=8, minutes=14)
    assert users.session_user(session) is None  # absolute limit


# -- patient launch ----------------------------------------------------------------------------

async def test_standalone_patient_launch(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    ensure_organizations(auth_app)
    store = auth_app.state.store
    patient = store.create(AccessContext.internal(), {
        "resourceType": "Patient", "gender": "female",
        "managingOrganization": {"reference": HOSPITAL}}).resource.id  # the user's organization's resident
    client, secret = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    verifier, challenge = pkce()
    params = _params(client, challenge, scope="launch/patient patient/*.rs")
    page = await auth_client.get(AUTHORIZE, params=params)
    assert 'name="patient"' in page.text
    unknown = await _login_and_approve(auth_client, params, user, patient="no-such-patient")
    assert unknown.status_code == 400 and "no-such-patient" in unknown.text
    answer = _redirect_params(await _login_and_approve(auth_client, params, None, patient=patient))
    response = await _exchange(auth_client, client, secret, answer["code"], verifier)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["patient"] == patient and "patient/*.rs" in body["scope"].split()
    assert _runtime(auth_app).tokens.verify(body["access_token"]).context().patient == f"Patient/{patient}"
    read = await auth_client.get(f"/Patient/{patient}", headers=bearer(body["access_token"]))
    assert read.status_code == 200


# -- refresh tokens ----------------------------------------------------------------------------

async def _refreshable(app: FastAPI, http: httpx.AsyncClient) -> tuple[Client, str, str]:
    client, secret = _app_client(app)
    assert secret is not None
    user = desk_user(_runtime(app))
    verifier, challenge = pkce()
    code = await _code(http, client, user, challenge, scope="user/Patient.rs user/Observation.rs offline_access")
    body = (await _exchange(http, client, secret, code, verifier)).json()
    return client, secret, body["refresh_token"]


async def test_refresh_may_narrow_the_scope(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret, refresh = await _refreshable(auth_app, auth_client)
    response = await auth_client.post(TOKEN, data={"grant_type": "refresh_token", "refresh_token": refresh,
                                                   "scope": "user/Patient.r"}, auth=(client.client_id, secret))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "user/Patient.r" and body["refresh_token"] != refresh
    # the rotated refresh token keeps the original scope
    again = await auth_client.post(TOKEN, data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
                                   auth=(client.client_id, secret))
    assert again.status_code == 200 and set(again.json()["scope"].split()) == {
        "user/Patient.rs", "user/Observation.rs", "offline_access"}


async def test_refresh_cannot_widen_the_scope(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret, refresh = await _refreshable(auth_app, auth_client)
    for wider in ("user/Patient.cruds", "user/*.rs", "user/Encounter.rs", "patient/Patient.rs"):
        response = await auth_client.post(TOKEN, data={"grant_type": "refresh_token", "refresh_token": refresh,
                                                       "scope": wider}, auth=(client.client_id, secret))
        assert response.status_code == 400 and response.json()["error"] == "invalid_scope", wider


async def test_refresh_with_another_client_is_refused(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    _, _, refresh = await _refreshable(auth_app, auth_client)
    other, other_secret = _app_client(auth_app)
    response = await auth_client.post(TOKEN, data={"grant_type": "refresh_token", "refresh_token": refresh},
                                      auth=(other.client_id, other_secret))
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


async def test_a_refresh_token_is_used_once(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    client, secret, refresh = await _refreshable(auth_app, auth_client)
    form = {"grant_type": "refresh_token", "refresh_token": refresh}
    assert (await auth_client.post(TOKEN, data=form, auth=(client.client_id, secret))).status_code == 200
    reused = await auth_client.post(TOKEN, data=form, auth=(client.client_id, secret))
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"


# -- authlib's own client, over real HTTP ------------------------------------------------------

async def test_authlib_client_completes_authorization_code_with_pkce(live_server: LiveServer) -> None:  # noqa: F811
    runtime = live_server.runtime
    client, secret = runtime.clients.create(name="third-party app", organization=HOSPITAL,
                                            scopes="user/*.rs offline_access", secret=True,
                                            redirect_uris=[REDIRECT])
    user = desk_user(runtime)
    async with httpx.AsyncClient() as http:
        config = (await http.get(live_server.fhir + "/.well-known/smart-configuration")).json()
    verifier = secrets.token_urlsafe(48)
    async with AsyncOAuth2Client(client_id=client.client_id, client_secret=secret, redirect_uri=REDIRECT,
                                 scope="user/Organization.rs offline_access", code_challenge_method="S256") as oauth:
        url, state = oauth.create_authorization_url(config["authorization_endpoint"], code_verifier=verifier,
                                                    aud=live_server.fhir)
        # the user's browser: the login / consent form
        async with httpx.AsyncClient() as browser:
            page = await browser.get(url)
            assert page.status_code == 200, page.text
            form = {**form_fields(page.text), "username": user.username, "password": user.password,
                    "decision": "approve"}
            redirect = await browser.post(config["authorization_endpoint"], data=form)
        assert redirect.status_code == 302
        token = await oauth.fetch_token(config["token_endpoint"], authorization_response=redirect.headers["location"],
                                        code_verifier=verifier, state=state)
        assert token["scope"] == "user/Organization.rs offline_access" and token["refresh_token"]
        assert (await oauth.get(live_server.fhir + "/Organization?_count=1")).status_code == 200
        refreshed = await oauth.refresh_token(config["token_endpoint"], refresh_token=token["refresh_token"])
        assert refreshed["access_token"] != token["access_token"]
