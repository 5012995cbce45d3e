"""Desk users (referral-desk staff): passwords, lockout, login sessions.

* Passwords are hashed with scrypt (hashlib, no extra dependency); the parameters are part
  of the stored string (``scrypt$N$r$p$salt$hash``) so they can be raised later without
  invalidating existing hashes.
* After ``login_max_failures`` wrong passwords in a row the account is locked for
  ``login_lockout_minutes``; while locked even the right password is refused, and the
  message does not say which of the two happened (no account enumeration).
* A login makes a server-side session (cookie holds a random id, the table its SHA-256)
  that ends after ``session_idle_minutes`` without use or ``session_max_hours`` in all.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.fhir.db import read_transaction, write_transaction
from service.security.tables import DeskSession, DeskUser

USERS = DeskUser.__table__
SESSIONS = DeskSession.__table__
Clock = Callable[[], datetime]

MIN_PASSWORD_LENGTH = 12
USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
ORGANIZATION_REF = re.compile(r"^Organization/[A-Za-z0-9\-.]{1,64}$")
ROLE_REF = re.compile(r"^(PractitionerRole|Practitioner)/[A-Za-z0-9\-.]{1,64}$")

# scrypt cost: N=2^15, r=8 (32 MiB, ~50-100 ms on one core).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return "$".join(["scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * 1024 * 1024, dklen=32)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username is unknown or locked, so all cases take as long."""
    return hash_password(secrets.token_urlsafe(16))


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class User:
    username: str
    display_name: str
    organization: str
    practitioner_role: str | None
    locked_until: datetime | None
    disabled: bool

    def as_json(self) -> dict:
        return {"username": self.username, "display_name": self.display_name, "organization": self.organization,
                "practitioner_role": self.practitioner_role,
                "locked_until": self.locked_until.isoformat() if self.locked_until else None,
                "disabled": self.disabled}


class LoginFailed(Exception):
    """Wrong username or password, locked or disabled account: one message for all."""

    def __init__(self) -> None:
        super().__init__("the username or password is wrong, or the account is locked; "
                         "after repeated failures wait before trying again")


class UserError(ValueError):
    """A user record that cannot be created as asked (message says why)."""


def _user(row: sa.Row) -> User:
    return User(username=row.username, display_name=row.display_name, organization=row.organization,
                practitioner_role=row.practitioner_role, locked_until=_utc(row.locked_until),
                disabled=row.disabled_at is not None)


class UserStore:
    def __init__(self, engine: Engine, *, clock: Clock, max_failures: int = 5,
                 lockout: timedelta = timedelta(minutes=15), session_idle: timedelta = timedelta(minutes=15),
                 session_max: timedelta = timedelta(hours=8)) -> None:
        self.engine = engine
        self.clock = clock
        self.max_failures = max_failures
        self.lockout = lockout
        self.session_idle = session_idle
        self.session_max = session_max

    # -- records -----------------------------------------------------------------------

    def create(self, username: str, password: str, *, organization: str, practitioner_role: str | None = None,
               display_name: str = "") -> User:
        if not USERNAME.match(username):
            raise UserError("a username is 1-64 characters of letters, digits and . _ @ -")
        if not ORGANIZATION_REF.match(organization):
            raise UserError("the organization must be written Organization/<id>")
        if practitioner_role is not None and not ROLE_REF.match(practitioner_role):
            raise UserError("the practitioner role must be written PractitionerRole/<id>")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise UserError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
        with write_transaction(self.engine) as conn:
            if conn.execute(sa.select(USERS.c.username).where(USERS.c.username == username)).first():
                raise UserError(f"user {username!r} exists already")
            conn.execute(USERS.insert(), {
                "username": username, "display_name": display_name, "password_hash": hash_password(password),
                "organization": organization, "practitioner_role": practitioner_role,
                "failed_logins": 0, "created_at": self.clock()})
        found = self.get(username)
        assert found is not None
        return found

    def get(self, username: str) -> User | None:
        with read_transaction(self.engine) as conn:
            row = conn.execute(sa.select(USERS).where(USERS.c.username == username)).first()
        return None if row is None else _user(row)

    def list(self) -> list[User]:
        with read_transaction(self.engine) as conn:
            return [_user(r) for r in conn.execute(sa.select(USERS).order_by(USERS.c.username)).all()]

    def unlock(self, username: str) -> bool:
        with write_transaction(self.engine) as conn:
            result = conn.execute(USERS.update().where(USERS.c.username == username)
                                  .values(failed_logins=0, locked_until=None))
        return result.rowcount == 1

    def disable(self, username: str) -> bool:
        """Disable the account and end its sessions (its tokens stop via the revocation list)."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(USERS.update().where(USERS.c.username == username, USERS.c.disabled_at.is_(None))
                                  .values(disabled_at=self.clock()))
            conn.execute(SESSIONS.delete().where(SESSIONS.c.username == username))
        return result.rowcount == 1

    def set_password(self, username: str, password: str) -> bool:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise UserError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
        with write_transaction(self.engine) as conn:
            result = conn.execute(USERS.update().where(USERS.c.username == username)
                                  .values(password_hash=hash_password(password), failed_logins=0, locked_until=None))
            conn.execute(SESSIONS.delete().where(SESSIONS.c.username == username))
        return result.rowcount == 1

    # -- login -------------------------------------------------------------------------

    def authenticate(self, username: str, password: str) -> User:
        """The user, or LoginFailed; counts failures and locks the account after too many."""
        now = self.clock()
        with write_transaction(self.engine) as conn:
            row = conn.execute(sa.select(USERS).where(USERS.c.username == username)).first()
            if row is None:
                verify_password(password, _dummy_hash())
                raise LoginFailed()
            locked_until = _utc(row.locked_until)
            if row.disabled_at is not None or (locked_until is not None and locked_until > now):
                verify_password(password, _dummy_hash())
                raise LoginFailed()
            if not verify_password(password, row.password_hash):
                failures = row.failed_logins + 1
                values: dict = {"failed_logins": failures}
                if failures >= self.max_failures:
                    values = {"failed_logins": 0, "locked_until": now + self.lockout}
                conn.execute(USERS.update().where(USERS.c.username == username).values(**values))
                failed = True
            else:
                conn.execute(USERS.update().where(USERS.c.username == username)
                             .values(failed_logins=0, locked_until=None))
                failed = False
        if failed:  # raised after the commit, so the failure counts
            raise LoginFailed()
        return _user(row)

    # -- sessions ----------------------------------------------------------------------

    def start_session(self, username: str) -> str:
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with write_transaction(self.engine) as conn:
            conn.execute(SESSIONS.delete().where(SESSIONS.c.last_seen < now - self.session_max))
            conn.execute(SESSIONS.insert(), {"id_hash": sha256_hex(token), "username": username,
                                             "created_at": now, "last_seen": now})
        return token

    def session_user(self, token: str | None) -> User | None:
        """The user of a live session (touching it), or None when absent or timed out."""
        if not token:
            return None
        now = self.clock()
        key = sha256_hex(token)
        with write_transaction(self.engine) as conn:
            row = conn.execute(sa.select(SESSIONS).where(SESSIONS.c.id_hash == key)).first()
            if row is None:
                return None
            if _utc(row.last_seen) < now - self.session_idle or _utc(row.created_at) < now - self.session_max:
                conn.execute(SESSIONS.delete().where(SESSIONS.c.id_hash == key))
                return None
            user_row = conn.execute(sa.select(USERS).where(USERS.c.username == row.username)).first()
            if user_row is None or user_row.disabled_at is not None:
                return None
            conn.execute(SESSIONS.update().where(SESSIONS.c.id_hash == key).values(last_seen=now))
        return _user(user_row)

    def end_session(self, token: str | None) -> None:
        if token:
            with write_transaction(self.engine) as conn:
                conn.execute(SESSIONS.delete().where(SESSIONS.c.id_hash == sha256_hex(token)))
