"""SQLite write transactions (service/fhir/db.py): a process's writers take turns on a lock of
their own, and only the one whose turn it is waits for SQLite's write lock — polling, not in
SQLite's busy handler, whose sleeps grow to 100 ms. A lock held elsewhere for too long still
ends in the error the API answers 503 for."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.fhir import db
from service.fhir.db import create_engine, write_transaction


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'writers.db'}")
    with write_transaction(engine) as conn:
        conn.exec_driver_sql("CREATE TABLE t (n INTEGER)")
    yield engine
    engine.dispose()


def test_a_process_writers_take_turns(engine: sa.Engine) -> None:
    """Eight threads writing at once: every write lands, and the waiting ones hold no pooled
    connection (they queue before taking one), so readers still find connections free."""
    most = 0
    guard = threading.Lock()

    def writer() -> None:
        nonlocal most
        for _ in range(20):
            with write_transaction(engine) as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")
                with guard:
                    most = max(most, engine.pool.checkedout())

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 160
    assert most == 1


def test_a_writer_waits_for_another_process_then_goes_on(engine: sa.Engine, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "writers.db", isolation_level=None)  # as another process would
    other.execute("BEGIN IMMEDIATE")
    done = threading.Event()

    def writer() -> None:
        with write_transaction(engine) as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not done.wait(0.3)  # waiting for the other's lock
    other.execute("COMMIT")
    assert done.wait(5)
    thread.join()
    other.close()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t WHERE n = 2").scalar() == 1


def test_a_lock_held_too_long_is_a_database_error(engine: sa.Engine, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "_WRITE_LOCK_TIMEOUT_S", 0.2)
    other = sqlite3.connect(tmp_path / "writers.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            with write_transaction(engine):
                pass
    finally:
        other.execute("ROLLBACK")
        other.close()
    with write_transaction(engine) as conn:  # the process's own lock was released on the way out
        conn.exec_driver_sql("INSERT INTO t VALUES (3)")
