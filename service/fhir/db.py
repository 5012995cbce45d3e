"""Engine creation for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy.engine import Engine, make_url

# orjson keeps Chinese text as UTF-8 (json.dumps would write \u escapes) and is ~10x faster.
_JSON_CODEC = {"json_serializer": lambda obj: orjson.dumps(obj).decode(), "json_deserializer": orjson.loads}


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


#: How long SQLite statements wait for a lock held elsewhere before failing (503).
_BUSY_TIMEOUT_MS = 30_000


def create_engine(url: str, *, pool_size: int = 20) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_MS / 1000},
                                  pool_size=8, max_overflow=8, **_JSON_CODEC)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; we issue BEGIN IMMEDIATE ourselves
        # for writes so that two writers serialise instead of failing on lock upgrade.
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    # JIT compilation costs more than our short index queries take to run (measured ~500 ms
    # of compile for a 130 ms sorted search), so it is off for our sessions.
    engine = sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size // 2,
                              connect_args={"options": "-c jit=off"}, **_JSON_CODEC)
    sa.event.listen(engine, "checkin", _note_checkin)
    sa.event.listen(engine, "checkout", _ping_if_idle)
    sa.event.listen(engine, "before_cursor_execute", _send_held_first)
    engine.dialect.do_rollback = _rollback_keeping_prepared_statements  # type: ignore[method-assign]
    return engine


def _rollback_keeping_prepared_statements(dbapi_conn: Any) -> None:
    """ROLLBACK without psycopg's DEALLOCATE ALL.

    psycopg forgets every statement it prepared on a connection when a transaction rolls back,
    in case the transaction had dropped or altered what they use. Ours run no DDL (migrations
    use connections of their own), and PostgreSQL keeps prepared statements across a ROLLBACK.
    Forgetting them made every refused write (a 409 when two clerks book the same slot) cost
    its connection a new round of planning for every hot statement: five custom plans each,
    milliseconds apiece for the boundary checks."""
    conn = getattr(dbapi_conn, "driver_connection", dbapi_conn)
    if conn.closed or conn.info.transaction_status == pq.TransactionStatus.IDLE:
        conn.rollback()  # closed: psycopg raises what SQLAlchemy expects; idle: nothing to do
        return
    with conn.lock:
        result = conn.pgconn.exec_(b"ROLLBACK")
    if result.status != pq.ExecStatus.COMMAND_OK:
        message = (result.error_message or conn.pgconn.error_message or b"").decode(errors="replace")
        raise psycopg.OperationalError(f"ROLLBACK failed: {message.strip()}")


#: A pooled connection idle longer than this is pinged before use (HikariCP's rule): one that
#: was in use a moment ago is alive, and pinging it on every checkout (``pool_pre_ping``) cost
#: every request a round trip. A connection that died while idle (a database restart) is
#: replaced transparently; one that dies within this second fails its request with a 503.
PING_AFTER_IDLE_S = 1.0


def _note_checkin(_dbapi_conn, record) -> None:  # type: ignore[no-untyped-def]
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_conn, record, _proxy) -> None:  # type: ignore[no-untyped-def]
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
        return
    try:
        dbapi_conn.execute("SELECT 1")
        # commit, not rollback: psycopg forgets every statement it prepared on this connection
        # when a transaction is rolled back (DEALLOCATE ALL), and PostgreSQL would then plan
        # them all again, five custom plans each before it settles on a generic one.
        dbapi_conn.commit()
    except Exception as exc:
        # the pool discards this connection and checks out another (up to three times)
        raise sa.exc.DisconnectionError(str(exc)) from exc


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cur.close()


#: SQLite's busy handler sleeps 1, 2, 5, 10 ... up to 100 ms between attempts at a lock: a
#: writer waiting for another process kept sleeping long after the lock was free (p99 of a
#: create 1.3-1.6 s in the benchmark). The one writer of a process that waits for SQLite's
#: lock (the others wait for the process's, ``write_transaction``) polls instead: after
#: 0.5 ms at first, every 10 ms at most (polling every 2 ms handed the lock back and forth
#: between the workers so often that a create cost a third more CPU), up to the same 30 s.
_WRITE_LOCK_POLL_S = (0.0005, 0.01)
_WRITE_LOCK_TIMEOUT_S = _BUSY_TIMEOUT_MS / 1000
_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()
_SQLITE_WRITERS_LOCK = threading.Lock()


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    if not conn.info.get("write"):
        conn.exec_driver_sql("BEGIN")
        return
    cursor = conn.connection.driver_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + _WRITE_LOCK_TIMEOUT_S
        delay, longest = _WRITE_LOCK_POLL_S
        while True:
            try:
                cursor.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    # as SQLAlchemy would have wrapped it (the API answers 503 for these)
                    raise sa.exc.OperationalError("BEGIN IMMEDIATE", None, exc) from exc
            time.sleep(delay)
            delay = min(delay * 2, longest)
    finally:
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cursor.close()


def _sqlite_writers(engine: Engine) -> threading.RLock:
    """The lock a process's SQLite write transactions take in turn (re-entrant: a nested write
    transaction fails at SQLite's lock as before, instead of waiting here for ever)."""
    with _SQLITE_WRITERS_LOCK:
        lock = _SQLITE_WRITERS.get(engine)
        if lock is None:
            lock = _SQLITE_WRITERS[engine] = threading.RLock()
        return lock


def is_postgres(engine: Engine | sa.Connection) -> bool:
    return engine.dialect.name == "postgresql"


def execute_prepared(conn: sa.Connection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """PostgreSQL: run a hand-written statement (``$1`` placeholders) in ``conn``'s transaction
    as a prepared statement, bypassing SQLAlchemy and psycopg's query conversion; its rows.
    For the hot write path, whose statements' texts never change.

    One cursor per connection is kept and reused, and whether rows came back is read off the
    result's status: a new cursor, and the column descriptions psycopg builds when asked for
    ``description``, cost a quarter of psycopg's time for a short statement."""
    if HELD in conn.info:
        send_held(conn)
    driver = conn.connection.driver_connection
    cursor = _CURSORS.get(driver)
    if cursor is None or cursor.closed:
        cursor = _CURSORS[driver] = psycopg.RawCursor(driver)  # type: ignore[arg-type]
    cursor.execute(sql, params, prepare=True)
    result = cursor.pgresult
    return cursor.fetchall() if result is not None and result.status == pq.ExecStatus.TUPLES_OK else []


#: The kept cursor of each psycopg connection (gone with its connection).
_CURSORS: weakref.WeakKeyDictionary[Any, psycopg.RawCursor[Any]] = weakref.WeakKeyDictionary()


# -- held writes (PostgreSQL) -------------------------------------------------------------------

#: ``conn.info`` key of the writes a PostgreSQL transaction holds back (:class:`HeldWrites`).
HELD = "yilian.held_writes"

#: The CTEs of one held write, given a name prefix and the number of its first placeholder.
CteBuilder = Callable[[str, int], Sequence[str]]


@dataclass
class HeldWrites:
    """Data-modifying statements of a write transaction whose results nothing reads, held back
    and sent together as one statement of CTEs: just before the transaction's next statement,
    or at its end. When nothing else ran, that statement is the whole transaction, sent in
    autocommit: a create and its audit records travel in one round trip instead of four
    (BEGIN, create, audit records, COMMIT), with the same all-or-nothing outcome."""

    ctes: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, ctes: CteBuilder, params: Sequence[Any]) -> None:
        self.ctes += ctes(f"h{len(self.ctes)}_", len(self.params) + 1)
        self.params += params

    def statement(self) -> str:
        return "WITH " + ", ".join(self.ctes) + " SELECT 1"


def hold(conn: sa.Connection, ctes: CteBuilder, params: Sequence[Any]) -> bool:
    """Hold back a write whose result nothing reads (see :class:`HeldWrites`); False when it
    cannot be held — SQLite, a read, or a transaction that has sent statements already — and
    the caller runs it now."""
    held = conn.info.get(HELD)
    if held is None:
        if not conn.info.get("write") or not is_postgres(conn):
            return False
        if conn.connection.driver_connection.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            return False
        held = conn.info[HELD] = HeldWrites()
    held.add(ctes, params)
    return True


def send_held(conn: sa.Connection, *, at_end: bool = False) -> None:
    """Send what ``conn`` holds back, if anything: in its transaction, or at the transaction's
    end (``at_end``), when nothing else was sent, as the whole transaction (autocommit)."""
    held: HeldWrites | None = conn.info.pop(HELD, None)
    if held is None:
        return
    driver = conn.connection.driver_connection
    alone = at_end and driver.pgconn.transaction_status == pq.TransactionStatus.IDLE
    if alone:
        driver.autocommit = True  # COMMIT at the statement's end; psycopg then commits nothing
    try:
        execute_prepared(conn, held.statement(), held.params)
    finally:
        if alone:
            driver.autocommit = False


def _send_held_first(conn, _cursor, _statement, _parameters, _context, _executemany) -> None:  # type: ignore[no-untyped-def]
    """Any other statement of the transaction runs after the held writes (it may read them)."""
    if HELD in conn.info:
        send_held(conn)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[sa.Connection]:
    """One database transaction for a write. On SQLite it starts with BEGIN IMMEDIATE; on
    PostgreSQL held writes (:func:`hold`) are sent last, before COMMIT or as the transaction.
    SQLite takes one writer at a time anyway: a process's writers queue on a lock of its own
    first, so that only one of them waits for SQLite's (:func:`_sqlite_begin`)."""
    if is_postgres(engine):
        with _write_transaction(engine) as conn:
            yield conn
        return
    with _sqlite_writers(engine), _write_transaction(engine) as conn:
        yield conn


@contextmanager
def _write_transaction(engine: Engine) -> Iterator[sa.Connection]:
    with engine.connect() as conn:
        conn.info["write"] = True
        try:
            with conn.begin():
                yield conn
                send_held(conn, at_end=True)
        finally:
            conn.info["write"] = False
            conn.info.pop(HELD, None)  # a failed transaction sends nothing it held


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
