"""Every access leaves a trace: AuditEvent for reads, searches, writes, refusals and logins,
Provenance for every write — durable before the response (writes: in their own transaction),
immutable, readable by auditors only, purged by retention."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from service.cli import _parser
from service.fhir.access import AccessContext
from service.fhir.db import create_engine, is_postgres
from service.fhir.errors import Forbidden, NotFound
from service.fhir.hooks import WriteEvent, WriteHooks
from service.fhir.store import ResourceStore
from service.fhir.validation import validate_resource
from service.security.audit import (
    QUEUE,
    AuditQueue,
    audit_event,
    drain,
    prepare_sqlite_batch,
    provenance,
    purge,
    record_login,
    store_sqlite_batch,
)
from service.security.resident_id import SYSTEM as RESIDENT_ID
from tests.conftest import bearer
from tests.test_boundaries import FHIR, World, build_world

SYSTEM = AccessContext.internal("test")


@pytest.fixture(scope="module")
def world(app: FastAPI) -> World:
    return build_world(app.state.store)


def stored_events(app: FastAPI, **params: str) -> list[dict[str, Any]]:
    """AuditEvents matching ``params`` once everything queued so far is stored."""
    drain(app.state.store)
    return search(app, "AuditEvent", **params)


def search(app: FastAPI, resource_type: str, **params: str) -> list[dict[str, Any]]:
    import orjson

    bundle = orjson.loads(app.state.store.search(SYSTEM, resource_type, [*params.items(), ("_count", "1000")],
                                                 base_url=""))
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


def queued(app: FastAPI) -> list[dict[str, Any]]:
    with app.state.engine.connect() as conn:
        return [row[0] for row in conn.execute(sa.select(QUEUE.c.resource))]


def organizations(event: dict[str, Any]) -> set[str]:
    return {a["who"]["reference"] for a in event["agent"]
            if a["who"].get("reference", "").startswith("Organization/")}


def whats(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", []) if "what" in e}


def queries(event: dict[str, Any]) -> list[str]:
    return [base64.b64decode(e["query"]).decode() for e in event.get("entity", []) if "query" in e]


# -- reads and searches -------------------------------------------------------------------------------

async def test_a_read_is_durably_queued_before_the_response_and_becomes_an_audit_event(
        client: httpx.AsyncClient, world: World, app: FastAPI) -> None:
    response = await client.get(f"/Patient/{world['p1']}", headers=world.as_org("hosp-a"))
    assert response.status_code == 200
    target = f"Patient/{world['p1']}"
    # acknowledged means durable: the event is already in the database (queued, or drained)
    in_queue = [e for e in queued(app) if target in whats(e)]
    assert in_queue or search(app, "AuditEvent", entity=target)
    events = [e for e in stored_events(app, entity=target) if e["subtype"][0]["code"] == "read"
              and f"Organization/{world['hosp-a']}" in organizations(e)]
    assert events, "the read left no AuditEvent"
    event = events[0]
    assert event["type"] == {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110",
                             "display": "Patient Record"}
    assert event["subtype"] == [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}]
    assert event["action"] == "R" and event["outcome"] == "0"
    requestor = next(a for a in event["agent"] if a["requestor"])
    assert requestor["extension"][0]["valueReference"] == {"reference": f"Organization/{world['hosp-a']}"}
    assert event["source"]["observer"]["display"] == "Yilian FHIR gateway"
    assert validate_resource(event) == []


async def test_a_search_records_its_query_with_resident_ids_masked(client: httpx.AsyncClient, world: World,
                                                                  app: FastAPI) -> None:
    rid = world.resident_ids["p1"]
    response = await client.get("/Patient", params={"identifier": f"{RESIDENT_ID}|{rid}"},
                                headers=world.as_org("clinic-a1"))
    assert response.status_code == 200 and response.json()["total"] == 1
    drain(app.state.store)
    masked = rid[:6] + "********" + rid[-4:]
    mine = [e for e in search(app, "AuditEvent", subtype="search-type")
            if any(masked in q for q in queries(e))]
    assert mine and mine[0]["action"] == "E"
    assert not any(rid in q for e in search(app, "AuditEvent", subtype="search-type") for q in queries(e))
    assert not any(rid in str(e) for e in queued(app))


async def test_refused_accesses_are_audited_as_failures(client: httpx.AsyncClient, world: World,
                                                        app: FastAPI) -> None:
    other = {**world.as_org("hosp-b"), **FHIR}
    assert (await client.get(f"/Condition/{world['cond-p1']}", headers=other)).status_code == 404
    body = {"resourceType": "Condition", "id": world["cond-p1"], "subject": {"reference": f"Patient/{world['p1']}"}}
    assert (await client.put(f"/Condition/{world['cond-p1']}", json=body, headers=other)).status_code == 403
    events = [e for e in stored_events(app, entity=f"Condition/{world['cond-p1']}")
              if f"Organization/{world['hosp-b']}" in organizations(e)]
    assert {(e["subtype"][0]["code"], e["outcome"], e["outcomeDesc"]) for e in events} >= {
        ("read", "4", "404 Not Found"), ("update", "4", "403 Forbidden")}


async def test_concurrent_reads_are_all_audited(client: httpx.AsyncClient, world: World, app: FastAPI) -> None:
    target = f"Observation/{world['obs-p2']}"
    before = len(stored_events(app, entity=target))
    responses = await asyncio.gather(*(client.get(f"/{target}", headers=world.as_org("clinic-a2"))
                                       for _ in range(25)))
    assert {r.status_code for r in responses} == {200}
    assert len(stored_events(app, entity=target)) == before + 25


# -- writes: AuditEvent and Provenance in the write's own transaction ------------------------------

async def test_every_write_has_provenance_and_audit_in_its_own_transaction(client: httpx.AsyncClient,
                                                                          world: World, app: FastAPI) -> None:
    clinic = {**world.as_org("clinic-a1"), **FHIR}
    body = {"resourceType": "Condition", "subject": {"reference": f"Patient/{world['p1']}"}, "code": {"text": "咳嗽"}}
    created = await client.post("/Condition", json=body, headers=clinic)
    assert created.status_code == 201
    cid = created.json()["id"]
    # committed with the write itself: queued (or already stored by the background drain)
    first = f"Condition/{cid}/_history/1"
    assert [r for r in queued(app) if first in whats(r) or first in str(r.get("target"))] or \
        search(app, "Provenance", target=f"Condition/{cid}")
    updated = await client.put(f"/Condition/{cid}", json=dict(created.json(), code={"text": "慢性咳嗽"}), headers=clinic)
    assert updated.status_code == 200
    assert (await client.delete(f"/Condition/{cid}", headers=clinic)).status_code == 204
    drain(app.state.store)
    trail = sorted(search(app, "Provenance", target=f"Condition/{cid}"), key=lambda p: p["target"][0]["reference"])
    assert [(p["target"][0]["reference"], p["activity"]["coding"][0]["code"]) for p in trail] == [
        (f"Condition/{cid}/_history/1", "CREATE"), (f"Condition/{cid}/_history/2", "UPDATE"),
        (f"Condition/{cid}/_history/3", "DELETE")]
    author = trail[0]["agent"][0]
    assert author["who"] == {"reference": f"Organization/{world['clinic-a1']}"}
    assert trail[0]["agent"][1]["onBehalfOf"] == {"reference": f"Organization/{world['clinic-a1']}"}
    audits = search(app, "AuditEvent", entity=f"Condition/{cid}")
    assert sorted((e["subtype"][0]["code"], e["action"]) for e in audits) == [
        ("create", "C"), ("delete", "D"), ("update", "U")]
    assert all(f"Patient/{world['p1']}" in whats(e) for e in audits)
    assert all(validate_resource(r) == [] for r in (*trail, *audits))


async def test_a_transaction_leaves_one_record_per_kind_of_write_naming_every_version(
        client: httpx.AsyncClient, world: World, app: FastAPI) -> None:
    clinic = {**world.as_org("clinic-a1"), **FHIR}
    condition = (await client.post("/Condition", headers=clinic, json={
        "resourceType": "Condition", "subject": {"reference": f"Patient/{world['p1']}"}, "code": {"text": "头痛"}})).json()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        *({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": f"体温 {i}"},
                        "subject": {"reference": f"Patient/{world['p1']}"}},
           "request": {"method": "POST", "url": "Observation"}} for i in range(5)),
        {"resource": dict(condition, code={"text": "偏头痛"}),
         "request": {"method": "PUT", "url": f"Condition/{condition['id']}"}},
    ]}
    answer = await client.post("", json=bundle, headers=clinic)
    assert answer.status_code == 200, answer.text
    written = [e["response"]["location"].split("/_history")[0] for e in answer.json()["entry"]]
    drain(app.state.store)

    versions = {f"{ref}/_history/1" for ref in written[:5]} | {f"{written[5]}/_history/2"}
    lineages = {p["id"]: p for ref in written for p in search(app, "Provenance", target=ref)
                if {t["reference"] for t in p["target"]} & versions}
    assert sorted((p["activity"]["coding"][0]["code"], sorted(t["reference"] for t in p["target"]))
                  for p in lineages.values()) == [
        ("CREATE", sorted(f"{ref}/_history/1" for ref in written[:5])), ("UPDATE", [f"{written[5]}/_history/2"])]
    audits = {e["id"]: e for ref in written[:5] for e in search(app, "AuditEvent", entity=ref)}
    assert len(audits) == 1, "one AuditEvent for the five creates"
    [audit] = audits.values()
    assert audit["subtype"][0]["code"] == "create"
    assert {f"{ref}/_history/1" for ref in written[:5]} | {f"Patient/{world['p1']}"} == whats(audit)


async def test_a_failed_transaction_leaves_no_provenance_but_an_audited_failure(
        client: httpx.AsyncClient, world: World, app: FastAPI) -> None:
    new_id = f"tx-{uuid4().hex[:10]}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": new_id,
                      "managingOrganization": {"reference": f"Organization/{world['hosp-b']}"}},
         "request": {"method": "PUT", "url": f"Patient/{new_id}"}},
        {"resource": {"resourceType": "Patient", "id": world["p1"]},
         "request": {"method": "PUT", "url": f"Patient/{world['p1']}"}},
    ]}
    refused = await client.post("", json=bundle, headers={**world.as_org("hosp-b"), **FHIR})
    assert refused.status_code == 403
    with pytest.raises(NotFound):
        app.state.store.read(SYSTEM, "Patient", new_id)
    assert not [r for r in queued(app) if f"Patient/{new_id}/_history" in str(r)]  # rolled back with the write
    drain(app.state.store)
    assert search(app, "Provenance", target=f"Patient/{new_id}") == []
    assert search(app, "AuditEvent", entity=f"Patient/{new_id}") == []
    failures = [e for e in search(app, "AuditEvent", subtype="transaction", outcome="4")
                if any(new_id in q for q in queries(e))]
    assert failures and f"Organization/{world['hosp-b']}" in organizations(failures[0])


def test_audit_records_cannot_be_changed_or_deleted_by_anyone(app: FastAPI) -> None:
    store: ResourceStore = app.state.store
    created = store.create(SYSTEM, audit_event(subtype="read", action="R", status=200, ctx=SYSTEM, entities=[],
                                               recorded=datetime.now(UTC)))
    stored = created.resource.as_dict()
    with pytest.raises(Forbidden):
        store.update(SYSTEM, "AuditEvent", stored["id"], dict(stored, outcome="8"))
    with pytest.raises(Forbidden):
        store.delete(SYSTEM, "AuditEvent", stored["id"])
    assert store.read(SYSTEM, "AuditEvent", stored["id"]).version_id == 1


async def test_audit_records_are_refused_over_rest_too(client: httpx.AsyncClient, app: FastAPI) -> None:
    record = app.state.store.create(SYSTEM, provenance(targets=["Patient/x/_history/1"], activity="CREATE", ctx=SYSTEM,
                                                       recorded=datetime.now(UTC))).resource.as_dict()
    assert (await client.put(f"/Provenance/{record['id']}", json=record, headers=FHIR)).status_code == 403
    assert (await client.delete(f"/Provenance/{record['id']}")).status_code == 403


# -- who may read the audit trail --------------------------------------------------------------------

async def test_only_auditors_see_audit_events_and_only_their_organizations(
        client: httpx.AsyncClient, auth_client: httpx.AsyncClient, token_for, world: World, app: FastAPI) -> None:
    await client.get(f"/Patient/{world['p3']}", headers=world.as_org("hosp-b"))
    await client.get(f"/Patient/{world['p1']}", headers=world.as_org("hosp-a"))
    drain(app.state.store)
    plain = await client.get("/AuditEvent", params={"entity": f"Patient/{world['p1']}"}, headers=world.as_org("hosp-a"))
    assert plain.status_code == 200 and plain.json()["total"] == 0  # an organization's user is no auditor
    auditor = bearer(token_for("system/AuditEvent.rs", organization=f"Organization/{world['hosp-a']}"))
    mine = await auth_client.get("/AuditEvent", params={"entity": f"Patient/{world['p1']}"}, headers=auditor)
    assert mine.status_code == 200 and mine.json()["total"] >= 1
    assert all(f"Organization/{world['hosp-a']}" in organizations(e["resource"]) for e in mine.json()["entry"])
    theirs = await auth_client.get("/AuditEvent", params={"entity": f"Patient/{world['p3']}"}, headers=auditor)
    assert theirs.json()["total"] == 0  # hospital B's reads are B's auditors' business
    desk = bearer(token_for("system/AuditEvent.rs", organization=f"Organization/{world['alliance-a']}"))
    alliance = await auth_client.get("/AuditEvent", params={"entity": f"Patient/{world['p1']}"}, headers=desk)
    assert alliance.json()["total"] >= mine.json()["total"]
    history = await client.get("/_history", params={"_count": "50"}, headers=world.as_org("hosp-a"))
    assert not {e["resource"]["resourceType"] for e in history.json().get("entry", []) if "resource" in e} & {
        "AuditEvent", "Provenance"}


# -- the queue: never lost, never doubled --------------------------------------------------------------

def test_queue_survives_a_failed_drain_and_is_drained_exactly_once(isolated_engine: sa.Engine) -> None:
    marker = f"marker-{uuid4().hex[:8]}"
    events = [audit_event(subtype="read", action="R", status=200, ctx=SYSTEM, entities=[], recorded=datetime.now(UTC),
                          description=f"{marker}-{i}") for i in range(3)]
    good = ResourceStore(isolated_engine)
    failing_hooks = WriteHooks()

    def crash(event: WriteEvent) -> None:
        raise RuntimeError("the database went away while draining")

    failing_hooks.before("AuditEvent", crash)
    queue = AuditQueue(isolated_engine, ResourceStore(isolated_engine, hooks=failing_hooks), drain_interval_ms=0)
    try:
        queue.append_now(events)
        with pytest.raises(RuntimeError):
            queue.drain()
        with isolated_engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(QUEUE)).scalar_one() == 3
        assert drain(good, batch_size=2) == 3
        assert drain(good) == 0
        with isolated_engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(QUEUE)).scalar_one() == 0
        import orjson

        found = orjson.loads(good.search(SYSTEM, "AuditEvent", [("_count", "100")], base_url=""))
        assert sorted(e["resource"]["outcomeDesc"] for e in found["entry"]) == [f"{marker}-{i}" for i in range(3)]
    finally:
        queue.close()


def test_an_explicit_drain_waits_for_a_drain_in_progress_elsewhere(isolated_engine: sa.Engine) -> None:
    """``drain()`` returning means everything queued before it is stored, even while another
    worker's background drain (which skips locked rows) holds some of them."""
    import threading

    import orjson

    marker = f"held-{uuid4().hex[:8]}"
    events = [audit_event(subtype="read", action="R", status=200, ctx=SYSTEM, entities=[], recorded=datetime.now(UTC),
                          description=f"{marker}-{i}") for i in range(3)]
    holding, release = threading.Event(), threading.Event()
    slow_hooks = WriteHooks()

    def linger(event: WriteEvent) -> None:  # the other worker is mid-drain, rows selected
        holding.set()
        release.wait(5)

    slow_hooks.before("AuditEvent", linger)
    other_worker = AuditQueue(isolated_engine, ResourceStore(isolated_engine, hooks=slow_hooks), drain_interval_ms=0)
    good = ResourceStore(isolated_engine)
    try:
        other_worker.append_now(events)
        background = threading.Thread(target=other_worker.drain)
        background.start()
        assert holding.wait(5)
        threading.Timer(0.3, release.set).start()
        drain(good)
        found = orjson.loads(good.search(SYSTEM, "AuditEvent", [("_count", "100")], base_url=""))
        assert sorted(e["resource"]["outcomeDesc"] for e in found.get("entry", [])) == [
            f"{marker}-{i}" for i in range(3)]
        background.join(5)
    finally:
        release.set()
        other_worker.close()


def test_a_sqlite_drain_indexes_outside_the_write_lock_and_stores_nothing_twice(isolated_engine: sa.Engine) -> None:
    """SQLite: a drain reads and indexes its batch before it takes the write lock; what
    another process's drain stored meanwhile it leaves alone, the rest it stores."""
    if is_postgres(isolated_engine):
        pytest.skip("PostgreSQL drains lock their rows (SKIP LOCKED) and index inside the transaction")
    import orjson

    marker = f"twice-{uuid4().hex[:8]}"
    store = ResourceStore(isolated_engine)
    queue = AuditQueue(isolated_engine, store, drain_interval_ms=0)
    try:
        queue.append_now([audit_event(subtype="read", action="R", status=200, ctx=SYSTEM, entities=[],
                                      recorded=datetime.now(UTC), description=f"{marker}-{i}") for i in range(4)])
        mine = prepare_sqlite_batch(store, 2)  # the two oldest, indexed, no lock taken
        assert mine is not None and len(mine.items) == len(mine.indexed) == 2
        with isolated_engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(QUEUE)).scalar_one() == 4
        assert store_sqlite_batch(store, prepare_sqlite_batch(store, 1)) == 1  # another drain takes the oldest
        assert store_sqlite_batch(store, mine) == 1  # only the one still queued
        assert drain(store) == 2
        found = orjson.loads(store.search(SYSTEM, "AuditEvent", [("_count", "100")], base_url=""))
        descriptions = sorted(e["resource"]["outcomeDesc"] for e in found["entry"])
        assert descriptions == [f"{marker}-{i}" for i in range(4)]
        # the precomputed rows made it into the index: the records are found by their tokens
        assert len(search_in(store, "AuditEvent", subtype="read", action="R")) == 4
    finally:
        queue.close()


def search_in(store: ResourceStore, resource_type: str, **params: str) -> list[dict[str, Any]]:
    import orjson

    bundle = orjson.loads(store.search(SYSTEM, resource_type, [*params.items(), ("_count", "1000")], base_url=""))
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


async def test_group_commit_appends_are_durable_when_awaited(isolated_engine: sa.Engine) -> None:
    queue = AuditQueue(isolated_engine, ResourceStore(isolated_engine), drain_interval_ms=0)
    try:
        await asyncio.gather(*(queue.append(audit_event(subtype="read", action="R", status=200, ctx=SYSTEM,
                                                        entities=[], recorded=datetime.now(UTC)))
                               for _ in range(40)))
        with isolated_engine.connect() as conn:  # another connection sees every one of them
            assert conn.execute(sa.select(sa.func.count()).select_from(QUEUE)).scalar_one() == 40
    finally:
        queue.close()


# -- logins and retention ------------------------------------------------------------------------------

def test_logins_are_recorded(app: FastAPI) -> None:
    user = f"desk-{uuid4().hex[:8]}"
    queue = app.state.audit_queue
    record_login(queue, user, True, client_id="desk-app", address="10.0.0.7")
    record_login(queue, AccessContext(client_id="desk-app", user=user), "failure", detail="wrong password")
    drain(app.state.store)
    logins = [e for e in search(app, "AuditEvent", type="110114")
              if any(a["who"].get("identifier", {}).get("value") == user for a in e["agent"])]
    assert sorted(e["outcome"] for e in logins) == ["0", "4"]
    assert all(e["subtype"][0]["code"] == "110122" and e["action"] == "E" for e in logins)


def test_retention_purge_removes_only_old_audit_events(app: FastAPI, engine: sa.Engine) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=400)
    old_store = ResourceStore(engine, clock=lambda: long_ago)
    old = old_store.create(SYSTEM, audit_event(subtype="read", action="R", status=200, ctx=SYSTEM, entities=[],
                                               recorded=long_ago)).resource
    recent = app.state.store.create(SYSTEM, audit_event(subtype="read", action="R", status=200, ctx=SYSTEM,
                                                        entities=[], recorded=datetime.now(UTC))).resource
    assert purge(engine, days=180) >= 1
    with pytest.raises(NotFound):
        app.state.store.read(SYSTEM, "AuditEvent", old.id)
    assert app.state.store.read(SYSTEM, "AuditEvent", recent.id).id == recent.id
    drain(app.state.store)
    assert search(app, "AuditEvent", type="110101")  # the purge itself is on record


def test_audit_commands_are_registered() -> None:
    args = _parser().parse_args(["audit", "purge", "--days", "365"])
    assert args.days == 365 and args.run.__name__ == "_purge"
    assert _parser().parse_args(["audit", "drain"]).run.__name__ == "_drain"


async def test_a_read_that_cannot_be_recorded_is_not_answered(tmp_path: Path, settings) -> None:
    """Fail closed: when the audit queue cannot be written, the data does not leave (503)."""
    from fastapi import FastAPI as App
    from fastapi.responses import Response

    from service.security.audit import PrivacyMiddleware
    from service.security.policy import BoundaryPolicy

    unmigrated = create_engine(f"sqlite:///{tmp_path / 'no-audit-table.db'}")
    queue = AuditQueue(unmigrated, ResourceStore(unmigrated), drain_interval_ms=0)
    app = App()

    @app.get("/fhir/Patient/{resource_id}")
    def read(resource_id: str) -> Response:  # named like the REST handler it stands for
        return Response(b'{"resourceType":"Patient","id":"secret"}', media_type="application/fhir+json")

    app.add_middleware(PrivacyMiddleware, queue=queue, policy=BoundaryPolicy(settings))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            response = await http.get("/fhir/Patient/secret")
        assert response.status_code == 503
        assert response.json()["resourceType"] == "OperationOutcome" and "secret" not in response.text
    finally:
        queue.close()
        unmigrated.dispose()


async def test_writes_alone_are_drained_in_the_background(isolated_engine: sa.Engine, settings) -> None:
    """A server that only receives writes still turns their queued records into resources."""
    from service.app import create_app

    app = create_app(settings.model_copy(update={"audit_drain_interval_ms": 50}), engine=isolated_engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver/fhir") as http:
        created = await http.post("/Basic", json={"resourceType": "Basic", "code": {"text": "x"}}, headers=FHIR)
        assert created.status_code == 201
        target = f"Basic/{created.json()['id']}"
        await app.state.audit_queue.settled()  # no explicit drain: the scheduled one has run
    with isolated_engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(QUEUE)).scalar_one() == 0
    store = ResourceStore(isolated_engine)
    import orjson

    found = orjson.loads(store.search(SYSTEM, "Provenance", [("target", target)], base_url=""))
    assert found.get("total") == 1
    app.state.audit_queue.close()
