"""Everything the security package needs at run time, built once per app (``app.state.security``).

One object so that the router, the bearer check in ``service.api.deps`` and the CLI share
the same caches (signing keys, revocation list, rate buckets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine

from service.config import Settings
from service.security.clients import ClientStore, JwksFetcher
from service.security.oauth.client_auth import PrivateKeyJwtAuthentication
from service.security.oauth.config import OAuthUrls, SecuritySettings, auth_enabled
from service.security.oauth.keys import KeyStore
from service.security.oauth.tokens import RevocationList, TokenService
from service.security.ratelimit import RateLimiter
from service.security.users import UserStore

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class SecurityRuntime:
    engine: Engine
    settings: SecuritySettings
    urls: OAuthUrls
    enabled: bool
    clock: Clock
    keys: KeyStore
    clients: ClientStore
    users: UserStore
    tokens: TokenService
    rate_limiter: RateLimiter
    private_key_jwt: PrivateKeyJwtAuthentication
    _server: object | None = field(default=None, repr=False)

    @classmethod
    def create(cls, app_settings: Settings, engine: Engine, security: SecuritySettings | None = None, *,
               clock: Clock = utc_now, jwks_fetcher: JwksFetcher | None = None) -> SecurityRuntime:
        settings = security or SecuritySettings()
        urls = OAuthUrls.from_base(app_settings.base_url)
        keys = KeyStore(engine, rotation=timedelta(days=settings.signing_key_rotation_days), clock=clock)
        revocations = RevocationList(engine, refresh_seconds=settings.revocation_refresh_seconds, clock=clock)
        return cls(
            engine=engine, settings=settings, urls=urls, enabled=auth_enabled(app_settings), clock=clock, keys=keys,
            clients=ClientStore(engine, clock=clock, fetcher=jwks_fetcher, allow_http=settings.oauth_allow_http),
            users=UserStore(engine, clock=clock, max_failures=settings.login_max_failures,
                            lockout=timedelta(minutes=settings.login_lockout_minutes),
                            session_idle=timedelta(minutes=settings.session_idle_minutes),
                            session_max=timedelta(hours=settings.session_max_hours)),
            tokens=TokenService(engine, keys=keys, revocations=revocations, urls=urls, settings=settings, clock=clock),
            rate_limiter=RateLimiter(per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst),
            private_key_jwt=PrivateKeyJwtAuthentication(engine, token_url=urls.token, clock=clock,
                                                        max_seconds=settings.assertion_max_seconds),
        )

    @property
    def server(self):  # type: ignore[no-untyped-def]
        """The authlib authorization server (built on first use)."""
        if self._server is None:
            from service.security.oauth.server import YilianAuthorizationServer

            self._server = YilianAuthorizationServer(self)
        return self._server
