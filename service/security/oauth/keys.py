"""Our token-signing keys: stored in the database, generated on first use, rotated.

* The newest key signs. When it is older than the rotation period, the next signer makes a
  new one (``yilian keys rotate`` does it at once).
* A key stays published at ``jwks_uri`` for a second rotation period after a newer key took
  over, far longer than any access token lives (≤ 1 hour), so tokens signed just before a
  rotation keep verifying, in every worker.
* Every worker caches the keys for ``cache_seconds``; a token naming a ``kid`` it does not
  know makes it re-read the table (at most once a second), so a key made by another worker
  is picked up at once.

The private keys are in the database in the clear (JWK): whoever reads the database can mint
tokens. Keep database credentials as secret as the data itself (it is the same data).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from joserfc.jwk import Key, KeySet, RSAKey
from sqlalchemy.engine import Engine

from service.fhir.db import is_postgres, read_transaction, write_transaction
from service.security.tables import SigningKey

KEYS = SigningKey.__table__
ALG = "RS256"
Clock = Callable[[], datetime]


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class _Snapshot:
    signer: RSAKey | None  # None when the newest key is due for rotation (or none exists)
    published: dict[str, Key]  # kid -> public key
    loaded_at: float


class KeyStore:
    def __init__(self, engine: Engine, *, rotation: timedelta, clock: Clock, cache_seconds: float = 60.0) -> None:
        self.engine = engine
        self.rotation = rotation
        self.clock = clock
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._last_miss_reload = 0.0

    # -- public ------------------------------------------------------------------------

    def signer(self) -> RSAKey:
        """The key to sign with now, made when there is none or the newest is too old."""
        snapshot = self._current()
        if snapshot.signer is not None:
            return snapshot.signer
        with self._lock:
            self._ensure_fresh_key(force=False)
            self._snapshot = self._load()
            assert self._snapshot.signer is not None
            return self._snapshot.signer

    def public_key(self, kid: str) -> Key | None:
        """The published key with this kid, or None (re-reading the table once on a miss)."""
        snapshot = self._current()
        key = snapshot.published.get(kid)
        if key is not None:
            return key
        now = time.monotonic()
        with self._lock:
            if now - self._last_miss_reload >= 1.0:
                self._last_miss_reload = now
                self._snapshot = self._load()
            return self._snapshot.published.get(kid) if self._snapshot else None

    def jwks(self) -> dict:
        """The published public keys as a JWK Set (for ``jwks_uri``)."""
        self.signer()  # publish a key before anyone asks for the first token
        snapshot = self._current()
        return KeySet(list(snapshot.published.values())).as_dict(private=False)

    def rotate(self, *, retire_previous: bool = False) -> str:
        """Make a new signing key now; with ``retire_previous``, unpublish all older keys
        (after a suspected key compromise: every token signed with them stops verifying)."""
        with self._lock:
            kid = self._ensure_fresh_key(force=True)
            if retire_previous:
                with write_transaction(self.engine) as conn:
                    conn.execute(KEYS.delete().where(KEYS.c.kid != kid))
            self._snapshot = self._load()
            return kid

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    # -- internals ---------------------------------------------------------------------

    def _current(self) -> _Snapshot:
        snapshot = self._snapshot
        if snapshot is None or time.monotonic() - snapshot.loaded_at > self.cache_seconds:
            with self._lock:
                snapshot = self._snapshot = self._load()
        return snapshot

    def _load(self) -> _Snapshot:
        now = self.clock()
        with read_transaction(self.engine) as conn:
            rows = conn.execute(
                sa.select(KEYS.c.kid, KEYS.c.private_jwk, KEYS.c.created_at)
                .where(KEYS.c.created_at > now - 2 * self.rotation)
                .order_by(KEYS.c.created_at.desc(), KEYS.c.kid.desc())
            ).all()
        published: dict[str, Key] = {}
        signer: RSAKey | None = None
        for position, (kid, jwk, created_at) in enumerate(rows):
            private = RSAKey.import_key(jwk)
            published[kid] = RSAKey.import_key(private.as_dict(private=False))
            if position == 0 and _utc(created_at) > now - self.rotation:
                signer = private
        return _Snapshot(signer, published, time.monotonic())

    def _ensure_fresh_key(self, *, force: bool) -> str:
        """Insert a new key unless (``force`` aside) another worker just made one."""
        now = self.clock()
        with write_transaction(self.engine) as conn:
            if is_postgres(conn):  # one generator at a time across workers
                lock_id = int.from_bytes(hashlib.blake2b(b"yilian-signing-key", digest_size=8).digest(), "big",
                                         signed=True)
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_id)))
            if not force:
                newest = conn.execute(sa.select(KEYS.c.kid, KEYS.c.created_at)
                                      .order_by(KEYS.c.created_at.desc()).limit(1)).first()
                if newest is not None and _utc(newest[1]) > now - self.rotation:
                    return newest[0]
            kid = secrets.token_urlsafe(12)
            key = RSAKey.generate_key(2048, parameters={"kid": kid, "alg": ALG, "use": "sig"}, private=True)
            conn.execute(KEYS.insert(), {"kid": kid, "alg": ALG, "private_jwk": key.as_dict(private=True),
                                         "created_at": now})
            return kid
