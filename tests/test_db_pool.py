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



def test_a_ping_keeps_the_connections_prepared_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg drops every prepared statement of a connection on ROLLBACK; a ping that rolled
    back made PostgreSQL plan the hot statements (the boundary checks cost milliseconds to
    plan) again after every idle second."""
    engine = db.create_engine(URL, pool_size=1)
    prepared = "SELECT count(*) FROM pg_prepared_statements"
    try:
        with engine.begin() as conn:
            db.execute_prepared(conn, "SELECT $1::int + 1", [1])
            assert conn.execute(sa.text(prepared)).scalar_one() == 1
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # the next checkout pings
        with engine.connect() as conn:
            assert conn.execute(sa.text(prepared)).scalar_one() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("request_threads", [None, 5])
async def test_requests_run_in_at_most_as_many_threads_as_pooled_connections(
        request_threads: int | None, engine: sa.Engine, database_url: str) -> None:
    """More request threads than pooled connections would open an overflow connection (a
    PostgreSQL backend) per request under load; by default the limit is the pool's size."""
    import anyio.to_thread

    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(database_url=database_url, auth="off", request_threads=request_threads), engine=engine)
    try:
        async with app.router.lifespan_context(app):
            limit = anyio.to_thread.current_default_thread_limiter().total_tokens
            assert limit == (request_threads or engine.pool.size())  # type: ignore[attr-defined]
            assert limit != 40  # anyio's default
    finally:
        app.state.audit_queue.close()


def test_a_failed_write_keeps_the_connections_prepared_statements() -> None:
    """A refused write rolls back; psycopg's own rollback would also forget (DEALLOCATE ALL)
    every prepared statement of the connection, and PostgreSQL would plan them all again."""
    engine = db.create_engine(URL, pool_size=1)
    prepared = "SELECT count(*) FROM pg_prepared_statements"
    try:
        with pytest.raises(RuntimeError), engine.begin() as conn:
            assert db.execute_prepared(conn, "SELECT $1::int + 1", [1]) == [(2,)]
            raise RuntimeError("refused")  # the transaction rolls back
        with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
            conn.execute(sa.text("SELECT 1 / 0"))  # an error inside the transaction, then ROLLBACK
        with engine.begin() as conn:
            assert conn.execute(sa.text(prepared)).scalar_one() == 1
            assert db.execute_prepared(conn, "SELECT $1::int + 1", [41]) == [(42,)]  # still usable
            assert conn.execute(sa.text(prepared)).scalar_one() == 1  # and not prepared twice
    finally:
        engine.dispose()
