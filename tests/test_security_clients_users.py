"""Issue #4 points 2 and 5: clients and desk users from the command line and the admin API;
password hashing; demo clients and ``yilian demo-token``."""

from __future__ import annotations

import io
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.cli import main
from service.config import get_settings
from service.security.clients import ClientError
from service.security.demo_clients import seed_demo_clients
from service.security.users import (
    LoginFailed,
    UserError,
    hash_password,
    verify_password,
)
from tests.conftest import bearer
from tests.test_security_support import (
    HOSPITAL,
    assertion,
    backend_form,
    public_jwks,
    rsa_key,
    secret_client,
)

TOKEN = "http://testserver/oauth/token"
ADMIN = "http://testserver/admin"


@pytest.fixture
def cli_database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The ``yilian`` command works on YILIAN_DATABASE_URL: point it at the test database."""
    monkeypatch.setenv("YILIAN_DATABASE_URL", database_url)
    monkeypatch.setenv("YILIAN_BASE_URL", "http://testserver/fhir")
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def _value(output: str, label: str) -> str:
    match = re.search(rf"^{label}: (\S+)", output, flags=re.MULTILINE)
    assert match, output
    return match.group(1)


# -- passwords ---------------------------------------------------------------------------------

def test_passwords_are_scrypt_hashed() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt$") and "correct" not in stored
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batterx", stored)
    assert hash_password("correct horse battery") != stored  # salted
    assert not verify_password("x", "md5$abc")


def test_users_need_a_long_password_and_a_proper_organization(auth_app: FastAPI) -> None:
    users = auth_app.state.security.users
    with pytest.raises(UserError, match="12"):
        users.create(f"u{secrets.token_hex(3)}", "short", organization=HOSPITAL)
    with pytest.raises(UserError, match="Organization"):
        users.create(f"u{secrets.token_hex(3)}", secrets.token_urlsafe(16), organization="hospital-yq1")
    name = f"u{secrets.token_hex(3)}"
    users.create(name, "a long enough password", organization=HOSPITAL)
    assert users.authenticate(name, "a long enough password").organization == HOSPITAL
    with pytest.raises(LoginFailed):
        users.authenticate(name, "a wrong password!!")
    with pytest.raises(LoginFailed):
        users.authenticate("nobody-" + name, "a long enough password")


# -- the command line --------------------------------------------------------------------------

async def test_clients_add_with_a_secret(cli_database: str, capsys: pytest.CaptureFixture[str],
                                         auth_client: httpx.AsyncClient) -> None:
    code, out = _run(capsys, "clients", "add", "--name", "第一人民医院 HIS", "--org", HOSPITAL,
                     "--scopes", "system/Patient.rs", "--secret")
    assert code == 0, out
    client_id, secret = _value(out, "client_id"), _value(out, "client_secret")
    response = await auth_client.post(TOKEN, data={"grant_type": "client_credentials"}, auth=(client_id, secret))
    assert response.status_code == 200 and response.json()["scope"] == "system/Patient.rs"
    code, out = _run(capsys, "clients", "list")
    assert client_id in out and secret not in out
    assert _run(capsys, "clients", "disable", client_id)[0] == 0
    response = await auth_client.post(TOKEN, data={"grant_type": "client_credentials"}, auth=(client_id, secret))
    assert response.status_code == 401


async def test_clients_add_with_a_jwks_file(cli_database: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            auth_client: httpx.AsyncClient) -> None:
    key = rsa_key()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(key)))
    code, out = _run(capsys, "clients", "add", "--name", "clinic system", "--org", "Organization/clinic-yq-hedi",
                     "--scopes", "system/*.rs", "--jwks", str(jwks))
    assert code == 0 and "client_secret" not in out
    client_id = _value(out, "client_id")
    response = await auth_client.post(TOKEN, data=backend_form(assertion(key, client_id)))
    assert response.status_code == 200, response.text


def test_clients_add_refuses_bad_registrations(cli_database: str, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [rsa_key().as_dict(private=True)]}))
    cases = [
        ["--jwks", str(private)],  # private key material
        ["--secret", "--scopes", "system/Patient.sr"],  # malformed scope
        ["--secret", "--org", "hospital-yq1"],  # not Organization/<id>
        ["--public"],  # a public client needs a redirect URI
        ["--public", "--redirect-uri", "http://app.example.cn/cb"],  # http outside loopback
    ]
    for extra in cases:
        argv = ["clients", "add", "--name", "x", "--org", HOSPITAL, "--scopes", "system/*.rs"]
        code, out = _run(capsys, *(argv + extra))
        assert code == 2 and out.startswith("error:"), (extra, out)


def test_users_add_unlock_disable(cli_database: str, capsys: pytest.CaptureFixture[str], auth_app: FastAPI,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    username = f"desk-{secrets.token_hex(4)}"
    code, out = _run(capsys, "users", "add", "--username", username, "--org", HOSPITAL, "--practitioner-role",
                     "PractitionerRole/pr-desk", "--name", "王小红")
    assert code == 0, out
    password = _value(out, "password")
    users = auth_app.state.security.users
    assert users.authenticate(username, password).practitioner_role == "PractitionerRole/pr-desk"
    chosen = "chosen password 123"
    monkeypatch.setattr("sys.stdin", io.StringIO(chosen + "\n"))
    other = f"desk-{secrets.token_hex(4)}"
    code, out = _run(capsys, "users", "add", "--username", other, "--org", HOSPITAL, "--password-stdin")
    assert code == 0 and chosen not in out
    assert users.authenticate(other, chosen).username == other
    assert username in _run(capsys, "users", "list")[1]
    assert _run(capsys, "users", "unlock", username)[0] == 0
    assert _run(capsys, "users", "disable", username)[0] == 0
    with pytest.raises(LoginFailed):
        users.authenticate(username, password)


def test_keys_rotate(cli_database: str, capsys: pytest.CaptureFixture[str], auth_app: FastAPI) -> None:
    code, out = _run(capsys, "keys", "rotate")
    assert code == 0
    kid = out.strip().rsplit(" ", 1)[-1]
    assert auth_app.state.security.keys.public_key(kid) is not None  # another process's key, found by kid


async def test_demo_clients_and_demo_token(cli_database: str, capsys: pytest.CaptureFixture[str],
                                           auth_client: httpx.AsyncClient) -> None:
    created = seed_demo_clients(get_settings(), quiet=True)
    assert set(created) == {"demo-his-yq1", "demo-clinic-shangzhan"}
    assert seed_demo_clients(get_settings(), quiet=True) == {"demo-his-yq1": None, "demo-clinic-shangzhan": None}
    code, out = _run(capsys, "demo-token", "--client", "demo-his-yq1")
    assert code == 0, out
    token = re.search(r"^export TOKEN=(\S+)$", out, flags=re.MULTILINE).group(1)  # type: ignore[union-attr]
    assert 'curl -s -H "Authorization: Bearer $TOKEN"' in out
    assert (await auth_client.get("/Organization?_count=1", headers=bearer(token))).status_code == 200
    not_demo = _run(capsys, "clients", "add", "--name", "real", "--org", HOSPITAL, "--scopes", "system/*.rs",
                    "--secret")[1]
    code, out = _run(capsys, "demo-token", "--client", _value(not_demo, "client_id"))
    assert code == 2 and "not a demo client" in out


# -- the admin API -----------------------------------------------------------------------------

async def _admin_token(app: FastAPI, http: httpx.AsyncClient) -> dict[str, str]:
    client, secret = secret_client(app.state.security, scopes="yilian/admin")
    response = await http.post(TOKEN, data={"grant_type": "client_credentials", "scope": "yilian/admin"},
                               auth=(client.client_id, secret))
    assert response.status_code == 200, response.text
    return bearer(response.json()["access_token"])


async def test_admin_api_manages_clients(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    admin = await _admin_token(auth_app, auth_client)
    created = await auth_client.post(f"{ADMIN}/clients", headers=admin, json={
        "name": "HIS via API", "organization": HOSPITAL, "scope": "system/Observation.rs",
        "token_endpoint_auth_method": "client_secret_basic"})
    assert created.status_code == 201, created.text
    body = created.json()
    client_id, secret = body["client_id"], body["client_secret"]
    assert (await auth_client.post(TOKEN, data={"grant_type": "client_credentials"},
                                   auth=(client_id, secret))).status_code == 200
    listed = (await auth_client.get(f"{ADMIN}/clients", headers=admin)).json()
    assert any(c["client_id"] == client_id for c in listed) and all("client_secret" not in c for c in listed)
    one = (await auth_client.get(f"{ADMIN}/clients/{client_id}", headers=admin)).json()
    assert "client_secret" not in one and one["organization"] == HOSPITAL
    bad = await auth_client.post(f"{ADMIN}/clients", headers=admin, json={
        "name": "x", "organization": HOSPITAL, "scope": "system/*.rs", "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": [rsa_key().as_dict(private=True)]}})
    assert bad.status_code == 400 and "private" in bad.json()["error_description"]
    assert (await auth_client.delete(f"{ADMIN}/clients/{client_id}", headers=admin)).status_code == 204
    assert (await auth_client.post(TOKEN, data={"grant_type": "client_credentials"},
                                   auth=(client_id, secret))).status_code == 401


async def test_admin_api_manages_users(auth_app: FastAPI, auth_client: httpx.AsyncClient) -> None:
    admin = await _admin_token(auth_app, auth_client)
    username = f"api-{secrets.token_hex(4)}"
    created = await auth_client.post(f"{ADMIN}/users", headers=admin, json={
        "username": username, "organization": HOSPITAL, "display_name": "李医生"})
    assert created.status_code == 201, created.text
    password = created.json()["password"]
    users = auth_app.state.security.users
    assert users.authenticate(username, password).display_name == "李医生"
    assert all("password" not in u for u in (await auth_client.get(f"{ADMIN}/users", headers=admin)).json())
    assert (await auth_client.post(f"{ADMIN}/users/{username}/unlock", headers=admin)).status_code == 204
    assert (await auth_client.delete(f"{ADMIN}/users/{username}", headers=admin)).status_code == 204
    with pytest.raises(LoginFailed):
        users.authenticate(username, password)


async def test_admin_api_needs_the_admin_scope(auth_app: FastAPI, auth_client: httpx.AsyncClient,
                                               token_for) -> None:  # type: ignore[no-untyped-def]
    missing = await auth_client.get(f"{ADMIN}/clients")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    everything_on_fhir = await auth_client.get(f"{ADMIN}/clients", headers=bearer(token_for("system/*.cruds")))
    assert everything_on_fhir.status_code == 403 and everything_on_fhir.json()["error"] == "insufficient_scope"
    # a user token cannot carry it: the scope is for backend clients only
    client, _ = auth_app.state.security.clients.create(
        name="app asking for admin", organization=HOSPITAL, scopes="user/*.rs yilian/admin", secret=True,
        redirect_uris=["https://app.example.cn/cb"])
    assert client.get_allowed_scope("user/*.rs yilian/admin") == "user/*.rs"
    with pytest.raises(ClientError):
        auth_app.state.security.clients.create(name="x", organization=HOSPITAL, scopes="system/*.rs",
                                               public=True, grant_types=["client_credentials"],
                                               redirect_uris=["https://app.example.cn/cb"])
