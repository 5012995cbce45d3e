"""Security settings (``YILIAN_*`` environment variables, see the README's Security section)
and the public URLs of the authorization server, derived from ``YILIAN_BASE_URL``.

They live here rather than in ``service.config`` so that the security package owns its knobs;
``create_app(security=...)`` takes an instance, tests pass their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.config import Settings


class SecuritySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="YILIAN_", extra="ignore")

    # Access-token lifetimes. SMART Backend Services: at most 5 minutes; users: at most 1 hour.
    backend_token_seconds: int = Field(300, gt=0, le=300)
    user_token_seconds: int = Field(3600, gt=0, le=3600)
    refresh_token_days: int = Field(14, gt=0, le=90)
    authorization_code_seconds: int = Field(120, gt=0, le=600)
    # A client assertion's exp may lie at most this far ahead (SMART: five minutes).
    assertion_max_seconds: int = Field(300, gt=0, le=300)
    # The newest signing key signs for this long, then stays published as long again.
    signing_key_rotation_days: int = Field(30, gt=0)
    # Each worker re-reads the revocation list at most this often (a revocation made in one
    # worker takes effect there at once, in the others within this many seconds).
    revocation_refresh_seconds: float = Field(2.0, ge=0)
    # Per-client token bucket, per worker process: sustained rate and burst.
    rate_limit_per_minute: int = Field(1200, gt=0)
    rate_limit_burst: int = Field(200, gt=0)
    # Desk users: lockout after repeated failures; session idle and absolute timeouts.
    login_max_failures: int = Field(5, gt=0)
    login_lockout_minutes: int = Field(15, gt=0)
    session_idle_minutes: int = Field(15, gt=0)
    session_max_hours: int = Field(8, gt=0)
    # OAuth over plain http is refused unless the public base URL is https or loopback;
    # this switch allows it for a development host on a private network (never production).
    oauth_allow_http: bool = False


def auth_enabled(settings: Settings) -> bool:
    """Authorization is on unless YILIAN_AUTH is exactly "off" (development only)."""
    return str(settings.auth).strip().lower() != "off"


@dataclass(frozen=True)
class OAuthUrls:
    """Absolute URLs of our endpoints as clients see them (from the public FHIR base)."""

    fhir_base: str
    root: str

    @classmethod
    def from_base(cls, base_url: str) -> OAuthUrls:
        base = base_url.rstrip("/")
        if base.endswith("/fhir"):
            root = base[: -len("/fhir")]
        else:
            parts = urlsplit(base)
            root = f"{parts.scheme}://{parts.netloc}"
        return cls(fhir_base=base, root=root)

    @property
    def issuer(self) -> str:
        return self.root + "/oauth"

    @property
    def authorize(self) -> str:
        return self.root + "/oauth/authorize"

    @property
    def token(self) -> str:
        return self.root + "/oauth/token"

    @property
    def introspect(self) -> str:
        return self.root + "/oauth/introspect"

    @property
    def revoke(self) -> str:
        return self.root + "/oauth/revoke"

    @property
    def jwks(self) -> str:
        return self.root + "/oauth/jwks"

    @property
    def smart_configuration(self) -> str:
        return self.fhir_base + "/.well-known/smart-configuration"

    def public(self, path: str, query: str = "") -> str:
        """The public URL of one of our paths (never built from the Host header)."""
        return self.root + path + (("?" + query) if query else "")
