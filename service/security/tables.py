"""Tables of the security package: OAuth clients, desk users and their sessions, our
signing keys, authorization codes, refresh tokens, used client-assertion ids and revoked
access tokens.

Secrets are never stored in the clear: client secrets, refresh tokens, authorization codes
and session ids are kept as SHA-256 digests (they are long random strings, so a fast hash
is enough); desk-user passwords as scrypt hashes (``service.security.users``).
Access tokens themselves are not stored: they are JWTs, and only a revoked one leaves a row.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from service.fhir.tables import Json, UtcDateTime


class OAuthClient(SQLModel, table=True):
    """A registered OAuth client: a hospital HIS, a clinic system, a third-party app."""

    __tablename__ = "oauth_client"

    client_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    organization: str = Field(max_length=130)  # "Organization/<id>" the client acts for
    scopes: str = Field(sa_type=sa.Text)  # the scopes it may be granted, space separated
    # client_secret_basic | private_key_jwt | none (public app, PKCE only)
    auth_method: str = Field(max_length=32)
    secret_hash: str | None = Field(default=None, max_length=128)
    jwks: dict | None = Field(default=None, sa_column=sa.Column(Json, nullable=True))
    jwks_url: str | None = Field(default=None, max_length=2000)
    redirect_uris: list = Field(default_factory=list, sa_column=sa.Column(Json, nullable=False))
    grant_types: list = Field(default_factory=list, sa_column=sa.Column(Json, nullable=False))
    demo: bool = False  # seeded by `yilian demo-data`; only these get `yilian demo-token`
    created_at: datetime = Field(sa_type=UtcDateTime)
    disabled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class DeskUser(SQLModel, table=True):
    """A staff user of the referral desk, who logs in on our login page."""

    __tablename__ = "desk_user"

    username: str = Field(primary_key=True, max_length=64)
    display_name: str = Field(default="", max_length=200)
    password_hash: str = Field(max_length=300)
    organization: str = Field(max_length=130)
    practitioner_role: str | None = Field(default=None, max_length=130)
    failed_logins: int = 0
    locked_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(sa_type=UtcDateTime)
    disabled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class DeskSession(SQLModel, table=True):
    """A logged-in desk user (cookie on /oauth), with idle and absolute timeouts."""

    __tablename__ = "desk_session"
    __table_args__ = (sa.Index("ix_desk_session_user", "username"),)

    id_hash: str = Field(primary_key=True, max_length=64)
    username: str = Field(max_length=64)
    created_at: datetime = Field(sa_type=UtcDateTime)
    last_seen: datetime = Field(sa_type=UtcDateTime)


class SigningKey(SQLModel, table=True):
    """Our token-signing keys. The newest signs; older ones stay published for a while."""

    __tablename__ = "signing_key"
    __table_args__ = (sa.Index("ix_signing_key_created", "created_at"),)

    kid: str = Field(primary_key=True, max_length=64)
    alg: str = Field(max_length=16)
    private_jwk: dict = Field(sa_column=sa.Column(Json, nullable=False))
    created_at: datetime = Field(sa_type=UtcDateTime)


class AuthorizationCode(SQLModel, table=True):
    __tablename__ = "oauth_code"
    __table_args__ = (sa.Index("ix_oauth_code_expires", "expires_at"),)

    code_hash: str = Field(primary_key=True, max_length=64)
    client_id: str = Field(max_length=64)
    username: str = Field(max_length=64)
    redirect_uri: str = Field(max_length=2000)
    scope: str = Field(sa_type=sa.Text)
    code_challenge: str = Field(max_length=128)
    code_challenge_method: str = Field(max_length=10)
    patient: str | None = Field(default=None, max_length=64)
    expires_at: datetime = Field(sa_type=UtcDateTime)


class RefreshToken(SQLModel, table=True):
    __tablename__ = "oauth_refresh_token"
    __table_args__ = (
        sa.Index("ix_refresh_client", "client_id"),
        sa.Index("ix_refresh_expires", "expires_at"),
    )

    token_hash: str = Field(primary_key=True, max_length=64)
    client_id: str = Field(max_length=64)
    username: str = Field(max_length=64)
    scope: str = Field(sa_type=sa.Text)
    patient: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_type=UtcDateTime)
    expires_at: datetime = Field(sa_type=UtcDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class UsedAssertion(SQLModel, table=True):
    """``jti`` of client assertions already used (private_key_jwt), kept until they expire,
    so a replay is refused by every worker."""

    __tablename__ = "oauth_used_jti"
    __table_args__ = (sa.Index("ix_used_jti_expires", "expires_at"),)

    client_id: str = Field(primary_key=True, max_length=64)
    jti: str = Field(primary_key=True, max_length=255)
    expires_at: datetime = Field(sa_type=UtcDateTime)


class RevokedToken(SQLModel, table=True):
    """Revoked access tokens (by ``jti``), kept until the token would have expired anyway."""

    __tablename__ = "oauth_revoked_token"
    __table_args__ = (sa.Index("ix_revoked_expires", "expires_at"),)

    jti: str = Field(primary_key=True, max_length=64)
    client_id: str = Field(max_length=64)
    expires_at: datetime = Field(sa_type=UtcDateTime)
    revoked_at: datetime = Field(sa_type=UtcDateTime)
