"""Finding, holding, booking, cancelling and releasing reserved capacity (R22, R23, R24, R32),
with beds, the report, the CLI and the scheduler's lease. The clock is the store's: tests
move it instead of waiting."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from service.capacity.release import acquire_lease, expire_holds, release_due, run_once
from service.capacity.tables import EVENTS, POLICIES
from tests.test_capacity_support import (  # noqa: F401  (fixtures)
    CARDIOLOGY,
    CLINIC,
    HOSPITAL,
    OTHER_CLINIC,
    capacity_app,
    clinic,
    clock,
    http,
    new_patient,
    parameters,
    pools,
    publish_day,
    referred_patient,
    slot_start,
    store,
    tag_pool,
    unit,
    upward_referral,
)

ADMIN = "http://testserver/admin/capacity"


@pytest.fixture(autouse=True)
def no_policy_overrides(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(POLICIES.delete())


async def find(http, headers=None, **values):  # type: ignore[no-untyped-def]
    response = await http.post("/Appointment/$find", headers=headers or {}, json=parameters(**values))
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", [])]


def slot_of(appointment: dict) -> str:
    return appointment["slot"][0]["reference"]


# -- who may use the reserved pool (R22) ---------------------------------------------------------

async def test_r22_clinic_of_the_alliance_with_referred_patient_sees_reserved_first(http, engine) -> None:
    schedule_id, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    proposals = await find(http, clinic(), patient=patient, referral=referral, organization=CARDIOLOGY, _count=100)
    mine = [p for p in proposals if slot_of(p).startswith(f"Slot/{schedule_id}")]
    assert [tag_pool(p) for p in mine[:3]] == ["reserved"] * 3
    assert [slot_of(p) for p in mine[:3]] == [f"Slot/{slots[i]}" for i in (0, 4, 8)]
    assert len(mine) == 10
    first = mine[0]
    assert first["status"] == "proposed" and first["basedOn"] == [{"reference": referral}]
    assert {"reference": patient} in [p["actor"] for p in first["participant"]]


async def test_r22_public_caller_sees_and_books_the_general_pool_only(http) -> None:
    schedule_id, slots = await publish_day(http, 10)
    patient = await new_patient(http)
    proposals = await find(http, patient=patient, organization=CARDIOLOGY, _count=100)
    mine = [p for p in proposals if slot_of(p).startswith(f"Slot/{schedule_id}")]
    assert len(mine) == 7 and {tag_pool(p) for p in mine} == {"general"}
    refused = await http.post("/Appointment/$book", json=parameters(slot=f"Slot/{slots[0]}", patient=patient))
    assert refused.status_code == 403
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert "R22" in refused.json()["issue"][0]["diagnostics"]
    booked = await http.post("/Appointment/$book", json=parameters(slot=f"Slot/{slots[1]}", patient=patient))
    assert booked.status_code == 200 and booked.json()["status"] == "booked"


async def test_r22_clinic_of_another_alliance_gets_the_general_pool_only(http, engine) -> None:
    schedule_id, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine, managed_by=OTHER_CLINIC)
    proposals = await find(http, clinic(OTHER_CLINIC), patient=patient, referral=referral, organization=CARDIOLOGY,
                           _count=100)
    assert {tag_pool(p) for p in proposals if slot_of(p).startswith(f"Slot/{schedule_id}")} == {"general"}
    refused = await http.post("/Appointment/$book", headers=clinic(OTHER_CLINIC),
                              json=parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral))
    assert refused.status_code == 403 and "R22" in refused.json()["issue"][0]["diagnostics"]
    general = await http.post("/Appointment/$book", headers=clinic(OTHER_CLINIC),
                              json=parameters(slot=f"Slot/{slots[1]}", patient=patient, referral=referral))
    assert general.status_code == 200, general.text


async def test_r22_clinic_booking_for_a_patient_without_upward_referral_gets_general_only(http, engine) -> None:
    schedule_id, slots = await publish_day(http, 10)
    patient = await new_patient(http)
    await upward_referral(engine, patient, direction="down")  # a downward referral does not count
    await upward_referral(engine, patient, status="completed")  # nor a finished one
    proposals = await find(http, clinic(), patient=patient, organization=CARDIOLOGY, _count=100)
    assert {tag_pool(p) for p in proposals if slot_of(p).startswith(f"Slot/{schedule_id}")} == {"general"}
    refused = await http.post("/Appointment/$book", headers=clinic(),
                              json=parameters(slot=f"Slot/{slots[0]}", patient=patient))
    assert refused.status_code == 403 and "R22" in refused.json()["issue"][0]["diagnostics"]


async def test_r22_a_named_referral_that_is_not_an_active_upward_one_is_refused(http, engine) -> None:
    patient = await new_patient(http)
    finished = await upward_referral(engine, patient, status="completed")
    response = await http.post("/Appointment/$find", headers=clinic(),
                               json=parameters(patient=patient, referral=finished))
    assert response.status_code == 422
    assert "not an active upward referral" in response.json()["issue"][0]["diagnostics"]


async def test_r22_the_hospital_itself_is_not_a_grassroots_institution(http, engine) -> None:
    schedule_id, _ = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    proposals = await find(http, clinic(HOSPITAL), patient=patient, referral=referral, organization=CARDIOLOGY,
                           _count=100)
    assert {tag_pool(p) for p in proposals if slot_of(p).startswith(f"Slot/{schedule_id}")} == {"general"}


async def test_r22_plain_rest_appointment_on_a_reserved_slot_obeys_the_same_rules(http, engine) -> None:
    _, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    appointment = {"resourceType": "Appointment", "status": "booked", "slot": [{"reference": f"Slot/{slots[0]}"}],
                   "start": slot_start(0).isoformat(), "end": (slot_start(0) + timedelta(minutes=15)).isoformat(),
                   "participant": [{"actor": {"reference": patient}, "status": "accepted"}]}
    assert (await http.post("/Appointment", json=appointment)).status_code == 403
    with_referral = dict(appointment, basedOn=[{"reference": referral}])
    created = await http.post("/Appointment", headers=clinic(), json=with_referral)
    assert created.status_code == 201, created.text
    assert tag_pool(created.json()) == "reserved"
    again = await http.post("/Appointment", headers=clinic(), json=with_referral)
    assert again.status_code == 409  # no double booking on any path
    assert unit(engine, f"Slot/{slots[0]}")["appointment_id"] == created.json()["id"]


# -- hold, book, cancel (R32) --------------------------------------------------------------------

async def test_r32_hold_then_book_moves_slot_to_busy_tentative_then_busy(http, engine) -> None:
    _, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    proposal = (await find(http, clinic(), patient=patient, referral=referral, organization=CARDIOLOGY))[0]
    held = await http.post("/Appointment/$hold", headers=clinic(), json=parameters(appointment=proposal))
    assert held.status_code == 200, held.text
    assert held.json()["status"] == "pending"
    slot = (await http.get(f"/{slot_of(proposal)}")).json()
    assert slot["status"] == "busy-tentative" and tag_pool(slot) == "reserved"
    assert unit(engine, slot_of(proposal))["held_until"] is not None

    booked = await http.post("/Appointment/$book", headers=clinic(),
                             json=parameters(appointment_id=f"Appointment/{held.json()['id']}"))
    assert booked.status_code == 200, booked.text
    assert booked.json()["status"] == "booked" and booked.json()["id"] == held.json()["id"]
    assert (await http.get(f"/{slot_of(proposal)}")).json()["status"] == "busy"
    row = unit(engine, slot_of(proposal))
    assert (row["status"], row["booked_pool"], row["booked_by"]) == ("busy", "reserved", CLINIC)


async def test_r32_a_second_booking_of_the_same_slot_gets_409_with_an_operation_outcome(http, engine) -> None:
    _, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    first = await http.post("/Appointment/$book", headers=clinic(),
                            json=parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral))
    assert first.status_code == 200
    second = await http.post("/Appointment/$book", headers=clinic(),
                             json=parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral))
    assert second.status_code == 409
    assert second.json()["issue"][0]["code"] == "conflict"
    held = await http.post("/Appointment/$hold", json=parameters(slot=f"Slot/{slots[1]}", patient=patient))
    assert held.status_code == 200
    other = await http.post("/Appointment/$book", json=parameters(slot=f"Slot/{slots[1]}", patient=patient))
    assert other.status_code == 409  # held is taken too


async def test_r32_hold_expires_after_hold_ttl_slot_free_again_and_appointment_cancelled(http, engine, store,
                                                                                       clock) -> None:
    _, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    held = (await http.post("/Appointment/$hold", headers=clinic(),
                            json=parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral))).json()
    clock.advance(minutes=9)
    expire_holds(store)
    assert unit(engine, f"Slot/{slots[0]}")["status"] == "held"
    clock.advance(minutes=1)
    assert expire_holds(store) >= 1
    assert expire_holds(store) == 0  # idempotent
    row = unit(engine, f"Slot/{slots[0]}")
    assert (row["status"], row["pool"], row["appointment_id"]) == ("free", "reserved", None)
    appointment = (await http.get(f"/Appointment/{held['id']}")).json()
    assert appointment["status"] == "cancelled" and "hold expired" in appointment["cancelationReason"]["text"]
    assert (await http.get(f"/Slot/{slots[0]}")).json()["status"] == "free"
    late = await http.post("/Appointment/$book", headers=clinic(),
                           json=parameters(appointment_id=f"Appointment/{held['id']}"))
    assert late.status_code == 409


async def test_r32_booking_a_hold_after_its_ttl_before_the_sweep_is_refused(http, clock) -> None:
    _, slots = await publish_day(http, 10)
    patient = await new_patient(http)
    held = (await http.post("/Appointment/$hold", json=parameters(slot=f"Slot/{slots[1]}", patient=patient))).json()
    clock.advance(minutes=11)
    late = await http.post("/Appointment/$book", json=parameters(appointment_id=f"Appointment/{held['id']}"))
    assert late.status_code == 409 and "expired" in late.json()["issue"][0]["diagnostics"]


async def test_r23_cancellation_before_release_returns_the_slot_to_the_reserved_pool(http, engine) -> None:
    _, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    booked = (await http.post("/Appointment/$book", headers=clinic(),
                              json=parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral))).json()
    cancelled = await http.post(f"/Appointment/{booked['id']}/$cancel", headers=clinic(),
                                json=parameters(reason="patient recovered"))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    row = unit(engine, f"Slot/{slots[0]}")
    assert (row["status"], row["pool"], row["released_at"]) == ("free", "reserved", None)
    slot = (await http.get(f"/Slot/{slots[0]}")).json()
    assert slot["status"] == "free" and tag_pool(slot) == "reserved"


async def test_r23_cancellation_after_release_time_returns_the_slot_to_general(http, engine, clock) -> None:
    _, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    booked = (await http.post("/Appointment/$book", headers=clinic(),
                              json=parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral))).json()
    clock.set(slot_start(0) - timedelta(hours=2))  # release_before (24 h) has passed
    booked["status"] = "cancelled"
    response = await http.put(f"/Appointment/{booked['id']}", headers=clinic(), json=booked)  # cancel by PUT
    assert response.status_code == 200, response.text
    row = unit(engine, f"Slot/{slots[0]}")
    assert (row["status"], row["pool"], row["assigned_pool"]) == ("free", "general", "reserved")
    assert row["released_at"] is not None
    assert tag_pool((await http.get(f"/Slot/{slots[0]}")).json()) == "general"


async def test_r23_cancellation_by_json_patch_frees_the_slot(http, engine) -> None:
    _, slots = await publish_day(http, 10)
    patient = await new_patient(http)
    booked = (await http.post("/Appointment/$book", json=parameters(slot=f"Slot/{slots[1]}", patient=patient))).json()
    patched = await http.patch(f"/Appointment/{booked['id']}", headers={"Content-Type": "application/json-patch+json"},
                               content=b'[{"op": "replace", "path": "/status", "value": "cancelled"}]')
    assert patched.status_code == 200, patched.text
    row = unit(engine, f"Slot/{slots[1]}")
    assert (row["status"], row["pool"]) == ("free", "general")
    reactivated = dict(patched.json(), status="booked")
    assert (await http.put(f"/Appointment/{booked['id']}", json=reactivated)).status_code == 409


# -- release (R23) -------------------------------------------------------------------------------

async def test_r23_unbooked_reserved_slots_are_released_at_start_minus_release_before(http, engine, store,
                                                                                    clock) -> None:
    schedule_id, slots = await publish_day(http, 10)
    release_time = slot_start(0) - timedelta(hours=24)
    clock.set(release_time - timedelta(minutes=1))
    release_due(store)
    assert pools(engine, slots)[0] == "reserved"
    clock.set(release_time)
    assert release_due(store) >= 1
    assert pools(engine, slots)[0] == "general"
    assert pools(engine, slots)[4] == "reserved"  # 09:00: its release time has not come yet
    assert release_due(store) == 0  # idempotent
    history = (await http.get(f"/Slot/{slots[0]}/_history")).json()
    assert [tag_pool(e["resource"]) for e in history["entry"]] == ["general", "reserved"]  # newest first
    with engine.connect() as conn:
        events = conn.execute(sa.select(EVENTS.c.event).where(EVENTS.c.ref == f"Slot/{slots[0]}")).scalars().all()
    assert events.count("released") == 1
    patient = await new_patient(http)
    proposals = await find(http, patient=patient, organization=CARDIOLOGY, _count=100)
    assert f"Slot/{slots[0]}" in [slot_of(p) for p in proposals if p["slot"][0]["reference"].startswith(
        f"Slot/{schedule_id}")]
    public = await http.post("/Appointment/$book", json=parameters(slot=f"Slot/{slots[0]}", patient=patient))
    assert public.status_code == 200


async def test_r23_release_run_twice_releases_once(http, engine, store, clock) -> None:
    _, slots = await publish_day(http, 10)
    clock.set(slot_start(9) - timedelta(hours=23))
    first = run_once(store)
    second = run_once(store)
    assert first.released >= 3 and second.released == 0
    with engine.connect() as conn:
        released = conn.execute(sa.select(sa.func.count()).select_from(EVENTS).where(
            EVENTS.c.event == "released", EVENTS.c.ref.in_([f"Slot/{s}" for s in slots]))).scalar()
    assert released == 3


def test_r23_release_lease_is_held_by_one_worker_until_it_expires(engine, clock) -> None:
    name = f"test-lease-{clock.now.timestamp()}"
    now = clock()
    assert acquire_lease(engine, name, "worker-a", now, timedelta(seconds=30))
    assert not acquire_lease(engine, name, "worker-b", now + timedelta(seconds=10), timedelta(seconds=30))
    assert acquire_lease(engine, name, "worker-a", now + timedelta(seconds=20), timedelta(seconds=30))  # renew
    assert not acquire_lease(engine, name, "worker-b", now + timedelta(seconds=45), timedelta(seconds=30))
    assert acquire_lease(engine, name, "worker-b", now + timedelta(seconds=51), timedelta(seconds=30))


async def test_r23_scheduler_tick_uses_the_app_clock_and_the_lease(http, engine, store, clock) -> None:
    from service.capacity.release import LEASE_NAME, Scheduler
    from service.capacity.tables import LEASES

    with engine.begin() as conn:
        conn.execute(LEASES.delete().where(LEASES.c.name == LEASE_NAME))
    _, slots = await publish_day(http, 4)
    clock.set(slot_start(0) - timedelta(hours=23))
    first, second = Scheduler(store, interval=30), Scheduler(store, interval=30)
    assert first.tick() is not None
    assert second.tick() is None  # the lease is first's
    assert pools(engine, slots)[0] == "general"


def test_r23_cli_release_now_runs_once(engine, database_url, capacity_app, monkeypatch, capsys) -> None:
    from service import cli
    from service.config import get_settings

    monkeypatch.setenv("YILIAN_DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        assert cli.main(["capacity", "release", "--now"]) == 0
        assert cli.main(["capacity", "release", "--at", "2026-03-02T08:00:00+08:00"]) == 0
    finally:
        get_settings.cache_clear()
    assert "released" in capsys.readouterr().out


# -- beds (R21, R24) -----------------------------------------------------------------------------

def bed(bed_id: str, ward: str, status: str = "U") -> dict:
    return {"resourceType": "Location", "id": bed_id, "status": "active", "mode": "instance", "name": f"床位 {bed_id}",
            "physicalType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/location-physical-type",
                                         "code": "bd"}]},
            "operationalStatus": {"system": "http://terminology.hl7.org/CodeSystem/v2-0116", "code": status},
            "partOf": {"reference": f"Location/{ward}"},
            "managingOrganization": {"reference": "Organization/dept-yq1-cardiology"}}


async def publish_ward(http, n: int = 8) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    from uuid import uuid4

    ward = f"ward-{uuid4().hex[:8]}"
    entries = [{"resource": {"resourceType": "Location", "id": ward, "status": "active", "name": "心内科病区",
                             "physicalType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                                    "location-physical-type", "code": "wa"}]},
                             "managingOrganization": {"reference": "Organization/dept-yq1-cardiology"}},
                "request": {"method": "PUT", "url": f"Location/{ward}"}}]
    beds = [f"{ward}-bed-{i}" for i in range(n)]
    entries += [{"resource": bed(b, ward), "request": {"method": "PUT", "url": f"Location/{b}"}} for b in beds]
    response = await http.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert response.status_code == 200, response.text
    return ward, beds


async def test_r21_a_quarter_of_a_wards_beds_is_reserved_and_tagged(http, engine) -> None:
    ward, beds = await publish_ward(http, 8)
    with engine.connect() as conn:
        from service.capacity.tables import SLOTS

        rows = conn.execute(sa.select(SLOTS.c.ref, SLOTS.c.pool, SLOTS.c.kind, SLOTS.c.organization)
                            .where(SLOTS.c.group_ref == f"Location/{ward}")).all()
    assert len(rows) == 8 and sum(r.pool == "reserved" for r in rows) == 2
    assert {r.kind for r in rows} == {"bed"} and {r.organization for r in rows} == {HOSPITAL}
    found = (await http.get("/Location", params={"partof": f"Location/{ward}", "pool": "reserved"})).json()
    assert found["total"] == 2


async def test_r24_referred_patient_books_a_reserved_bed_for_admission_and_discharge_frees_it(http, engine) -> None:
    ward, beds = await publish_ward(http, 4)
    patient, referral = await referred_patient(http, engine)
    admission = "2026-03-02T08:00:00+08:00"
    proposals = await find(http, clinic(), patient=patient, referral=referral, organization=HOSPITAL,
                           service_category="inpatient", start=admission, _count=100)
    mine = [p for p in proposals if any(pp["actor"]["reference"].startswith(f"Location/{ward}")
                                        for pp in p["participant"])]
    assert len(mine) == 4 and tag_pool(mine[0]) == "reserved"
    assert mine[0]["serviceCategory"][0]["coding"][0]["code"] == "inpatient"
    booked = await http.post("/Appointment/$book", headers=clinic(), json=parameters(appointment=mine[0]))
    assert booked.status_code == 200, booked.text
    bed_ref = next(p["actor"]["reference"] for p in booked.json()["participant"]
                   if p["actor"]["reference"].startswith("Location/"))
    assert unit(engine, bed_ref)["status"] == "busy"
    public = await new_patient(http)
    again = await http.post("/Appointment/$book", json=parameters(bed=bed_ref, patient=public, start=admission))
    assert again.status_code == 409
    # the HIS admits (O) and later discharges (U) the patient: the bed is the ward's reserved bed again
    bed_id = bed_ref.split("/")[1]
    for status in ("O", "U"):
        response = await http.put(f"/Location/{bed_id}", json=bed(bed_id, ward, status))
        assert response.status_code == 200, response.text
    row = unit(engine, bed_ref)
    assert (row["status"], row["pool"], row["appointment_id"]) == ("free", "reserved", None)


async def test_r23_a_reserved_bed_left_empty_is_released_after_bed_release_after(http, engine, store, clock) -> None:
    ward, beds = await publish_ward(http, 4)
    reserved = [b for b in beds if unit(engine, f"Location/{b}")["pool"] == "reserved"]
    assert len(reserved) == 1
    clock.advance(hours=23)
    release_due(store)
    assert unit(engine, f"Location/{reserved[0]}")["pool"] == "reserved"
    clock.advance(hours=1)
    release_due(store)
    assert unit(engine, f"Location/{reserved[0]}")["pool"] == "general"
    assert tag_pool((await http.get(f"/Location/{reserved[0]}")).json()) == "general"


# -- the report ----------------------------------------------------------------------------------

async def test_r20_report_counts_published_reserved_booked_released_and_expired(http, engine, store, clock) -> None:
    from datetime import date

    day = date(2026, 3, 9)
    await http.put(f"{ADMIN}/policy/HealthcareService/hcs-yq1-rehabilitation", json={"specialist_reserved_share": 0.25})
    _, slots = await publish_day(http, 8, day=day, actor="PractitionerRole/spec-yq1-rehabilitation-1")
    patient, referral = await referred_patient(http, engine)
    public = await new_patient(http)
    ok = [await http.post("/Appointment/$book", headers=clinic(),
                          json=parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral)),
          await http.post("/Appointment/$book", json=parameters(slot=f"Slot/{slots[1]}", patient=public)),
          await http.post("/Appointment/$hold", json=parameters(slot=f"Slot/{slots[2]}", patient=public))]
    assert [r.status_code for r in ok] == [200, 200, 200]
    clock.advance(minutes=30)
    expire_holds(store)
    clock.set(slot_start(7, day) - timedelta(hours=23))
    release_due(store)
    report = (await http.get(f"{ADMIN}/report", params={"organization": "HealthcareService/hcs-yq1-rehabilitation",
                                                        "date": day.isoformat()})).json()
    counts = report["slots"]["total"]
    assert counts == {"published": 8, "reserved": 2, "booked_from_reserved": 1, "booked_from_general": 1,
                      "booked_by_public": 1, "released": 1, "expired_holds": 1, "reserved_utilisation": 0.5}
    by_hospital = (await http.get(f"{ADMIN}/report", params={"organization": HOSPITAL,
                                                             "date": day.isoformat()})).json()
    rehab = [d for d in by_hospital["slots"]["departments"]
             if d["department"] == "HealthcareService/hcs-yq1-rehabilitation"]
    assert rehab and rehab[0]["published"] == 8
    assert (await http.get(f"{ADMIN}/report", params={"organization": HOSPITAL, "date": "tomorrow"})).status_code == 400


# -- the fast path (service/api/fastpath.py) -----------------------------------------------------

async def test_hold_and_book_answer_alike_with_and_without_the_fast_path(http, capacity_app, engine, clock) -> None:
    """$hold and $book skip FastAPI's router (a clinic's rush is mostly bookings): every answer,
    success or refusal, is what the routed operation gives for the same request."""
    import httpx

    from service.api.fastpath import FastPath
    from service.app import create_app
    from service.config import Settings
    from tests.test_capacity_support import BASE

    routed_app = create_app(Settings(database_url=str(engine.url.render_as_string(hide_password=False)),
                                     base_url=BASE, auth="off"), engine=engine, clock=clock)
    routed_app.user_middleware = [m for m in routed_app.user_middleware if m.cls is not FastPath]
    assert any(m.cls is FastPath for m in capacity_app.user_middleware)
    _, slots = await publish_day(http, 10)  # reserved: 0, 4, 8
    patient, referral = await referred_patient(http, engine)

    def comparable(response: httpx.Response) -> tuple:
        body = response.json()
        for key in ("id", "meta", "slot", "start", "end", "created"):
            body.pop(key, None)
        headers = {h: response.headers.get(h) is not None for h in ("etag", "location", "last-modified")}
        return response.status_code, response.headers.get("content-type"), headers, body

    transport = httpx.ASGITransport(app=routed_app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                     headers={"Accept": "application/fhir+json"}) as routed:
            requests = [  # (headers, Parameters for the fast path, Parameters for the routed twin)
                ("$book", clinic(), parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral),
                 parameters(slot=f"Slot/{slots[4]}", patient=patient, referral=referral)),
                ("$book", clinic(), parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral),
                 parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral)),  # 409 for both
                ("$book", {}, parameters(slot=f"Slot/{slots[8]}", patient=patient),
                 parameters(slot=f"Slot/{slots[8]}", patient=patient)),  # public caller, reserved slot: 403
                ("$hold", clinic(), parameters(slot=f"Slot/{slots[1]}", patient=patient),
                 parameters(slot=f"Slot/{slots[2]}", patient=patient)),
                ("$book", clinic(), parameters(patient=patient), parameters(patient=patient)),  # 400
            ]
            statuses = []
            for operation, headers, fast_body, routed_body in requests:
                fast = await http.post(f"/Appointment/{operation}", headers=headers, json=fast_body)
                twin = await routed.post(f"/Appointment/{operation}", headers=headers, json=routed_body)
                assert comparable(fast) == comparable(twin), (operation, fast.text, twin.text)
                statuses.append(fast.status_code)
            assert statuses == [200, 409, 403, 200, 400]
    finally:
        routed_app.state.audit_queue.close()


async def test_a_booking_leaves_one_audit_event_naming_the_appointment_and_the_slot_it_took(
        http, capacity_app, engine) -> None:
    """The Slot's new version is the service's follow-up to the caller's $book: its own
    Provenance (the service wrote it, on the clinic's request), but one AuditEvent for the
    interaction, the clinic's, naming both versions (three audit records per booking, not four)."""
    import orjson

    from service.fhir.access import AccessContext
    from service.security.audit import drain

    _, slots = await publish_day(http, 10)
    patient, referral = await referred_patient(http, engine)
    booked = await http.post("/Appointment/$book", headers=clinic(),
                             json=parameters(slot=f"Slot/{slots[0]}", patient=patient, referral=referral))
    assert booked.status_code == 200, booked.text
    appointment = f"Appointment/{booked.json()['id']}/_history/1"
    drain(capacity_app.state.store)
    store, internal = capacity_app.state.store, AccessContext.internal("test")

    def found(resource_type: str, **params: str) -> list[dict]:
        bundle = orjson.loads(store.search(internal, resource_type, list(params.items()), base_url=""))
        return [entry["resource"] for entry in bundle.get("entry", [])]

    [audit] = found("AuditEvent", entity=appointment.split("/_history")[0])
    assert audit["subtype"][0]["code"] == "create" and audit["agent"][1]["who"] == {"reference": CLINIC}
    entities = {e["what"]["reference"]: e for e in audit["entity"]}
    assert appointment in entities
    [slot_version] = [ref for ref in entities if ref.startswith(f"Slot/{slots[0]}/_history/")]
    assert entities[slot_version]["description"] == "update by capacity, following this request"
    naming_it = [e for e in found("AuditEvent", entity=f"Slot/{slots[0]}")
                 if slot_version in {x["what"]["reference"] for x in e["entity"] if "what" in x}]
    assert naming_it == [audit]  # no AuditEvent of its own
    [lineage] = [p for p in found("Provenance", target=slot_version.split("/_history")[0])
                 if slot_version in {t["reference"] for t in p["target"]}]
    assert lineage["activity"]["coding"][0]["code"] == "UPDATE"
    assert [t["reference"] for t in lineage["target"]] == [slot_version]
    assert lineage["agent"][-1]["who"]["identifier"]["value"] == "capacity"  # the service made the version
    [booker] = found("Provenance", target=appointment.split("/_history")[0])
    assert booker["agent"][0]["who"] == {"reference": CLINIC}
