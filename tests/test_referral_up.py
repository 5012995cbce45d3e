"""Upward referral end to end over HTTP (R30-R35): a family doctor at a community health
center refers up, the lead hospital's desk finds, accepts, treats and closes the loop."""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from service.referral import codes
from tests.test_referral_support import (  # noqa: F401  (fixtures)
    CARDIOLOGY,
    HOSPITAL,
    QIAOTOU,
    RESIDENT_ID,
    SHANGZHAN,
    acting,
    clock,
    document_body,
    encounter,
    events,
    found_ids,
    http,
    issues_text,
    move,
    new_patient,
    referral,
    referral_app,
    reread,
    send,
    task_of,
)

FHIR = {"Content-Type": "application/fhir+json"}


async def test_r30_upward_referral_closes_the_loop_between_two_organizations(http: httpx.AsyncClient,
                                                                           engine: sa.Engine) -> None:
    """R30/R31: sent by the clinic, routed to the lead hospital's cardiology, Task opened and the
    receiver told; R24: the hospital (here its department) accepts and treats; R41: completion
    needs the result, the referral completes and the sender is told with the result."""
    patient = await new_patient(http, SHANGZHAN)
    sent = await send(http, referral(patient["ref"], icd10="I20.0"), org=SHANGZHAN)
    referral_id = sent["id"]

    # routing filled the performer: the lead hospital and the department of the catalogue row
    assert [p["reference"] for p in sent["performer"]] == [HOSPITAL, CARDIOLOGY]
    assert codes.PROFILE in sent["meta"]["profile"]
    assert sent["authoredOn"]
    task = await task_of(http, referral_id)
    assert task["status"] == "requested" and task["intent"] == "order"
    assert task["code"]["coding"][0]["code"] == "fulfill"
    assert task["for"] == {"reference": patient["ref"]}
    assert task["requester"]["reference"] == SHANGZHAN and task["owner"]["reference"] == HOSPITAL
    assert task["businessStatus"]["coding"][0]["code"] == "awaiting-receipt"
    requested = events(engine, "referral.requested", referral=f"ServiceRequest/{referral_id}")
    assert len(requested) == 1 and requested[0]["notify"] == HOSPITAL and requested[0]["task"] == f"Task/{task['id']}"

    # the hospital's referral desk finds it (R31)
    desk = (await http.get("/Task", params={"owner": HOSPITAL, "status": "requested", "_count": 1000},
                           headers=acting(HOSPITAL))).json()
    assert task["id"] in {e["resource"]["id"] for e in desk.get("entry", [])}

    # the hospital receives and its cardiology department accepts and starts (a department counts as the owner)
    for status, org in (("received", HOSPITAL), ("accepted", CARDIOLOGY), ("in-progress", CARDIOLOGY)):
        response = await move(http, task, status, org)
        assert response.status_code == 200, response.text
        task = response.json()
    assert task["businessStatus"]["coding"][0]["code"] == "in-care"
    assert (await reread(http, "ServiceRequest", referral_id))["status"] == "active"
    assert [e["notify"] for e in events(engine, referral=f"ServiceRequest/{referral_id}")
            if e["topic"] in ("referral.received", "referral.accepted", "referral.in-progress")] == [SHANGZHAN] * 3

    # completing without the result is refused: the loop closes only with it (R41)
    response = await move(http, task, "completed", CARDIOLOGY)
    assert response.status_code == 422 and "Task.output" in issues_text(response)

    visit = await encounter(http, patient["ref"], CARDIOLOGY)
    output = [{"type": {"text": "就诊记录"}, "valueReference": {"reference": visit}}]
    response = await move(http, task, "completed", CARDIOLOGY, output=output)
    assert response.status_code == 200, response.text
    assert response.json()["businessStatus"]["coding"][0]["code"] == "result-returned"
    assert (await reread(http, "ServiceRequest", referral_id))["status"] == "completed"
    completed = events(engine, "referral.completed", referral=f"ServiceRequest/{referral_id}")
    assert len(completed) == 1 and completed[0]["notify"] == SHANGZHAN and completed[0]["outputs"] == [visit]


async def test_r31_desk_searches_find_referrals_by_owner_direction_patient_and_with_their_task(
        http: httpx.AsyncClient) -> None:
    """The searches the referral desks run (issue #6 point 8), exactly as they are sent."""
    patient = await new_patient(http, SHANGZHAN)
    urgent = await send(http, referral(patient["ref"], icd10="I10", priority="urgent"))  # green channel (R34)
    routine = await send(http, referral(patient["ref"], icd10="I21.9"))
    task = await task_of(http, routine["id"])
    direction = f"{codes.DIRECTION}|up"

    async def ids(resource_type: str, **params: str) -> set[str]:
        return set(await found_ids(http, resource_type, HOSPITAL, **params))

    assert task["id"] in await ids("Task", owner=HOSPITAL, status="requested")
    assert {urgent["id"], routine["id"]} <= await ids("ServiceRequest", category=direction, performer=HOSPITAL,
                                                      status="active")
    assert {urgent["id"], routine["id"]} <= await ids("ServiceRequest", direction=direction, performer=HOSPITAL)
    assert await ids("ServiceRequest", **{"subject.identifier": f"{RESIDENT_ID}|{patient['resident_id']}"}) == {
        urgent["id"], routine["id"]}
    assert urgent["id"] in await ids("ServiceRequest", priority="urgent", subject=patient["ref"])
    assert routine["id"] not in await ids("ServiceRequest", priority="urgent", subject=patient["ref"])
    assert await ids("ServiceRequest", _tag=f"{codes.FLAG}|green-channel", subject=patient["ref"]) == {urgent["id"]}
    assert await ids("ServiceRequest", direction=f"{codes.DIRECTION}|down", subject=patient["ref"]) == set()

    with_tasks = (await http.get("/ServiceRequest", params={"_id": routine["id"], "_revinclude": "Task:focus"},
                                 headers=acting(HOSPITAL))).json()
    found = {(e["resource"]["resourceType"], e["resource"]["id"], e["search"]["mode"]) for e in with_tasks["entry"]}
    assert found == {("ServiceRequest", routine["id"], "match"), ("Task", task["id"], "include")}


async def test_r32_transaction_sends_referral_with_attachment_and_booking_atomically(
        http: httpx.AsyncClient, engine: sa.Engine) -> None:
    """R32 precise referral: the referral, its letter (DocumentReference) and the booked
    Appointment in one transaction; the Task references the booking; one event."""
    patient = await new_patient(http, SHANGZHAN)
    letter, booking, request = "urn:uuid:6e0c4a8e-0001-4b7e-9d7e-0a0a0a0a0001", \
        "urn:uuid:6e0c4a8e-0002-4b7e-9d7e-0a0a0a0a0002", "urn:uuid:6e0c4a8e-0003-4b7e-9d7e-0a0a0a0a0003"
    appointment = {"resourceType": "Appointment", "status": "booked", "basedOn": [{"reference": request}],
                   "start": "2026-03-05T09:00:00+08:00", "end": "2026-03-05T09:15:00+08:00",
                   "participant": [{"actor": {"reference": patient["ref"]}, "status": "accepted"},
                                   {"actor": {"reference": "PractitionerRole/spec-yq1-cardiology-1"},
                                    "status": "accepted"}]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": booking, "resource": appointment, "request": {"method": "POST", "url": "Appointment"}},
        {"fullUrl": request, "resource": referral(patient["ref"], icd10="I20.0", supporting=[letter]),
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": letter, "resource": document_body(patient["ref"], "57133-1", "转诊单"),
         "request": {"method": "POST", "url": "DocumentReference"}},
    ]}
    response = await http.post("", json=bundle, headers={**FHIR, **acting(SHANGZHAN)})
    assert response.status_code == 200, response.text
    locations = [e["response"]["location"].split("/_history")[0] for e in response.json()["entry"]]
    appointment_ref, referral_ref, letter_ref = locations
    stored = await reread(http, *referral_ref.split("/"))
    assert stored["supportingInfo"] == [{"reference": letter_ref}]
    task = await task_of(http, stored["id"])
    assert [i["valueReference"]["reference"] for i in task["input"]] == [appointment_ref]
    assert len(events(engine, "referral.requested", referral=referral_ref)) == 1

    # a booking made later for the same referral (e.g. by $book) is linked too
    later = await http.post("/Appointment", headers=acting(SHANGZHAN),
                            json=dict(appointment, basedOn=[{"reference": referral_ref}]))
    assert later.status_code == 201, later.text
    task = await task_of(http, stored["id"])
    assert [i["valueReference"]["reference"] for i in task["input"]] == [appointment_ref,
                                                                         f"Appointment/{later.json()['id']}"]


async def test_r31_failing_transaction_writes_no_referral_task_attachment_booking_or_event(
        http: httpx.AsyncClient, engine: sa.Engine) -> None:
    """A referral refused inside a transaction (up-referring hypertension, on the township
    catalogue, without a criterion) takes its attachment, booking, Task and event with it."""
    patient = await new_patient(http, SHANGZHAN)
    letter, request = "urn:uuid:6e0c4a8e-0011-4b7e-9d7e-0a0a0a0a0011", "urn:uuid:6e0c4a8e-0013-4b7e-9d7e-0a0a0a0a0013"
    before = len(events(engine))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": letter, "resource": document_body(patient["ref"], "57133-1", "转诊单"),
         "request": {"method": "POST", "url": "DocumentReference"}},
        {"resource": {"resourceType": "Appointment", "status": "booked", "basedOn": [{"reference": request}],
                      "participant": [{"actor": {"reference": patient["ref"]}, "status": "accepted"}]},
         "request": {"method": "POST", "url": "Appointment"}},
        {"fullUrl": request, "resource": referral(patient["ref"], icd10="I10", supporting=[letter]),
         "request": {"method": "POST", "url": "ServiceRequest"}},
    ]}
    response = await http.post("", json=bundle, headers={**FHIR, **acting(SHANGZHAN)})
    assert response.status_code == 422, response.text
    assert "Bundle.entry[2]" in issues_text(response) and "R31" in issues_text(response)
    for resource_type, param in (("ServiceRequest", "subject"), ("DocumentReference", "subject"),
                                 ("Appointment", "patient"), ("Task", "patient")):
        assert await found_ids(http, resource_type, SHANGZHAN, **{param: patient["ref"]}) == [], \
            f"{resource_type} was written"
    assert len(events(engine)) == before


async def test_r30_a_referral_is_sent_by_its_requesters_institution(http: httpx.AsyncClient) -> None:
    """Another clinic, or a caller naming no organization, cannot send in the GP's name."""
    patient = await new_patient(http, SHANGZHAN)
    for org in (QIAOTOU, None):
        response = await http.post("/ServiceRequest", json=referral(patient["ref"]), headers=acting(org))
        assert response.status_code == 403, response.text
        assert "Organization/clinic-yq-shangzhan" in issues_text(response)


async def test_r30_a_draft_is_routed_and_opened_only_when_sent(http: httpx.AsyncClient, engine: sa.Engine) -> None:
    """A draft referral is checked against the profile but has no Task until it becomes active."""
    patient = await new_patient(http, SHANGZHAN)
    draft = await send(http, referral(patient["ref"], status="draft"))
    assert "performer" not in draft
    assert await found_ids(http, "Task", SHANGZHAN, focus=f"ServiceRequest/{draft['id']}") == []
    response = await http.put(f"/ServiceRequest/{draft['id']}", json=dict(draft, status="active"),
                              headers=acting(SHANGZHAN))
    assert response.status_code == 200, response.text
    assert [p["reference"] for p in response.json()["performer"]] == [HOSPITAL, CARDIOLOGY]
    assert (await task_of(http, draft["id"]))["status"] == "requested"
    assert len(events(engine, "referral.requested", referral=f"ServiceRequest/{draft['id']}")) == 1


async def test_r33_direct_referral_waives_the_deductible_at_the_referring_institution(
        http: httpx.AsyncClient) -> None:
    """R33: a direct referral inside the alliance waives the outpatient deductible of the
    referring (primary) institution, per scheme, from mappings/referral-policy.json."""
    employee = await new_patient(http, SHANGZHAN, coverage="urban-employee")
    resident = await new_patient(http, SHANGZHAN, coverage="urban-rural-resident")
    uninsured = await new_patient(http, SHANGZHAN, coverage=None)

    def waiver(sr: dict) -> dict:
        found = [e for e in sr["extension"] if e["url"] == codes.EXT_DEDUCTIBLE_WAIVER]
        assert len(found) == 1
        return {e["url"]: next(v for k, v in e.items() if k.startswith("value")) for e in found[0]["extension"]}

    first = waiver(await send(http, referral(employee["ref"], insurance=employee["coverage"])))
    assert first["waived"] is True and first["amount"] == {"value": 200, "currency": "CNY"}
    assert first["coverage"] == {"reference": employee["coverage"]}
    assert first["institution"] == {"reference": SHANGZHAN} and "R33" in first["basis"]
    second = waiver(await send(http, referral(resident["ref"])))  # the patient's active Coverage is found
    assert second["waived"] is True and second["amount"]["value"] == 100
    third = waiver(await send(http, referral(uninsured["ref"])))
    assert third["waived"] is False and "amount" not in third

    # the waiver is Yilian's: a caller's update cannot change it
    sent = await send(http, referral(employee["ref"]))
    forged = dict(sent, extension=[{"url": codes.EXT_DEDUCTIBLE_WAIVER,
                                    "extension": [{"url": "waived", "valueBoolean": True},
                                                  {"url": "amount", "valueMoney": {"value": 99999, "currency": "CNY"}},
                                                  {"url": "basis", "valueString": "forged"}]}],
                  note=[{"text": "补充病史"}])
    response = await http.put(f"/ServiceRequest/{sent['id']}", json=forged, headers=acting(SHANGZHAN))
    assert response.status_code == 200, response.text
    assert waiver(response.json())["amount"]["value"] == 200 and response.json()["note"][0]["text"] == "补充病史"
