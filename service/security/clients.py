"""OAuth clients: registration, lookup, and the authlib ``ClientMixin`` view of a record.

Three kinds, by how the client authenticates at the token endpoint:

* ``client_secret_basic``: simple HIS integrations. The secret is 32 random bytes, shown once;
  we keep its SHA-256 (a fast hash is enough for a high-entropy secret).
* ``private_key_jwt``: SMART Backend Services. The client registers a JWK Set (or a URL we
  fetch it from); it signs a short assertion with RS384 or ES384 for every token request.
* ``none``: public apps (a browser or mobile app). Authorization code with PKCE only.

Every client acts for one Organization; its tokens carry it into the AccessContext.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
from authlib.common.security import is_secure_transport
from authlib.oauth2.rfc6749 import ClientMixin
from joserfc.jwk import ECKey, Key, RSAKey
from sqlalchemy.engine import Engine

from service.fhir.db import read_transaction, write_transaction
from service.security.scopes import ScopeError, grantable, parse_scopes
from service.security.tables import OAuthClient
from service.security.users import ORGANIZATION_REF

CLIENTS = OAuthClient.__table__
AUTH_METHODS = ("client_secret_basic", "private_key_jwt", "none")
#: Client-assertion algorithms we accept (SMART Backend Services: RS384 and ES384).
ASSERTION_ALGORITHMS = {"RS384": "RSA", "ES384": "EC"}
CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{3,64}$")
Clock = Callable[[], datetime]


class ClientError(ValueError):
    """A client registration that cannot be accepted (message says why)."""


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Client(ClientMixin):
    client_id: str
    name: str
    organization: str
    scopes: tuple[str, ...]
    auth_method: str
    secret_hash: str | None = None
    jwks: dict | None = None
    jwks_url: str | None = None
    redirect_uris: tuple[str, ...] = ()
    grant_types: tuple[str, ...] = ()
    demo: bool = False
    disabled: bool = False
    public_keys: Callable[[Client, bool], list[Key]] | None = field(default=None, compare=False, repr=False)

    # -- authlib ClientMixin -----------------------------------------------------------

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str:
        """Scopes for a user token (the authorization endpoint); see scopes.grantable."""
        return " ".join(grantable(scope, self.scopes, kind="user"))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris  # exact match only (RFC 9700 2.1)

    def check_client_secret(self, client_secret: str) -> bool:
        if self.secret_hash is None:
            return False
        return hmac.compare_digest(secret_digest(client_secret), self.secret_hash)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types

    # -- ours --------------------------------------------------------------------------

    def keys(self, *, refresh: bool = False) -> list[Key]:
        """The client's public keys (registered JWKS, or fetched from its jwks_url)."""
        if self.public_keys is None:
            return _import_jwks(self.jwks or {"keys": []})
        return self.public_keys(self, refresh)

    def as_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "name": self.name, "organization": self.organization,
                "scope": " ".join(self.scopes), "token_endpoint_auth_method": self.auth_method,
                "jwks": self.jwks, "jwks_uri": self.jwks_url, "redirect_uris": list(self.redirect_uris),
                "grant_types": list(self.grant_types), "disabled": self.disabled}


def validate_jwks(jwks: Any) -> dict:
    """Check a client's JWK Set: public keys only, each with a unique kid, RSA ≥ 2048 bits
    or EC P-384. Returns the set; raises ClientError."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ClientError("a JWK Set is an object with a non-empty 'keys' array")
    kids: set[str] = set()
    for position, data in enumerate(jwks["keys"]):
        if not isinstance(data, dict):
            raise ClientError(f"keys[{position}] is not an object")
        kid = data.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ClientError(f"keys[{position}] has no kid: every key needs one (the assertion names it)")
        if kid in kids:
            raise ClientError(f"two keys have the kid {kid!r}; a kid must select exactly one key")
        kids.add(kid)
        if any(part in data for part in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise ClientError(f"key {kid!r} contains private key material: register the public key only")
        try:
            key = _import_key(data)
        except Exception as exc:  # joserfc raises several types for malformed keys
            raise ClientError(f"key {kid!r} cannot be read: {exc}") from None
        if isinstance(key, RSAKey) and key.raw_value.key_size < 2048:
            raise ClientError(f"RSA key {kid!r} is shorter than 2048 bits")
        if isinstance(key, ECKey) and data.get("crv") != "P-384":
            raise ClientError(f"EC key {kid!r} must be on P-384 (ES384)")
        if not isinstance(key, (RSAKey, ECKey)):
            raise ClientError(f"key {kid!r} must be RSA (RS384) or EC P-384 (ES384)")
    return jwks


def _import_key(data: dict) -> Key:
    if data.get("kty") == "RSA":
        return RSAKey.import_key(data)
    if data.get("kty") == "EC":
        return ECKey.import_key(data)
    raise ClientError(f"key type {data.get('kty')!r} is not accepted (RSA or EC)")


def _import_jwks(jwks: dict) -> list[Key]:
    keys = []
    for data in jwks.get("keys", []):
        try:
            keys.append(_import_key(data))
        except Exception:  # a key we cannot read can never verify anything
            continue
    return keys


class JwksFetcher:
    """Fetches and caches the JWK Sets of clients registered with a jwks_url.

    Cached for ``ttl`` seconds; a refresh on demand (an unknown kid) is allowed once every
    ``min_refresh`` seconds per URL, so a client cannot make us fetch on every request."""

    def __init__(self, *, ttl: float = 300.0, min_refresh: float = 10.0, timeout: float = 5.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.ttl, self.min_refresh, self.timeout = ttl, min_refresh, timeout
        self.transport = transport
        self._cache: dict[str, tuple[float, list[Key]]] = {}
        self._lock = threading.Lock()

    def __call__(self, client: Client, refresh: bool) -> list[Key]:
        if client.jwks_url is None:
            return _import_jwks(client.jwks or {"keys": []})
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(client.jwks_url)
        if cached and (now - cached[0] < self.ttl) and not (refresh and now - cached[0] >= self.min_refresh):
            return cached[1]
        try:
            with httpx.Client(timeout=self.timeout, transport=self.transport, follow_redirects=False) as http:
                response = http.get(client.jwks_url, headers={"Accept": "application/json"})
            response.raise_for_status()
            keys = _import_jwks(validate_jwks(response.json()))
        except (httpx.HTTPError, ValueError):
            return cached[1] if cached else []
        with self._lock:
            self._cache[client.jwks_url] = (now, keys)
        return keys


def _client(row: sa.Row, fetcher: JwksFetcher | None) -> Client:
    return Client(client_id=row.client_id, name=row.name, organization=row.organization,
                  scopes=tuple(row.scopes.split()), auth_method=row.auth_method, secret_hash=row.secret_hash,
                  jwks=row.jwks, jwks_url=row.jwks_url, redirect_uris=tuple(row.redirect_uris or ()),
                  grant_types=tuple(row.grant_types or ()), demo=row.demo, disabled=row.disabled_at is not None,
                  public_keys=fetcher)


class ClientStore:
    def __init__(self, engine: Engine, *, clock: Clock, fetcher: JwksFetcher | None = None,
                 allow_http: bool = False) -> None:
        self.engine = engine
        self.clock = clock
        self.fetcher = fetcher or JwksFetcher()
        self.allow_http = allow_http

    def get(self, client_id: str, *, include_disabled: bool = False) -> Client | None:
        with read_transaction(self.engine) as conn:
            row = conn.execute(sa.select(CLIENTS).where(CLIENTS.c.client_id == client_id)).first()
        if row is None or (row.disabled_at is not None and not include_disabled):
            return None
        return _client(row, self.fetcher)

    def list(self) -> list[Client]:
        with read_transaction(self.engine) as conn:
            rows = conn.execute(sa.select(CLIENTS).order_by(CLIENTS.c.name, CLIENTS.c.client_id)).all()
        return [_client(r, self.fetcher) for r in rows]

    def disable(self, client_id: str) -> bool:
        """Disable a client: no new tokens, and its live tokens stop at the next revocation
        refresh (the revocation list also holds disabled clients)."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(CLIENTS.update()
                                  .where(CLIENTS.c.client_id == client_id, CLIENTS.c.disabled_at.is_(None))
                                  .values(disabled_at=self.clock()))
        return result.rowcount == 1

    def create(self, *, name: str, organization: str, scopes: str, secret: bool = False, jwks: dict | None = None,
               jwks_url: str | None = None, public: bool = False, redirect_uris: list[str] | None = None,
               grant_types: list[str] | None = None, client_id: str | None = None,
               demo: bool = False) -> tuple[Client, str | None]:
        """Register a client; returns it and, for a secret client, the secret (shown once)."""
        kinds = [secret, jwks is not None, jwks_url is not None, public]
        if sum(bool(k) for k in kinds) != 1:
            raise ClientError("choose exactly one of: a secret, a JWK Set, a JWK Set URL, or a public client")
        if not name.strip():
            raise ClientError("a client needs a name")
        if not ORGANIZATION_REF.match(organization):
            raise ClientError("the organization must be written Organization/<id>")
        scope_list = scopes.split()
        if not scope_list:
            raise ClientError("a client needs at least one scope")
        try:
            parse_scopes(scope_list)
        except ScopeError as exc:
            raise ClientError(str(exc)) from None
        redirects = list(dict.fromkeys(redirect_uris or []))
        for uri in redirects:
            self._check_redirect_uri(uri)
        if jwks is not None:
            validate_jwks(jwks)
        if jwks_url is not None:
            self._check_https(jwks_url, "the JWK Set URL")
        auth_method = ("client_secret_basic" if secret else "private_key_jwt" if (jwks or jwks_url) else "none")
        if grant_types is None:
            grant_types = ["authorization_code", "refresh_token"] if redirects else ["client_credentials"]
        unknown = set(grant_types) - {"authorization_code", "refresh_token", "client_credentials"}
        if unknown:
            raise ClientError(f"unknown grant types: {sorted(unknown)}")
        if "authorization_code" in grant_types and not redirects:
            raise ClientError("the authorization code grant needs at least one redirect URI")
        if public and "client_credentials" in grant_types:
            raise ClientError("a public client cannot use client_credentials")
        if client_id is None:
            client_id = "c-" + secrets.token_hex(10)
        if not CLIENT_ID.match(client_id):
            raise ClientError("a client id is 3-64 letters, digits, '.', '_' or '-'")
        plain_secret = secrets.token_urlsafe(32) if secret else None
        with write_transaction(self.engine) as conn:
            if conn.execute(sa.select(CLIENTS.c.client_id).where(CLIENTS.c.client_id == client_id)).first():
                raise ClientError(f"client {client_id!r} exists already")
            conn.execute(CLIENTS.insert(), {
                "client_id": client_id, "name": name.strip(), "organization": organization,
                "scopes": " ".join(scope_list), "auth_method": auth_method,
                "secret_hash": secret_digest(plain_secret) if plain_secret else None, "jwks": jwks,
                "jwks_url": jwks_url, "redirect_uris": redirects, "grant_types": list(grant_types), "demo": demo,
                "created_at": self.clock()})
        client = self.get(client_id)
        assert client is not None
        return client, plain_secret

    def _check_redirect_uri(self, uri: str) -> None:
        parts = urlsplit(uri)
        if not parts.scheme or not parts.netloc or parts.fragment:
            raise ClientError(f"redirect URI {uri!r} must be absolute and carry no fragment")
        self._check_https(uri, f"redirect URI {uri!r}")

    def _check_https(self, uri: str, what: str) -> None:
        if not uri.startswith(("http://", "https://")):
            raise ClientError(f"{what} must be an http(s) URL")
        if not self.allow_http and not is_secure_transport(uri):
            raise ClientError(f"{what} must use https (http only on a loopback address)")
