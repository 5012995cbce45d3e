"""Access tokens (JWTs we sign), refresh tokens (opaque, in the database) and revocation.

Access token: a JWT (RFC 9068 profile, header ``typ: at+jwt``, RS256 with our rotating key)::

    iss  <root>/oauth            aud  the FHIR base URL         sub  username or client_id
    client_id  scope  iat  nbf  exp  jti
    organization  "Organization/<id>" the caller acts for (client's, or the desk user's)
    practitioner  "PractitionerRole/<id>" of a desk user, when set
    patient       "<id>" of the patient in context (patient-context launch)
    user          desk username (user tokens only)

A resource request verifies signature, issuer, audience and time locally and then asks the
:class:`RevocationList`, which is an in-memory snapshot re-read from the database at most
every ``revocation_refresh_seconds`` (default 2 s) — one small indexed query per worker per
interval, never one per request. A revocation is effective at once in the worker that
received it and within that interval in all others. The snapshot also holds disabled
clients and disabled desk users, so disabling one stops its live tokens the same way.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from joserfc import jws, jwt
from joserfc.errors import JoseError
from sqlalchemy.engine import Engine

from service.fhir.access import AccessContext
from service.fhir.db import read_transaction, write_transaction
from service.security.oauth.config import OAuthUrls, SecuritySettings
from service.security.oauth.keys import ALG, KeyStore
from service.security.tables import DeskUser, OAuthClient, RefreshToken, RevokedToken
from service.security.users import sha256_hex

log = logging.getLogger("yilian.security")

REVOKED = RevokedToken.__table__
REFRESH = RefreshToken.__table__
Clock = Callable[[], datetime]
#: Allowance for clock differences between workers/hosts when checking nbf and iat.
SKEW_SECONDS = 5


class InvalidToken(Exception):
    """The bearer token is missing, malformed, forged, expired or revoked (message says which)."""


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class AccessToken:
    """The verified claims of one of our access tokens."""

    claims: dict[str, Any]

    @property
    def jti(self) -> str:
        return str(self.claims["jti"])

    @property
    def client_id(self) -> str:
        return str(self.claims["client_id"])

    @property
    def scope(self) -> str:
        return str(self.claims.get("scope", ""))

    @property
    def expires_at(self) -> int:
        return int(self.claims["exp"])

    @property
    def user(self) -> str | None:
        return self.claims.get("user")

    @property
    def patient(self) -> str | None:
        return self.claims.get("patient")

    def context(self) -> AccessContext:
        return AccessContext(client_id=self.client_id, organization=self.claims.get("organization"),
                             practitioner=self.claims.get("practitioner"),
                             patient=f"Patient/{self.patient}" if self.patient else None,
                             user=self.user, scopes=frozenset(self.scope.split()))


@dataclass(frozen=True)
class RefreshRecord:
    token_hash: str
    client_id: str
    username: str
    scope: str
    patient: str | None
    expires_at: datetime
    revoked: bool


@dataclass(frozen=True)
class _Revocations:
    jtis: frozenset[str]
    clients: frozenset[str]
    users: frozenset[str]
    loaded_at: float


class RevocationList:
    """Which tokens no longer count: revoked jtis, disabled clients, disabled desk users."""

    def __init__(self, engine: Engine, *, refresh_seconds: float, clock: Clock) -> None:
        self.engine = engine
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._snapshot: _Revocations | None = None
        self._local: set[str] = set()  # revoked here since the last reload
        self._lock = threading.Lock()

    def is_revoked(self, token: AccessToken) -> bool:
        snapshot = self._fresh()
        return (token.jti in snapshot.jtis or token.jti in self._local or token.client_id in snapshot.clients
                or (token.user is not None and token.user in snapshot.users))

    def revoke(self, token: AccessToken) -> None:
        expires = datetime.fromtimestamp(token.expires_at, UTC)
        with write_transaction(self.engine) as conn:
            exists = conn.execute(sa.select(REVOKED.c.jti).where(REVOKED.c.jti == token.jti)).first()
            if exists is None:
                conn.execute(REVOKED.insert(), {"jti": token.jti, "client_id": token.client_id,
                                                "expires_at": expires, "revoked_at": self.clock()})
        with self._lock:
            self._local.add(token.jti)

    def reload(self) -> None:
        with self._lock:
            self._snapshot = self._load()
            self._local.clear()

    def _fresh(self) -> _Revocations:
        snapshot = self._snapshot
        if snapshot is not None and time.monotonic() - snapshot.loaded_at < self.refresh_seconds:
            return snapshot
        if snapshot is None:
            with self._lock:
                if self._snapshot is None:
                    self._snapshot = self._load()
                return self._snapshot
        if self._lock.acquire(blocking=False):  # one thread reloads, the others use the last one
            try:
                self._snapshot = self._load()
                self._local.clear()
            finally:
                self._lock.release()
        return self._snapshot or snapshot

    def _load(self) -> _Revocations:
        now = self.clock()
        clients, users = OAuthClient.__table__, DeskUser.__table__
        with read_transaction(self.engine) as conn:
            jtis = conn.execute(sa.select(REVOKED.c.jti).where(REVOKED.c.expires_at > now)).scalars().all()
            disabled_clients = conn.execute(sa.select(clients.c.client_id)
                                            .where(clients.c.disabled_at.is_not(None))).scalars().all()
            disabled_users = conn.execute(sa.select(users.c.username)
                                          .where(users.c.disabled_at.is_not(None))).scalars().all()
        return _Revocations(frozenset(jtis), frozenset(disabled_clients), frozenset(disabled_users), time.monotonic())

    def purge(self) -> int:
        """Forget revocations of tokens that have expired anyway."""
        with write_transaction(self.engine) as conn:
            return conn.execute(REVOKED.delete().where(REVOKED.c.expires_at <= self.clock())).rowcount


class TokenService:
    def __init__(self, engine: Engine, *, keys: KeyStore, revocations: RevocationList, urls: OAuthUrls,
                 settings: SecuritySettings, clock: Clock) -> None:
        self.engine = engine
        self.keys = keys
        self.revocations = revocations
        self.urls = urls
        self.settings = settings
        self.clock = clock

    # -- access tokens -----------------------------------------------------------------

    def issue_access_token(self, *, client_id: str, scope: list[str], organization: str, kind: str,
                           user: str | None = None, practitioner: str | None = None, patient: str | None = None,
                           now: datetime | None = None, lifetime: int | None = None) -> tuple[str, int]:
        """Sign an access token; returns (token, expires_in). ``kind`` is backend or user."""
        moment = int((now or self.clock()).timestamp())
        if lifetime is None:
            lifetime = self.settings.backend_token_seconds if kind == "backend" else self.settings.user_token_seconds
        claims: dict[str, Any] = {
            "iss": self.urls.issuer, "aud": self.urls.fhir_base, "sub": user or client_id, "client_id": client_id,
            "scope": " ".join(scope), "iat": moment, "nbf": moment, "exp": moment + lifetime,
            "jti": secrets.token_urlsafe(16), "organization": organization,
        }
        if user:
            claims["user"] = user
        if practitioner:
            claims["practitioner"] = practitioner
        if patient:
            claims["patient"] = patient
        key = self.keys.signer()
        token = jwt.encode({"alg": ALG, "kid": key.kid, "typ": "at+jwt"}, claims, key, algorithms=[ALG])
        return token, lifetime

    def decode(self, token: str) -> AccessToken:
        """Signature, issuer and audience checked; time and revocation not (introspection)."""
        try:
            header = jws.extract_compact(token.encode()).headers()
        except (JoseError, ValueError, UnicodeError):
            raise InvalidToken("the access token is not a JWT") from None
        if header.get("alg") != ALG or header.get("typ") != "at+jwt":
            raise InvalidToken("the access token was not issued by this server")
        key = self.keys.public_key(str(header.get("kid", "")))
        if key is None:
            raise InvalidToken("the access token is signed with a key this server does not know (anymore)")
        try:
            claims = jwt.decode(token, key, algorithms=[ALG]).claims
        except (JoseError, ValueError):
            raise InvalidToken("the access token's signature does not verify") from None
        if claims.get("iss") != self.urls.issuer:
            raise InvalidToken("the access token has another issuer")
        audience = claims.get("aud")
        if audience != self.urls.fhir_base and not (isinstance(audience, list) and self.urls.fhir_base in audience):
            raise InvalidToken("the access token is meant for another server (aud)")
        for name in ("exp", "jti", "client_id"):
            if name not in claims:
                raise InvalidToken(f"the access token has no {name}")
        if not isinstance(claims["exp"], int):
            raise InvalidToken("the access token's exp is not a number")
        return AccessToken(claims)

    def verify(self, token: str) -> AccessToken:
        """A token fit for use right now, or InvalidToken."""
        access = self.decode(token)
        now = self.clock().timestamp()
        if access.expires_at <= now:
            raise InvalidToken("the access token has expired")
        nbf = access.claims.get("nbf")
        if isinstance(nbf, (int, float)) and nbf > now + SKEW_SECONDS:
            raise InvalidToken("the access token is not valid yet")
        if self.revocations.is_revoked(access):
            raise InvalidToken("the access token has been revoked")
        return access

    def is_active(self, access: AccessToken) -> bool:
        return access.expires_at > self.clock().timestamp() and not self.revocations.is_revoked(access)

    # -- refresh tokens ----------------------------------------------------------------

    def issue_refresh_token(self, *, client_id: str, username: str, scope: str, patient: str | None) -> str:
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with write_transaction(self.engine) as conn:
            conn.execute(REFRESH.delete().where(REFRESH.c.expires_at < now))
            conn.execute(REFRESH.insert(), {
                "token_hash": sha256_hex(token), "client_id": client_id, "username": username, "scope": scope,
                "patient": patient, "created_at": now,
                "expires_at": now + timedelta(days=self.settings.refresh_token_days)})
        return token

    def find_refresh_token(self, token: str) -> RefreshRecord | None:
        with read_transaction(self.engine) as conn:
            row = conn.execute(sa.select(REFRESH).where(REFRESH.c.token_hash == sha256_hex(token))).first()
        if row is None:
            return None
        return RefreshRecord(row.token_hash, row.client_id, row.username, row.scope, row.patient,
                             _utc(row.expires_at), row.revoked_at is not None)

    def revoke_refresh_token(self, token_hash: str) -> bool:
        """Mark a refresh token revoked; False when it already was (a second use)."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(REFRESH.update()
                                  .where(REFRESH.c.token_hash == token_hash, REFRESH.c.revoked_at.is_(None))
                                  .values(revoked_at=self.clock()))
        return result.rowcount == 1

    def refresh_is_live(self, record: RefreshRecord) -> bool:
        return not record.revoked and record.expires_at > self.clock()
