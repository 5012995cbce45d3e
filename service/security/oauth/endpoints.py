"""Token introspection (RFC 7662) and revocation (RFC 7009) on authlib's endpoints.

Both take our access tokens (JWTs) and refresh tokens (opaque). A client may introspect and
revoke the tokens issued to it; a client registered with ``yilian/introspect`` (a resource
server) or ``yilian/admin`` may introspect anyone's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from authlib.oauth2.rfc6749.models import TokenMixin
from authlib.oauth2.rfc7009 import RevocationEndpoint as _RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint as _IntrospectionEndpoint

from service.security.clients import Client
from service.security.oauth.grants import RefreshTokenView
from service.security.oauth.tokens import AccessToken, InvalidToken
from service.security.scopes import ADMIN_SCOPE, INTROSPECT_SCOPE

if TYPE_CHECKING:
    from service.security.oauth.runtime import SecurityRuntime


@dataclass(frozen=True)
class AccessTokenView(TokenMixin):
    access: AccessToken
    active: bool

    def check_client(self, client: Client) -> bool:
        return self.access.client_id == client.get_client_id()

    def get_scope(self) -> str:
        return self.access.scope

    def get_expires_in(self) -> int:
        return max(0, self.access.expires_at - int(datetime.now(UTC).timestamp()))

    def is_expired(self) -> bool:
        return not self.active

    def is_revoked(self) -> bool:
        return not self.active


def _find_token(runtime: SecurityRuntime, token: str, hint: str | None) -> AccessTokenView | RefreshTokenView | None:
    order = ("refresh_token", "access_token") if hint == "refresh_token" else ("access_token", "refresh_token")
    for kind in order:
        if kind == "access_token":
            try:
                access = runtime.tokens.decode(token)
            except InvalidToken:
                continue
            return AccessTokenView(access, runtime.tokens.is_active(access))
        record = runtime.tokens.find_refresh_token(token)
        if record is not None:
            return RefreshTokenView(record.token_hash, record.client_id, record.username, record.scope,
                                    record.patient, record.expires_at,
                                    not runtime.tokens.refresh_is_live(record))
    return None


class IntrospectionEndpoint(_IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = ["client_secret_basic", "private_key_jwt"]

    @property
    def runtime(self) -> SecurityRuntime:
        return self.server.runtime  # type: ignore[no-any-return]

    def query_token(self, token_string: str, token_type_hint: str | None):  # type: ignore[no-untyped-def]
        return _find_token(self.runtime, token_string, token_type_hint)

    def check_permission(self, token, client: Client, request) -> bool:  # type: ignore[no-untyped-def]
        return token.check_client(client) or bool({INTROSPECT_SCOPE, ADMIN_SCOPE} & set(client.scopes))

    def introspect_token(self, token) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        if isinstance(token, AccessTokenView):
            claims = token.access.claims
            payload = {"active": True, "scope": token.access.scope, "client_id": token.access.client_id,
                       "token_type": "Bearer", "exp": token.access.expires_at, "iat": claims.get("iat"),
                       "sub": claims.get("sub"), "aud": claims.get("aud"), "iss": claims.get("iss"),
                       "jti": token.access.jti}
            if token.access.patient:
                payload["patient"] = token.access.patient
            if token.access.user:
                payload["username"] = token.access.user
            return payload
        payload = {"active": True, "scope": token.scope, "client_id": token.client_id, "token_type": "refresh_token",
                   "exp": int(token.expires_at.timestamp()), "username": token.username}
        if token.patient:
            payload["patient"] = token.patient
        return payload


class RevocationEndpoint(_RevocationEndpoint):
    CLIENT_AUTH_METHODS = ["client_secret_basic", "private_key_jwt", "none"]

    @property
    def runtime(self) -> SecurityRuntime:
        return self.server.runtime  # type: ignore[no-any-return]

    def query_token(self, token_string: str, token_type_hint: str | None):  # type: ignore[no-untyped-def]
        return _find_token(self.runtime, token_string, token_type_hint)

    def revoke_token(self, token, request) -> None:  # type: ignore[no-untyped-def]
        if isinstance(token, AccessTokenView):
            self.runtime.tokens.revocations.revoke(token.access)
        else:
            self.runtime.tokens.revoke_refresh_token(token.token_hash)
