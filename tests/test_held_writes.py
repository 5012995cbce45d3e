"""Held writes (service/fhir/db.py, PostgreSQL): a create and its audit records are held back
and sent as one statement — before the transaction's next statement, or as the whole
transaction at its end — with the same outcome as statement by statement."""

from __future__ import annotations

from uuid import uuid4

import psycopg
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from psycopg import pq

from service.fhir.access import AccessContext
from service.fhir.db import HELD, is_postgres
from service.fhir.store import ResourceStore
from service.security.audit import drain

#: A caller without an organization boundary: checking one is a statement of its own, after
#: which nothing is held (the create is sent before it, in the transaction).
CALLER = AccessContext.internal("held-test")


@pytest.fixture(autouse=True)
def _postgres_only(engine: sa.Engine) -> None:
    if not is_postgres(engine):
        pytest.skip("SQLite runs in process: there are no round trips to save, nothing is held")


def _patient(marker: str) -> dict:
    return {"resourceType": "Patient", "name": [{"text": marker}]}


def _exists(engine: sa.Engine, resource_id: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM resource WHERE id = :i"), {"i": resource_id}).scalar() == 1


def test_a_create_alone_is_sent_at_the_end_as_the_whole_transaction(engine: sa.Engine) -> None:
    store = ResourceStore(engine)
    with store.write(CALLER) as tx:
        created = tx.create(_patient("alone"))
        driver = tx.conn.connection.driver_connection
        assert HELD in tx.conn.info
        assert driver.pgconn.transaction_status == pq.TransactionStatus.IDLE  # not even BEGIN was sent
        assert not _exists(engine, created.resource.id)
    assert _exists(engine, created.resource.id)
    assert driver.autocommit is False  # the pooled connection is as it was
    assert store.read(CALLER, "Patient", created.resource.id).version_id == 1


def test_the_next_statement_of_the_transaction_sees_the_held_create(engine: sa.Engine) -> None:
    store = ResourceStore(engine)
    marker = f"next-{uuid4().hex[:8]}"
    with store.write(CALLER) as tx:
        created = tx.create(_patient(marker))
        assert tx.read("Patient", created.resource.id).version_id == 1  # sent before this read
        assert HELD not in tx.conn.info
        assert tx.find("Patient", f"name={marker}") == [created.resource.id]
        tx.update("Patient", created.resource.id, {**_patient(marker), "id": created.resource.id, "gender": "male"})
    assert store.read(CALLER, "Patient", created.resource.id).version_id == 2


def test_a_failure_after_a_held_create_writes_nothing(engine: sa.Engine) -> None:
    store = ResourceStore(engine)
    with pytest.raises(RuntimeError), store.write(CALLER) as tx:
        created = tx.create(_patient("refused"))
        raise RuntimeError("a check after the write refuses it")
    assert not _exists(engine, created.resource.id)


def test_audit_records_travel_with_the_held_create_and_fail_with_it(app: FastAPI, engine: sa.Engine) -> None:
    store: ResourceStore = app.state.store  # with the audit trail's write hook
    with store.write(CALLER) as tx:
        created = tx.create(_patient("audited"))
        assert tx.conn.connection.driver_connection.pgconn.transaction_status == pq.TransactionStatus.IDLE
    taken = created.resource.id
    assert _exists(engine, taken)
    assert _provenances(store, taken) == 1

    # The same id again: the held statement fails at the end, and takes its audit records along.
    with pytest.raises(psycopg.errors.UniqueViolation), store.write(CALLER) as tx:
        tx.create(_patient("duplicate"), resource_id=taken)
        driver = tx.conn.connection.driver_connection
    assert driver.autocommit is False
    assert store.read(CALLER, "Patient", taken).version_id == 1
    assert _provenances(store, taken) == 1
    assert store.create(CALLER, _patient("after")).resource.version_id == 1  # connections still work


def _provenances(store: ResourceStore, resource_id: str) -> int:
    """Provenances of the resource's version 1, once everything queued is stored."""
    drain(store)  # waits for the background drain's rows too
    with store.read_only(AccessContext.internal("test")) as tx:
        return len(tx.find("Provenance", f"target=Patient/{resource_id}/_history/1", limit=10))


def test_psycopg_commits_nothing_when_the_statement_was_the_transaction(engine: sa.Engine) -> None:
    """What send_held relies on: COMMIT and ROLLBACK of an idle psycopg connection send nothing."""
    with engine.connect() as conn:
        driver: psycopg.Connection = conn.connection.driver_connection  # type: ignore[assignment]
        assert driver.pgconn.transaction_status == pq.TransactionStatus.IDLE
        driver.commit()
        driver.rollback()
        assert driver.pgconn.transaction_status == pq.TransactionStatus.IDLE
