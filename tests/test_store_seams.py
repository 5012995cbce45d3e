"""The seams domain packages and the security package plug into: write hooks, the outbox
and the access policy — on every write path, inside the write's own transaction."""

from __future__ import annotations

from uuid import uuid4

import pytest
import sqlalchemy as sa

from service.fhir import bundles, tables
from service.fhir.access import AccessContext
from service.fhir.errors import Forbidden, NotFound, Unprocessable
from service.fhir.hooks import WriteEvent, WriteHooks
from service.fhir.store import ResourceStore

CALLER = AccessContext(client_id="test", organization="Organization/clinic-a")


def _outbox_topics(engine: sa.Engine, marker: str) -> list[str]:
    outbox = tables.OutboxEvent.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.c.topic, outbox.c.payload)).all()
    return [topic for topic, payload in rows if payload.get("marker") == marker]


def _hooked_store(engine: sa.Engine) -> ResourceStore:
    hooks = WriteHooks()

    def refuse_robots(event: WriteEvent) -> None:
        if event.resource and event.resource.get("gender") == "other" and event.method != "POST":
            raise Unprocessable("gender may not change to other here", expression="Patient.gender")

    def follow_up(event: WriteEvent) -> None:
        marker = (event.resource or event.previous or {}).get("name", [{}])[0].get("text", "")
        event.tx.emit("patient-changed", {"marker": marker, "method": event.method, "id": event.resource_id})
        if event.method == "POST":
            event.tx.create({"resourceType": "Flag", "status": "active", "code": {"text": marker},
                             "subject": {"reference": f"Patient/{event.resource_id}"}})

    hooks.before("Patient", refuse_robots)
    hooks.after("Patient", follow_up)
    return ResourceStore(engine, hooks=hooks)


def test_after_hook_writes_and_emits_in_the_same_transaction(engine: sa.Engine) -> None:
    store = _hooked_store(engine)
    marker = f"m-{uuid4().hex[:8]}"
    created = store.create(CALLER, {"resourceType": "Patient", "name": [{"text": marker}]})
    assert _outbox_topics(engine, marker) == ["patient-changed"]
    flags = store.search(CALLER, "Flag", [("subject", f"Patient/{created.resource.id}")], base_url="")
    assert marker.encode() in flags


def test_refused_write_rolls_back_everything_including_outbox(engine: sa.Engine) -> None:
    store = _hooked_store(engine)
    marker = f"m-{uuid4().hex[:8]}"
    created = store.create(CALLER, {"resourceType": "Patient", "name": [{"text": marker}]}).resource.as_dict()
    with pytest.raises(Unprocessable):
        store.update(CALLER, "Patient", created["id"], dict(created, gender="other"))
    assert store.read(CALLER, "Patient", created["id"]).version_id == 1
    assert _outbox_topics(engine, marker) == ["patient-changed"]  # only the create's event


def test_hooks_run_inside_transaction_bundles_too(engine: sa.Engine) -> None:
    store = _hooked_store(engine)
    marker = f"m-{uuid4().hex[:8]}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"text": marker}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": "robot"}, "request": {"method": "POST", "url": "Patient"}},
    ]}
    with pytest.raises(Unprocessable):
        bundles.process_bundle(store, CALLER, bundle, base_url="")
    assert _outbox_topics(engine, marker) == []


class _OnlyOwnOrganization:
    """A toy policy: Patients are visible only when managed by the caller's organization,
    and nobody may delete."""

    def authorize(self, ctx, interaction, resource_type):  # type: ignore[no-untyped-def]
        if interaction == "delete":
            raise Forbidden("no deletes")

    def visible(self, ctx, resource_type, type_col, id_col):  # type: ignore[no-untyped-def]
        ref = tables.ReferenceIndex.__table__
        org_type, _, org_id = (ctx.organization or "/").partition("/")
        return sa.exists().where(ref.c.resource_type == type_col, ref.c.resource_id == id_col,
                                 ref.c.param == "organization", ref.c.target_type == org_type,
                                 ref.c.target_id == org_id)

    def check_write(self, ctx, resource_type, resource, previous):  # type: ignore[no-untyped-def]
        target = (resource or previous or {}).get("managingOrganization", {}).get("reference")
        if target != ctx.organization:
            raise Forbidden(f"{ctx.organization} may not write patients of {target}")


def test_access_policy_limits_reads_searches_and_writes(engine: sa.Engine) -> None:
    store = ResourceStore(engine, policy=_OnlyOwnOrganization())
    clinic_a = AccessContext(client_id="a", organization="Organization/clinic-a")
    clinic_b = AccessContext(client_id="b", organization="Organization/clinic-b")
    marker = f"m{uuid4().hex[:8]}"
    body = {"resourceType": "Patient", "name": [{"family": marker}],
            "managingOrganization": {"reference": "Organization/clinic-a"}}
    mine = store.create(clinic_a, body).resource
    assert store.read(clinic_a, "Patient", mine.id).id == mine.id
    with pytest.raises(NotFound):  # 404, not 403: existence is not revealed
        store.read(clinic_b, "Patient", mine.id)
    with pytest.raises(NotFound):
        store.vread(clinic_b, "Patient", mine.id, 1)
    assert mine.id.encode() in store.search(clinic_a, "Patient", [("family", marker)], base_url="")
    assert mine.id.encode() not in store.search(clinic_b, "Patient", [("family", marker)], base_url="")
    with pytest.raises(Forbidden):
        store.create(clinic_b, body)
    with pytest.raises(Forbidden):
        store.delete(clinic_a, "Patient", mine.id)
    internal = AccessContext.internal()
    assert store.read(internal, "Patient", mine.id).id == mine.id


def test_hooks_that_read_the_store_see_earlier_creates_of_the_same_bundle(engine: sa.Engine) -> None:
    """A referral-like hook looks its Patient up; the Patient is created in the same Bundle,
    after it in entry order. Plain creates are written first, ordered ones after."""
    hooks = WriteHooks()
    seen: list[str] = []

    def needs_subject(event: WriteEvent) -> None:
        subject = (event.resource or {})["subject"]["reference"]
        stored = event.tx.read(*subject.split("/"))
        seen.append(stored.as_dict()["name"][0]["text"])

    hooks.before("ServiceRequest", needs_subject)
    store = ResourceStore(engine, hooks=hooks)
    marker = f"m-{uuid4().hex[:8]}"
    patient_url = f"urn:uuid:{uuid4()}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                      "subject": {"reference": patient_url}},
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": patient_url, "resource": {"resourceType": "Patient", "name": [{"text": marker}]},
         "request": {"method": "POST", "url": "Patient"}},
    ]}
    bundles.process_bundle(store, CALLER, bundle, base_url="")
    assert seen == [marker]


def test_reference_content_gives_each_caller_a_copy_and_forgets_what_the_transaction_writes(engine: sa.Engine) -> None:
    store = ResourceStore(engine)
    system = AccessContext.internal("test")
    org_id = f"org-{uuid4().hex[:8]}"
    store.update(system, "Organization", org_id, {"resourceType": "Organization", "id": org_id, "name": "旧名"})
    with store.write(system) as tx:
        assert tx.reference_content("Organization", org_id)["name"] == "旧名"
        first = tx.reference_content("Organization", org_id)
        first["name"] = "被调用方改了"  # callers get their own copy
        assert tx.reference_content("Organization", org_id)["name"] == "旧名"
        tx.as_system("hook").update("Organization", org_id, {"resourceType": "Organization", "id": org_id,
                                                             "name": "新名"})
        assert tx.reference_content("Organization", org_id)["name"] == "新名", "a write forgets the old copy"
        new_id = f"org-{uuid4().hex[:8]}"
        assert tx.reference_content("Organization", new_id) is None
        tx.create_many([({"resourceType": "Organization", "name": "后来的"}, new_id)])
        assert tx.reference_content("Organization", new_id)["name"] == "后来的"


def test_referrers_finds_what_points_at_a_resource_whoever_may_see_it(engine: sa.Engine) -> None:
    """The workflow's look-up ("the Task of this referral"): every live referrer, relative or
    absolute, whatever the caller's boundary hides from ``find``; never a deleted one."""
    store = ResourceStore(engine, policy=_OnlyOwnOrganization())
    system = AccessContext.internal()
    clinic_b = AccessContext(client_id="b", organization="Organization/clinic-b")
    target = f"ServiceRequest/{uuid4().hex}"

    def task(focus: str) -> str:
        return store.create(system, {"resourceType": "Task", "status": "requested", "intent": "order",
                                     "focus": {"reference": focus}}).resource.id

    relative, absolute, gone = task(target), task(f"https://elsewhere.example/fhir/{target}"), task(target)
    task(f"ServiceRequest/{uuid4().hex}")  # points elsewhere
    store.delete(system, "Task", gone)
    with store.write(clinic_b) as tx:
        assert tx.find("Task", f"focus={target}", limit=10) == []  # clinic B may see none of them
        assert sorted(tx.referrers("Task", "focus", target)) == sorted([relative, absolute])
        assert tx.referrers("Task", "focus", target, limit=1) == [min(relative, absolute)]
        assert tx.referrers("Task", "based-on", target) == []


def test_two_puts_to_the_same_new_id_one_creates_the_other_updates(engine: sa.Engine) -> None:
    """Both looked before either committed: the second waits for the first, then finds the
    id taken and becomes an update (version 2). It once failed on the unique version key (a
    500) on PostgreSQL; SQLite's serial write transactions make it wait at BEGIN instead."""
    import threading
    import time

    store = ResourceStore(engine)
    system = AccessContext.internal()
    pid = uuid4().hex
    outcome: dict[str, object] = {}

    def second() -> None:
        try:
            outcome["result"] = store.update(system, "Patient", pid, {"resourceType": "Patient", "id": pid,
                                                                      "name": [{"family": "后到"}]})
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            outcome["error"] = exc

    with store.write(system) as tx:
        created = tx.update("Patient", pid, {"resourceType": "Patient", "id": pid, "name": [{"family": "先到"}]})
        assert created.created
        racer = threading.Thread(target=second)
        racer.start()
        time.sleep(0.5)  # the second PUT is now waiting on this uncommitted create
    racer.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.resource.version_id == 2 and not result.created  # type: ignore[attr-defined]
    assert store.read(system, "Patient", pid).as_dict()["name"][0]["family"] == "后到"
    version = tables.ResourceVersion.__table__
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(version.c.id == pid)).scalar_one() == 2


def test_locked_state_reads_what_update_would_and_update_known_writes_the_next_version(engine: sa.Engine) -> None:
    """``locked_state`` + ``update(known=...)``: one locking read instead of two (the Slot a
    booking re-versions); the write and its hooks see exactly what a plain update sees."""
    seen: list[dict | None] = []
    hooks = WriteHooks()
    hooks.before("Patient", lambda event: seen.append(event.previous))
    store = ResourceStore(engine, hooks=hooks)
    system = AccessContext.internal("test")
    pid = store.create(system, {"resourceType": "Patient", "gender": "female"}).resource.id
    store.update(system, "Patient", pid, {"resourceType": "Patient", "id": pid, "gender": "male"})
    with store.write(system) as tx:
        state = tx.locked_state("Patient", pid)
        assert state is not None and (state.version_id, state.deleted) == (2, False)
        assert state.content is not None and state.content["gender"] == "male"
        if engine.dialect.name == "postgresql":  # the row is locked until this transaction ends
            with engine.connect() as other, pytest.raises(sa.exc.OperationalError, match="could not obtain lock"):
                other.execute(sa.text("SELECT 1 FROM resource WHERE resource_type = 'Patient' AND id = :i "
                                      "FOR UPDATE NOWAIT"), {"i": pid})
        written = tx.update("Patient", pid, dict(state.content, gender="other"), known=state)
    assert written.resource.version_id == 3 and not written.created
    assert seen[-1] is not None and seen[-1]["gender"] == "male"
    assert store.read(system, "Patient", pid).as_dict()["gender"] == "other"
    store.delete(system, "Patient", pid)
    with store.write(system) as tx:
        gone = tx.locked_state("Patient", pid)
        assert gone is not None and gone.deleted and gone.content is None
        assert tx.locked_state("Patient", "no-such-patient") is None


def test_prefetch_reads_references_and_their_chain_into_the_transactions_memory(engine: sa.Engine) -> None:
    """One statement for the organization, its ``partOf`` ancestors and the other references
    an operation will consult; later look-ups in the transaction are answered from memory."""
    store = ResourceStore(engine)
    system = AccessContext.internal("test")
    top, middle, leaf, other = (f"org-{uuid4().hex[:8]}" for _ in range(4))
    for org_id, parent in ((top, None), (middle, top), (leaf, middle), (other, None)):
        org = {"resourceType": "Organization", "id": org_id, "name": f"名-{org_id}"}
        if parent:
            org["partOf"] = {"reference": f"Organization/{parent}"}
        store.update(system, "Organization", org_id, org)
    missing = f"org-{uuid4().hex[:8]}"
    with store.read_only(system) as tx:
        tx.prefetch([f"Organization/{leaf}", f"Organization/{missing}", None, "not-a-reference"], follow="partof")
        with engine.begin() as elsewhere:  # changed after the prefetch: the transaction keeps what it read
            for org_id in (top, middle, leaf):
                elsewhere.execute(sa.text("UPDATE resource_version SET content = CAST(:c AS " +
                                          ("jsonb" if engine.dialect.name == "postgresql" else "text") + ") "
                                          "WHERE seq = (SELECT seq FROM resource WHERE resource_type = 'Organization' "
                                          "AND id = :i)"),
                                  {"c": f'{{"resourceType": "Organization", "id": "{org_id}", "name": "改了"}}',
                                   "i": org_id})
        names = [tx.reference_content("Organization", org_id)["name"] for org_id in (leaf, middle, top)]
        assert names == [f"名-{leaf}", f"名-{middle}", f"名-{top}"]  # the chain came with the leaf
        assert tx.reference_content("Organization", missing) is None
        assert tx.reference_content("Organization", other)["name"] == f"名-{other}"  # not asked for: read now
