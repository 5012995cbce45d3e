"""The audit trail's token rows are stored once per distinct set (service.fhir.token_sets) and
searched exactly like everyone else's: every token modifier, sorting, _has, scopes, the
race of two writers of the same new set, purge and the migration of existing rows."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from service.fhir import tables, token_sets
from service.fhir.access import AccessContext
from service.fhir.db import create_engine, is_postgres
from service.fhir.ids import new_id
from service.fhir.indexing import index_resource
from service.fhir.store import ResourceStore
from service.migrate import upgrade
from service.security.audit import CLIENT_SID, audit_event, provenance, purge, resource_entity
from service.security.scopes import TokenRestriction
from tests.conftest import empty_database

SYSTEM = AccessContext.internal("test")
TOKEN = tables.TokenIndex.__table__
MEMBER = token_sets.MEMBER
SET_ROW = token_sets.SET_ROW
RESTFUL = "http://hl7.org/fhir/restful-interaction"


def event(subtype: str, action: str, *, status: int = 200, client: str = "his-1",
          entity: str = "Patient/p1") -> dict[str, Any]:
    ctx = AccessContext(client_id=client, organization="Organization/hospital-1")
    return audit_event(subtype=subtype, action=action, status=status, ctx=ctx, entities=[resource_entity(entity)],
                       recorded=datetime.now(UTC), address="10.0.0.7")


def create(store: ResourceStore, *resources: dict[str, Any]) -> list[str]:
    with store.write(SYSTEM) as tx:
        return [stored.id for stored in tx.create_many([(resource, new_id()) for resource in resources])]


def ids(store: ResourceStore, resource_type: str, query: list[tuple[str, str]]) -> list[str]:
    bundle = orjson.loads(store.search(SYSTEM, resource_type, [*query, ("_count", "100")], base_url=""))
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def count(engine: sa.Engine, query: sa.Select) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar_one()


def test_records_with_the_same_token_rows_share_one_set(isolated_engine: sa.Engine) -> None:
    store = ResourceStore(isolated_engine)
    [first] = create(store, event("read", "R"))
    [second] = create(store, event("read", "R", entity="Patient/p2"))  # another transaction, the same set
    [other] = create(store, event("search-type", "E"))

    assert count(isolated_engine, sa.select(TOKEN).where(TOKEN.c.resource_type == "AuditEvent")) == 0
    with isolated_engine.connect() as conn:
        names = dict(conn.execute(sa.select(MEMBER.c.resource_id, MEMBER.c.digest)).all())
        stored = conn.execute(sa.select(SET_ROW.c.param, SET_ROW.c.code).where(SET_ROW.c.digest == names[first])).all()
    assert names[first] == names[second] != names[other]
    # the set holds the read's token rows once, whatever number of records name it
    assert sorted(stored) == sorted(set(stored))
    assert ("subtype", "read") in stored and ("action", "R") in stored and ("altid", "his-1") in stored
    assert count(isolated_engine, sa.select(token_sets.SET)) == 2


@pytest.fixture(scope="module")
def audited(engine: sa.Engine) -> dict[str, str]:
    """AuditEvents (and one Provenance) that differ in their token rows, in the shared test
    database; tests below search only among them (by client)."""
    store = ResourceStore(engine)
    client = f"c{new_id()[:12]}"
    [patient] = create(store, {"resourceType": "Patient", "gender": "female"})
    read_ok, read_refused, created, searched = create(
        store,
        event("read", "R", client=client, entity=f"Patient/{patient}"),
        event("read", "R", status=403, client=client, entity="Patient/elsewhere"),
        event("create", "C", client=client, entity="Observation/tok-3"),
        event("search-type", "E", client=client, entity=f"Patient/{patient}"),
    )
    ctx = AccessContext(client_id=client, organization="Organization/hospital-1")
    [prov] = create(store, provenance(targets=[f"Patient/{patient}/_history/1"], activity="CREATE", ctx=ctx,
                                      recorded=datetime.now(UTC)))
    return {"client": client, "patient": patient, "read_ok": read_ok, "read_refused": read_refused,
            "created": created, "searched": searched, "provenance": prov}


@pytest.mark.parametrize(("query", "expected"), [
    ([("subtype", "read")], {"read_ok", "read_refused"}),
    ([("subtype", f"{RESTFUL}|read")], {"read_ok", "read_refused"}),
    ([("subtype", "http://elsewhere|read")], set()),
    ([("subtype", "|read")], set()),  # "no system": ours have one
    ([("action", "C,E")], {"created", "searched"}),
    ([("action", "R"), ("outcome", "0")], {"read_ok"}),
    ([("action:not", "R")], {"created", "searched"}),
    ([("outcome", "4")], {"read_refused"}),
    ([("entity-type", "1")], {"read_ok", "read_refused", "searched"}),
    ([("type:text", "patient rec")], {"read_ok", "read_refused", "created", "searched"}),
    ([("policy:missing", "true")], {"read_ok", "read_refused", "created", "searched"}),
    ([("subtype:missing", "false"), ("action", "E")], {"searched"}),
], ids=lambda v: "&".join(f"{k}={x}" for k, x in v) if isinstance(v, list) else None)
def test_token_searches_on_shared_sets(engine: sa.Engine, audited: dict[str, str], query: list[tuple[str, str]],
                                       expected: set[str]) -> None:
    store = ResourceStore(engine)
    found = ids(store, "AuditEvent", [("altid", audited["client"]), *query])
    assert sorted(found) == sorted(audited[name] for name in expected)


def test_sorting_by_a_shared_token(engine: sa.Engine, audited: dict[str, str]) -> None:
    store = ResourceStore(engine)
    ascending = ids(store, "AuditEvent", [("altid", audited["client"]), ("_sort", "subtype,outcome")])
    assert ascending == [audited[n] for n in ("created", "read_ok", "read_refused", "searched")]
    descending = ids(store, "AuditEvent", [("altid", audited["client"]), ("_sort", "-action")])
    assert descending[0] == audited["read_ok"] or descending[0] == audited["read_refused"]
    assert descending[-1] == audited["created"]


def test_provenance_tokens_and_has_through_shared_sets(engine: sa.Engine, audited: dict[str, str]) -> None:
    store = ResourceStore(engine)
    assert ids(store, "Provenance", [("agent:identifier", f"{CLIENT_SID}|{audited['client']}"),
                                    ("agent-type", "enterer")]) == [audited["provenance"]]
    # reverse chaining into the audit trail: which patients did this client search for?
    patient = audited["patient"]
    assert ids(store, "Patient", [("_id", patient), ("_has:AuditEvent:entity:altid", audited["client"]),
                                  ("_has:AuditEvent:entity:subtype", "search-type")]) == [patient]
    assert ids(store, "Patient", [("_id", patient), ("_has:AuditEvent:entity:action", "D")]) == []


def test_scope_restrictions_on_token_rows_see_shared_sets(engine: sa.Engine, audited: dict[str, str]) -> None:
    resource = sa.table("resource", sa.column("resource_type"), sa.column("id"))
    restriction = TokenRestriction("subtype", ((RESTFUL, "read"),))
    query = sa.select(resource.c.id).where(resource.c.resource_type == "AuditEvent",
                                           resource.c.id.in_([audited["read_ok"], audited["created"]]),
                                           restriction.clause("AuditEvent", resource.c.id))
    with engine.connect() as conn:
        assert conn.execute(query).scalars().all() == [audited["read_ok"]]


def test_two_writers_of_the_same_new_set_store_it_once(isolated_engine: sa.Engine) -> None:
    """The second writer waits for the first: after its commit it writes no rows of the set,
    after its rollback it writes them itself."""
    if not is_postgres(isolated_engine):
        pytest.skip("SQLite write transactions take turns: two writers never meet inside a set")
    store = ResourceStore(isolated_engine)
    for outcome in ("commit", "rollback"):
        client = f"race-{outcome}"
        first_wrote, second_done = threading.Event(), threading.Event()
        second_ids: list[str] = []

        def second() -> None:
            first_wrote.wait(10)
            second_ids.extend(create(store, event("read", "R", client=client, entity="Patient/b")))
            second_done.set()

        worker = threading.Thread(target=second)
        worker.start()
        first_ids: list[str] = []
        try:
            with store.write(SYSTEM) as tx:
                first_ids += [s.id for s in tx.create_many([(event("read", "R", client=client), new_id())])]
                tx.conn.execute(sa.text("SELECT 1"))  # the held create goes out now: the set is written
                first_wrote.set()
                assert not second_done.wait(0.5), "the second writer did not wait for the first's outcome"
                if outcome == "rollback":
                    raise RuntimeError("roll back")
        except RuntimeError:
            first_ids.clear()
        worker.join(10)
        assert second_done.is_set()

        found = ids(store, "AuditEvent", [("altid", client), ("subtype", "read")])
        assert sorted(found) == sorted(first_ids + second_ids)
        with isolated_engine.connect() as conn:
            [name] = conn.execute(sa.select(MEMBER.c.digest).where(MEMBER.c.resource_id == second_ids[0])).scalars()
            rows = conn.execute(sa.select(SET_ROW.c.param, SET_ROW.c.code).where(SET_ROW.c.digest == name)).all()
        assert rows and len(rows) == len(set(rows))


def test_purge_removes_the_records_set_memberships(isolated_engine: sa.Engine) -> None:
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    old_store = ResourceStore(isolated_engine, clock=lambda: long_ago)
    [old] = create(old_store, event("read", "R"))
    [recent] = create(ResourceStore(isolated_engine), event("read", "R"))
    assert purge(isolated_engine, days=180) == 1
    with isolated_engine.connect() as conn:
        assert conn.execute(sa.select(MEMBER.c.resource_id)).scalars().all() == [recent]
    assert old != recent


def test_the_migration_moves_existing_token_rows_into_sets(database_url: str, tmp_path: Path) -> None:
    with empty_database(database_url, tmp_path) as url:
        upgrade(url, "0008")
        engine = create_engine(url)
        reads = [event("read", "R", entity=f"Patient/m{n}") for n in range(3)]
        refused = event("read", "R", status=403)
        patient = {"resourceType": "Patient", "id": "m0", "gender": "female"}
        with engine.begin() as conn:  # as the store wrote them before: every token row of its own
            for n, resource in enumerate([*reads, refused, patient]):
                resource_id = resource.get("id") or f"a{n}"
                rows = index_resource(resource)
                conn.execute(TOKEN.insert(), [{"resource_type": resource["resourceType"], "resource_id": resource_id,
                                               **row} for row in rows.tokens])
        upgrade(url)
        with engine.connect() as conn:
            left = conn.execute(sa.select(TOKEN.c.resource_type).distinct()).scalars().all()
            members = dict(conn.execute(sa.select(MEMBER.c.resource_id, MEMBER.c.digest)).all())
            sets = conn.execute(sa.select(sa.func.count()).select_from(token_sets.SET)).scalar_one()
        engine.dispose()
    assert left == ["Patient"]
    assert set(members) == {"a0", "a1", "a2", "a3"}
    assert members["a0"] == members["a1"] == members["a2"] != members["a3"] and sets == 2
    # what the store writes now names the same set as the migrated rows
    assert members["a0"] == token_sets.digest(index_resource(event("read", "R")).tokens)
