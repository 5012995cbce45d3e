"""Helpers and fixtures shared by the tests/test_security_*.py modules (no tests here).

Keys are generated here, in the tests, with joserfc; client assertions are signed with them
exactly as a SMART Backend Services client would. ``live_server`` runs the app (auth on)
under uvicorn on a loopback port, for authlib's own client to talk to over real HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from typing import Any
from uuid import uuid4

import pytest
import uvicorn
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import ECKey, Key, RSAKey
from sqlalchemy.engine import Engine

from service.app import create_app
from service.config import Settings
from service.security.clients import Client
from service.security.oauth.config import SecuritySettings
from service.security.oauth.runtime import SecurityRuntime

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_URL = "http://testserver/oauth/token"
BASE = "http://testserver/fhir"
HOSPITAL = "Organization/hospital-yq1"
CLINIC = "Organization/clinic-yq-shangzhan"


def rsa_key(kid: str | None = None) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid or uuid4().hex[:8]}, private=True)


def ec_key(kid: str | None = None) -> ECKey:
    return ECKey.generate_key("P-384", parameters={"kid": kid or uuid4().hex[:8]}, private=True)


def public_jwks(*keys: Key) -> dict[str, Any]:
    return {"keys": [k.as_dict(private=False) for k in keys]}


def assertion(key: Key, client_id: str, *, alg: str | None = None, aud: str = TOKEN_URL, kid: str | None = None,
              exp_in: int = 240, now: int | None = None, jti: str | None = None, iss: str | None = None,
              sub: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """A client assertion (RFC 7523) as SMART Backend Services defines it."""
    moment = int(time.time()) if now is None else now
    alg = alg or ("ES384" if isinstance(key, ECKey) else "RS384")
    claims = {"iss": iss or client_id, "sub": sub or client_id, "aud": aud, "exp": moment + exp_in,
              "jti": jti or secrets.token_urlsafe(16), **(extra or {})}
    return jwt.encode({"alg": alg, "kid": kid if kid is not None else key.kid, "typ": "JWT"}, claims, key,
                      algorithms=[alg])


def backend_form(token: str, scope: str = "system/Patient.rs") -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": token}


def pkce() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def backend_client(runtime: SecurityRuntime, *keys: Key, scopes: str = "system/*.cruds",
                   organization: str = HOSPITAL) -> Client:
    client, _ = runtime.clients.create(name=f"backend {uuid4().hex[:6]}", organization=organization, scopes=scopes,
                                       jwks=public_jwks(*keys))
    return client


def secret_client(runtime: SecurityRuntime, *, scopes: str = "system/*.cruds",
                  organization: str = HOSPITAL) -> tuple[Client, str]:
    client, secret = runtime.clients.create(name=f"his {uuid4().hex[:6]}", organization=organization,
                                            scopes=scopes, secret=True)
    assert secret is not None
    return client, secret


@dataclass(frozen=True)
class DeskUser:
    username: str
    password: str
    organization: str


def desk_user(runtime: SecurityRuntime, *, organization: str = HOSPITAL,
              practitioner_role: str | None = None) -> DeskUser:
    username = f"desk-{uuid4().hex[:8]}"
    password = secrets.token_urlsafe(16)
    runtime.users.create(username, password, organization=organization, practitioner_role=practitioner_role)
    return DeskUser(username, password, organization)


def form_fields(html: str) -> dict[str, str]:
    """The hidden inputs of the consent page (what a browser would post back)."""
    return {unescape(name): unescape(value)
            for name, value in re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', html)}


def ensure_organizations(app: FastAPI) -> None:
    """The organizations our test tokens act for must exist: the boundary policy places
    resources by following references to real Organizations. Left as they are when the
    demo alliance is loaded already."""
    from service.fhir.access import AccessContext
    from service.fhir.errors import FhirError

    store, ctx = app.state.store, AccessContext.internal("security-tests")
    for reference, name in ((HOSPITAL, "阳泉市第一人民医院"), (CLINIC, "上站街道社区卫生服务中心")):
        org_id = reference.split("/", 1)[1]
        try:
            store.read(ctx, "Organization", org_id)
        except FhirError:
            store.update(ctx, "Organization", org_id, {"resourceType": "Organization", "id": org_id, "name": name,
                                                       "active": True})


# -- a real server on a loopback port --------------------------------------------------------

@dataclass(frozen=True)
class LiveServer:
    root: str  # http://127.0.0.1:<port>
    app: FastAPI

    @property
    def fhir(self) -> str:
        return self.root + "/fhir"

    @property
    def runtime(self) -> SecurityRuntime:
        return self.app.state.security  # type: ignore[no-any-return]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def live_server(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    """The app with authorization on, served by uvicorn on 127.0.0.1 (loopback: OAuth over
    plain http is allowed there, as authlib allows it)."""
    port = _free_port()
    root = f"http://127.0.0.1:{port}"
    app = create_app(Settings(database_url=database_url, base_url=root + "/fhir", auth="on"), engine=engine,
                     security=SecuritySettings(rate_limit_per_minute=1_000_000, rate_limit_burst=1_000_000))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="yilian-live-server", daemon=True)
    thread.start()
    for _ in range(400):  # bounded wait for startup (not a timing assertion)
        if server.started:
            break
        time.sleep(0.025)
    if not server.started:
        pytest.fail("uvicorn did not start on a loopback port")
    yield LiveServer(root, app)
    server.should_exit = True
    thread.join(timeout=10)
