"""The grants we allow, as subclasses of authlib's, and the PKCE rule.

* :class:`S256CodeChallenge`: PKCE with S256 for every client, confidential ones included
  (authlib by default accepts ``plain`` and only insists for public clients).
* :class:`AuthorizationCodeGrant`: the SMART launch: ``aud`` must be our FHIR base URL, the
  code is single use (consumed atomically when looked up), lives ``authorization_code_seconds``,
  and carries the patient picked on the consent page into the token response.
* :class:`RefreshTokenGrant`: bound to the client it was issued to; a requested scope may only
  narrow the original; refresh tokens rotate (the old one is revoked).
* :class:`ClientCredentialsGrant`: SMART Backend Services (private_key_jwt) and simple HIS
  clients (client_secret_basic); ``system/`` scopes only, tokens live ≤ 5 minutes.

Access tokens are made by :class:`~service.security.oauth.tokens.TokenService` directly in
``create_token_response`` (they need the user, organization and patient, which authlib's
generic token generator does not pass along).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import (
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
)
from authlib.oauth2.rfc6749.models import AuthorizationCodeMixin, TokenMixin
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7636.challenge import compare_s256_code_challenge

from service.fhir.db import is_postgres, write_transaction
from service.security.clients import Client
from service.security.scopes import LAUNCH_PATIENT, grantable, narrows
from service.security.tables import AuthorizationCode
from service.security.users import sha256_hex

if TYPE_CHECKING:
    from service.security.oauth.runtime import SecurityRuntime

log = logging.getLogger("yilian.security")
CODES = AuthorizationCode.__table__
TOKEN_AUTH_METHODS = ["client_secret_basic", "private_key_jwt", "none"]
REFRESH_SCOPES = ("offline_access", "online_access")


def runtime_of(grant: grants.BaseGrant) -> SecurityRuntime:
    return grant.server.runtime  # type: ignore[no-any-return]


class S256CodeChallenge(CodeChallenge):
    """PKCE, S256 only, required from every client at both endpoints."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    CODE_CHALLENGE_METHODS = {"S256": compare_s256_code_challenge}

    def validate_code_challenge(self, grant, redirect_uri) -> None:  # type: ignore[no-untyped-def]
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge and code_challenge_method=S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256 (plain is not accepted)")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant, result) -> None:  # type: ignore[no-untyped-def]
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("Missing 'code_verifier' (PKCE is required)")
        super().validate_code_verifier(grant, result)


@dataclass(frozen=True)
class CodeRecord(AuthorizationCodeMixin):
    client_id: str
    username: str
    redirect_uri: str
    scope: str
    code_challenge: str
    code_challenge_method: str
    patient: str | None

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass(frozen=True)
class RefreshTokenView(TokenMixin):
    """A refresh token as authlib's grants and endpoints see it."""

    token_hash: str
    client_id: str
    username: str
    scope: str
    patient: str | None
    expires_at: datetime
    revoked: bool

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.get_client_id()

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int((self.expires_at - datetime.now(UTC)).total_seconds()))

    def is_expired(self) -> bool:
        return self.expires_at <= datetime.now(UTC)

    def is_revoked(self) -> bool:
        return self.revoked


def _user_token_response(grant: grants.BaseGrant, client: Client, username: str, scope: list[str],
                         patient: str | None, *, refresh_scope: str | None) -> dict[str, Any]:
    """Access token (and refresh token when asked for) for a desk user."""
    runtime = runtime_of(grant)
    user = runtime.users.get(username)
    if user is None or user.disabled:
        raise InvalidGrantError("the user of this grant no longer exists or is disabled")
    if patient is None:
        scope = [s for s in scope if not s.startswith("patient/") and s != LAUNCH_PATIENT]
    if not [s for s in scope if "/" in s and s.split("/", 1)[0] in ("user", "patient")]:
        raise InvalidScopeError("no resource scope could be granted")
    token, expires_in = runtime.tokens.issue_access_token(
        client_id=client.client_id, scope=scope, organization=user.organization, kind="user", user=user.username,
        practitioner=user.practitioner_role, patient=patient)
    body: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": expires_in,
                            "scope": " ".join(scope)}
    if patient is not None:
        body["patient"] = patient
    if refresh_scope is not None:
        body["refresh_token"] = runtime.tokens.issue_refresh_token(
            client_id=client.client_id, username=user.username, scope=refresh_scope, patient=patient)
    return body


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def validate_authorization_request(self) -> str:
        redirect_uri = super().validate_authorization_request()
        state = self.request.payload.state
        aud = (self.request.payload.data.get("aud") or "").rstrip("/")
        if aud != runtime_of(self).urls.fhir_base:
            raise InvalidRequestError(f"aud must be this server's FHIR base URL {runtime_of(self).urls.fhir_base}",
                                      redirect_uri=redirect_uri, state=state)
        if not self.request.scope:
            raise InvalidScopeError("none of the requested scopes can be granted to this client",
                                    redirect_uri=redirect_uri, state=state)
        return redirect_uri

    def save_authorization_code(self, code: str, request) -> None:  # type: ignore[no-untyped-def]
        runtime = runtime_of(self)
        data = request.payload.data
        with write_transaction(runtime.engine) as conn:
            conn.execute(CODES.delete().where(CODES.c.expires_at < runtime.clock()))
            conn.execute(CODES.insert(), {
                "code_hash": sha256_hex(code), "client_id": request.client.client_id,
                "username": request.user.username, "redirect_uri": request.payload.redirect_uri or "",
                "scope": request.scope, "code_challenge": data["code_challenge"],
                "code_challenge_method": data.get("code_challenge_method", "S256"),
                "patient": getattr(request, "launch_patient", None),
                "expires_at": runtime.clock() + timedelta(seconds=runtime.settings.authorization_code_seconds)})

    def query_authorization_code(self, code: str, client: Client) -> CodeRecord | None:
        """Look the code up and consume it in one statement: a code works once, even when two
        token requests race."""
        runtime = runtime_of(self)
        where = (CODES.c.code_hash == sha256_hex(code), CODES.c.client_id == client.client_id)
        with write_transaction(runtime.engine) as conn:
            if is_postgres(conn):
                row = conn.execute(CODES.delete().where(*where).returning(*CODES.c)).first()
            else:  # SQLite write transactions are serial (BEGIN IMMEDIATE)
                row = conn.execute(sa.select(CODES).where(*where)).first()
                if row is not None:
                    conn.execute(CODES.delete().where(*where))
        if row is None or _utc(row.expires_at) <= runtime.clock():
            return None
        return CodeRecord(row.client_id, row.username, row.redirect_uri, row.scope, row.code_challenge,
                          row.code_challenge_method, row.patient)

    def delete_authorization_code(self, authorization_code: CodeRecord) -> None:
        return None  # consumed by query_authorization_code

    def authenticate_user(self, authorization_code: CodeRecord):  # type: ignore[no-untyped-def]
        return runtime_of(self).users.get(authorization_code.username)

    def create_token_response(self):  # type: ignore[no-untyped-def]
        client: Client = self.request.client
        code: CodeRecord = self.request.authorization_code
        scope = code.scope.split()
        wants_refresh = client.check_grant_type("refresh_token") and any(s in scope for s in REFRESH_SCOPES)
        body = _user_token_response(self, client, code.username, scope, code.patient,
                                    refresh_scope=code.scope if wants_refresh else None)
        return 200, body, self.TOKEN_RESPONSE_HEADER


class RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshTokenView | None:
        tokens = runtime_of(self).tokens
        record = tokens.find_refresh_token(refresh_token)
        if record is None or not tokens.refresh_is_live(record):
            return None
        return RefreshTokenView(record.token_hash, record.client_id, record.username, record.scope, record.patient,
                                record.expires_at, record.revoked)

    def _validate_token_scope(self, token: RefreshTokenView) -> None:
        requested = self.request.payload.scope
        if requested and not narrows(requested, token.get_scope()):
            raise InvalidScopeError("a refresh may narrow the original scope, never widen it")

    def authenticate_user(self, refresh_token: RefreshTokenView):  # type: ignore[no-untyped-def]
        return runtime_of(self).users.get(refresh_token.username)

    def revoke_old_credential(self, refresh_token: RefreshTokenView) -> None:
        return None  # done in create_token_response, before the new token is made

    def create_token_response(self):  # type: ignore[no-untyped-def]
        client: Client = self.request.client
        old: RefreshTokenView = self.request.refresh_token
        if not runtime_of(self).tokens.revoke_refresh_token(old.token_hash):
            raise InvalidGrantError("this refresh token has already been used")
        # The client's registration may have shrunk since the original grant.
        scope = grantable(self.request.payload.scope or old.scope, client.scopes, kind="user")
        body = _user_token_response(self, client, old.username, scope, old.patient, refresh_scope=old.scope)
        return 200, body, self.TOKEN_RESPONSE_HEADER


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt", "client_secret_basic"]

    def create_token_response(self):  # type: ignore[no-untyped-def]
        client: Client = self.request.client
        scope = grantable(self.request.payload.scope, client.scopes, kind="backend")
        if not scope:
            raise InvalidScopeError("none of the requested scopes is registered for this client")
        token, expires_in = runtime_of(self).tokens.issue_access_token(
            client_id=client.client_id, scope=scope, organization=client.organization, kind="backend")
        body = {"access_token": token, "token_type": "Bearer", "expires_in": expires_in, "scope": " ".join(scope)}
        return 200, body, self.TOKEN_RESPONSE_HEADER


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
