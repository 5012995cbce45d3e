"""The PostgreSQL pool pings only connections that were idle (HikariCP's rule), not every
checkout: a connection that died while idle is replaced before a request uses it."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from service.fhir import db

URL = "postgresql://postgres@127.0.0.1:5432/postgres"  # reads only; the server is always there


def _backend(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(pid: int) -> None:
    with psycopg.connect(URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # wait until the backend is gone, so the next checkout meets a dead connection
        for _ in range(100):
            if not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                break


def test_a_connection_that_died_while_idle_is_replaced_before_use(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = db.create_engine(URL, pool_size=1)
    try:
        first = _backend(engine)
        _terminate(first)
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # it has been idle "long enough"
        second = _backend(engine)
        assert second != first  # the dead one was pinged, discarded and replaced
    finally:
        engine.dispose()


def test_a_connection_used_a_moment_ago_is_not_pinged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the rule: within the window there is no ping (no round trip per
    request), so a connection killed within it fails the one request that meets it."""
    engine = db.create_engine(URL, pool_size=1)
    try:
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 3600.0)
        _terminate(_backend(engine))
        with pytest.raises(sa.exc.OperationalError):
            _backend(engine)
        assert _backend(engine) > 0  # and the pool recovers at once
    finally:
        engine.dispose()
