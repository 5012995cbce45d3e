"""Engine creation for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

# orjson keeps Chinese text as UTF-8 (json.dumps would write \u escapes) and is ~10x faster.
_JSON_CODEC = {"json_serializer": lambda obj: orjson.dumps(obj).decode(), "json_deserializer": orjson.loads}


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def create_engine(url: str, *, pool_size: int = 20) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                  pool_size=8, max_overflow=8, **_JSON_CODEC)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; we issue BEGIN IMMEDIATE ourselves
        # for writes so that two writers serialise instead of failing on lock upgrade.
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    # JIT compilation costs more than our short index queries take to run (measured ~500 ms
    # of compile for a 130 ms sorted search), so it is off for our sessions.
    return sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size // 2, pool_pre_ping=True,
                            connect_args={"options": "-c jit=off"}, **_JSON_CODEC)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")


def is_postgres(engine: Engine | sa.Connection) -> bool:
    return engine.dialect.name == "postgresql"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[sa.Connection]:
    """One database transaction for a write. On SQLite it starts with BEGIN IMMEDIATE."""
    with engine.connect() as conn:
        conn.info["write"] = True
        try:
            with conn.begin():
                yield conn
        finally:
            conn.info["write"] = False


@contextmanager
def read_transaction(engine: Engine) -> Iterator[sa.Connection]:
    """A connection for reads. On SQLite one transaction, so that every statement sees the same
    snapshot. On PostgreSQL autocommit: under READ COMMITTED each statement takes its own
    snapshot anyway, so BEGIN and COMMIT would only add two round trips to every read (searches
    pin their pages to the change sequence instead, see ``service.fhir.search``)."""
    with engine.connect() as conn:
        if is_postgres(engine):
            yield conn.execution_options(isolation_level="AUTOCOMMIT")
            return
        with conn.begin():
            yield conn
