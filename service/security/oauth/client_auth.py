"""``private_key_jwt`` client authentication as SMART Backend Services requires it.

authlib's :class:`JWTBearerClientAssertion` resolves the key without the JWS header and
allows any algorithm the key supports; SMART is stricter, so ``__call__`` is ours:

* ``alg`` is RS384 or ES384, and the header's ``kid`` selects exactly one of the client's keys
  (of the matching key type); an unknown kid re-fetches a jwks_url client's set once;
* ``iss`` = ``sub`` = client_id, ``aud`` = our token URL, ``exp`` in the future but at most
  five minutes ahead, ``nbf``/``iat`` not in the future, a ``jti`` never seen before: used
  jtis are stored in the database until they expire, so a replay is refused by every worker;
* any failure is ``invalid_client`` (RFC 7523 3.2 / SMART), with a description for the
  client's developer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from authlib.oauth2.rfc6749 import InvalidClientError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7523.client import ASSERTION_TYPE
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from service.fhir.db import is_postgres, write_transaction
from service.security.clients import ASSERTION_ALGORITHMS, Client
from service.security.tables import UsedAssertion

log = logging.getLogger("yilian.security")
USED = UsedAssertion.__table__
#: Clock allowance between the client and us, in seconds (exp in the past, nbf/iat ahead).
LEEWAY = 30


class PrivateKeyJwtAuthentication(JWTBearerClientAssertion):
    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, engine: Engine, *, token_url: str, clock: Callable[[], datetime],
                 max_seconds: int = 300) -> None:
        super().__init__(validate_jti=True, leeway=LEEWAY)
        self.engine = engine
        self.token_url = None  # authlib's deprecated constructor argument stays unused
        self._token_url = token_url
        self.clock = clock
        self.max_seconds = max_seconds

    def get_audiences(self) -> list[str]:
        return [self._token_url]

    def __call__(self, query_client, request) -> Client | None:  # type: ignore[no-untyped-def]
        data = request.form
        if data.get("client_assertion_type") != ASSERTION_TYPE or not data.get("client_assertion"):
            return None
        try:
            client = self._authenticate(query_client, str(data["client_assertion"]))
        except InvalidClientError as error:
            log.info("private_key_jwt refused: %s", error.description)
            raise
        except Exception:  # whatever else goes wrong with an assertion is still invalid_client
            log.exception("private_key_jwt: unexpected failure")
            raise InvalidClientError(description="The client assertion could not be verified.") from None
        request.client = client
        return client

    def _authenticate(self, query_client, assertion: str) -> Client:  # type: ignore[no-untyped-def]
        header, unverified = self.extract_assertion(assertion)
        alg = header.get("alg")
        if alg not in ASSERTION_ALGORITHMS:
            raise InvalidClientError(description="The assertion must be signed with RS384 or ES384.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidClientError(description="The assertion header must name its key (kid).")
        client_id = unverified.get("sub")
        if not isinstance(client_id, str) or unverified.get("iss") != client_id:
            raise InvalidClientError(description="iss and sub must both be the client_id.")
        client = query_client(client_id)
        if not isinstance(client, Client) or client.auth_method != self.CLIENT_AUTH_METHOD:
            raise InvalidClientError(description="No client registered for private_key_jwt has this client_id.")
        key = self._select_key(client, kid, alg)
        try:
            claims = jwt.decode(assertion, key, algorithms=[alg]).claims
        except (JoseError, ValueError):
            raise InvalidClientError(description="The assertion's signature does not verify.") from None
        expires_at = self._check_claims(claims, client_id)
        self._remember_jti(client_id, claims["jti"], expires_at)
        return client

    def _select_key(self, client: Client, kid: str, alg: str) -> RSAKey | ECKey:
        kty = ASSERTION_ALGORITHMS[alg]
        for refresh in (False, True):
            keys = [k for k in client.keys(refresh=refresh) if k.kid == kid]
            if len(keys) > 1:
                raise InvalidClientError(description=f"More than one key has kid '{kid}'.")
            if keys:
                key = keys[0]
                if key.key_type != kty:
                    raise InvalidClientError(description=f"Key '{kid}' is not an {kty} key, as {alg} needs.")
                if isinstance(key, ECKey) and key.curve_name != "P-384":
                    raise InvalidClientError(description="ES384 needs a P-384 key.")
                return key  # type: ignore[return-value]
            if client.jwks_url is None:
                break
        raise InvalidClientError(description=f"The client has no key with kid '{kid}'.")

    def _check_claims(self, claims: dict, client_id: str) -> int:
        now = self.clock().timestamp()
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise InvalidClientError(description="iss and sub must both be the client_id.")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self._token_url not in audiences:
            raise InvalidClientError(description="aud must be this server's token URL.")
        exp = claims.get("exp")
        if not isinstance(exp, int):
            raise InvalidClientError(description="The assertion needs an exp (seconds since the epoch).")
        if exp <= now - LEEWAY:
            raise InvalidClientError(description="The assertion has expired.")
        if exp > now + self.max_seconds + LEEWAY:
            raise InvalidClientError(description="The assertion's exp is more than five minutes ahead.")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, (int, float)) or value > now + LEEWAY):
                raise InvalidClientError(description=f"The assertion is not valid yet ({name} lies ahead).")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 255:
            raise InvalidClientError(description="The assertion needs a jti of at most 255 characters.")
        return exp

    def _remember_jti(self, client_id: str, jti: str, expires_at: int) -> None:
        """Insert (client, jti); a row already there means the assertion is replayed."""
        now = self.clock()
        with write_transaction(self.engine) as conn:
            conn.execute(USED.delete().where(USED.c.expires_at < now))
            insert = (postgresql.insert if is_postgres(conn) else sqlite.insert)(USED)
            inserted = conn.execute(
                insert.values(client_id=client_id, jti=jti,
                              expires_at=datetime.fromtimestamp(expires_at + LEEWAY, UTC))
                .on_conflict_do_nothing().returning(USED.c.jti)
            ).first()
        if inserted is None:
            raise InvalidClientError(description="This assertion (jti) has been used before.")

    def validate_jti(self, claims, jti) -> bool:  # type: ignore[no-untyped-def]
        raise AssertionError("not used: jtis are checked in _remember_jti")

    def resolve_client_public_key(self, client):  # type: ignore[no-untyped-def]
        raise AssertionError("not used: keys are selected by kid in _select_key")
