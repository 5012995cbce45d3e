"""Issue #4 point 4: every login leaves a trace — the desk's login form and every token grant
(how HIS systems and apps log in), successful or not, become AuditEvents
(type DCM 110114 User Authentication, subtype 110122 Login)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from fastapi import FastAPI

from service.fhir.access import AccessContext
from service.security.audit import CLIENT_SID, USER_SID, drain
from tests.test_security_authorization_code import _app_client, _login_and_approve, _params, _runtime
from tests.test_security_support import DeskUser, desk_user, pkce, secret_client

SYSTEM = AccessContext.internal("test")
TOKEN = "http://testserver/oauth/token"


def logins_of(app: FastAPI, system: str, value: str) -> list[dict[str, Any]]:
    """Login AuditEvents whose requestor is ``system|value``, oldest first."""
    drain(app.state.store)
    bundle = orjson.loads(app.state.store.search(SYSTEM, "AuditEvent", [("type", "110114"), ("_count", "1000")],
                                                 base_url=""))
    events = sorted((e["resource"] for e in bundle.get("entry", [])), key=lambda e: e["recorded"])
    return [e for e in events if any(a["who"].get("identifier") == {"system": system, "value": value}
                                     for a in e["agent"] if a.get("requestor"))]


async def test_desk_logins_are_audited_whether_they_succeed_or_not(auth_app: FastAPI) -> None:
    client, _ = _app_client(auth_app)
    user = desk_user(_runtime(auth_app))
    wrong = DeskUser(user.username, "not-the-password-at-all", user.organization)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=auth_app), base_url="http://testserver") as http:
        refused = await _login_and_approve(http, _params(client, pkce()[1]), wrong)
        assert refused.status_code == 401
        accepted = await _login_and_approve(http, _params(client, pkce()[1]), user)
        assert accepted.status_code == 302

    events = logins_of(auth_app, USER_SID, user.username)
    assert [e["outcome"] for e in events] == ["4", "0"]
    for event in events:
        assert event["subtype"][0]["code"] == "110122" and event["action"] == "E"
        requestor = event["agent"][0]
        assert requestor["altId"] == client.client_id, "the app the user logged in through"
        assert requestor["network"]["address"], "where the attempt came from"
    assert "not-the-password" not in orjson.dumps(events).decode(), "a password never reaches the trail"


async def test_token_grants_are_audited_with_the_client_they_claimed(auth_app: FastAPI,
                                                                    auth_client: httpx.AsyncClient) -> None:
    client, secret = secret_client(_runtime(auth_app))
    form = {"grant_type": "client_credentials", "scope": "system/Observation.rs"}
    granted = await auth_client.post(TOKEN, data=form, auth=(client.client_id, secret))
    assert granted.status_code == 200
    wrong = await auth_client.post(TOKEN, data=form, auth=(client.client_id, secret + "x"))
    assert wrong.status_code == 401

    events = logins_of(auth_app, CLIENT_SID, client.client_id)
    assert [e["outcome"] for e in events] == ["0", "4"]
    assert "grant_type=client_credentials" in events[0]["outcomeDesc"]
    assert "invalid_client" in events[1]["outcomeDesc"]
    assert secret not in orjson.dumps(events).decode()


async def test_an_unknown_client_is_recorded_under_the_id_it_claimed(auth_app: FastAPI,
                                                                    auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.post(TOKEN, data={"grant_type": "client_credentials"},
                                      auth=("no-such-client-7f3a", "guess"))
    assert response.status_code == 401
    [event] = logins_of(auth_app, CLIENT_SID, "no-such-client-7f3a")
    assert event["outcome"] == "4"
