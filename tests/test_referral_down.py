"""Downward referral over HTTP (R40-R43, R12a): at discharge the lead hospital refers the
patient down; Yilian addresses the contracted team, drafts its follow-up plan, opens a
priority bed request, checks long prescriptions; the team closes the loop."""

from __future__ import annotations

from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import FastAPI

from service.fhir.access import AccessContext
from service.referral import codes
from tests.test_referral_support import (  # noqa: F401  (fixtures)
    HEDI,
    HOSPITAL,
    ORTHOPAEDICS,
    QIAOTOU,
    SHANGZHAN,
    TEAM,
    acting,
    clock,
    document,
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

SURGEON = "PractitionerRole/spec-yq1-orthopaedics-1"
FHIR = {"Content-Type": "application/fhir+json"}


def contract(app: FastAPI, patient: str, clinic: str, *, start: str = "2026-01-01", end: str = "2026-12-31") -> str:
    """A family-doctor contract (R1, R2) as the contracts module will record it: a CarePlan of
    category family-doctor-contract whose care team is the clinic's "3+X" team."""
    plan = {"resourceType": "CarePlan", "status": "active", "intent": "plan",
            "category": [codes.concept(codes.CAREPLAN_CATEGORY, "family-doctor-contract", "家庭医生签约")],
            "subject": {"reference": patient}, "period": {"start": start, "end": end},
            "careTeam": [{"reference": TEAM[clinic]}]}
    return app.state.store.create(AccessContext.internal("contracts"), plan).resource.reference


async def hospitalised(http: httpx.AsyncClient, clinic: str = SHANGZHAN, **patient_options: Any) -> dict[str, Any]:
    """A patient referred up for a femur fracture (S72, hospital catalogue) and in the ward."""
    from tests.test_referral_support import GP_OF

    patient = await new_patient(http, clinic, **patient_options)
    up = await send(http, referral(patient["ref"], icd10="S72.0", service="admission", requester=GP_OF[clinic]),
                    org=clinic)
    task = await task_of(http, up["id"], org=clinic)
    for status in ("received", "accepted", "in-progress"):
        response = await move(http, task, status, HOSPITAL)
        assert response.status_code == 200, response.text
        task = response.json()
    return {**patient, "up": up, "up_task": task}


def down_referral(patient: str, summary: str, *, bed_request: bool = False, **options: Any) -> dict[str, Any]:
    options.setdefault("service", "rehabilitation")
    options.setdefault("criteria", ("rehabilitation",))
    options.setdefault("icd10", "S72.0")
    body = referral(patient, direction="down", requester=SURGEON, supporting=[summary], **options)
    if bed_request:  # R42
        body.setdefault("extension", []).append({"url": codes.EXT_BED_REQUEST, "valueBoolean": True})
    return body


async def test_r41_downward_referral_goes_to_the_contracted_team_with_a_plan_and_closes_the_loop(
        http: httpx.AsyncClient, referral_app: FastAPI, engine: sa.Engine) -> None:
    """R40/R41: the contract (with Qiaotou's team) wins over the managing clinic; the team gets
    a draft follow-up plan; R42: a priority bed request; R41: the loop closes at the hospital."""
    patient = await hospitalised(http, SHANGZHAN)
    plan_contract = contract(referral_app, patient["ref"], QIAOTOU)
    summary = await document(http, patient["ref"], HOSPITAL)

    # the up referral completes with the discharge summary: the clinic gets the result back
    up_task = patient["up_task"]
    response = await move(http, up_task, "completed", ORTHOPAEDICS,
                          output=[{"type": {"text": "出院小结"}, "valueReference": {"reference": summary}}])
    assert response.status_code == 200, response.text
    assert events(engine, "referral.completed", task=f"Task/{up_task['id']}")[0]["notify"] == SHANGZHAN

    sent = await send(http, down_referral(patient["ref"], summary, bed_request=True), org=HOSPITAL)
    assert [p["reference"] for p in sent["performer"]] == [QIAOTOU, TEAM[QIAOTOU]]
    task = await task_of(http, sent["id"], org=HOSPITAL)
    assert task["requester"]["reference"] == HOSPITAL and task["owner"]["reference"] == QIAOTOU
    requested = events(engine, "referral.requested", referral=f"ServiceRequest/{sent['id']}")
    assert requested[0]["notify"] == QIAOTOU and requested[0]["direction"] == "down"

    inputs = {i["type"]["coding"][0]["code"]: i["valueReference"]["reference"] for i in task["input"]}
    plan = await reread(http, *inputs["follow-up-plan"].split("/"), org=QIAOTOU)
    assert plan["status"] == "draft" and plan["careTeam"] == [{"reference": TEAM[QIAOTOU]}]
    assert plan["category"][0]["coding"][0]["code"] == "referral-follow-up"
    assert {"reference": f"ServiceRequest/{sent['id']}"} in plan["supportingInfo"]
    assert {"reference": summary} in plan["supportingInfo"]
    visits = [a["detail"]["scheduledPeriod"]["start"] for a in plan["activity"]
              if a.get("detail", {}).get("code", {}).get("coding", [{}])[0].get("code") == "follow-up"]
    assert visits == ["2026-03-09", "2026-04-01", "2026-05-31"]  # 7, 30, 90 days (policy, R41)
    assert any(a.get("detail", {}).get("code", {}).get("coding", [{}])[0].get("code") == "rehabilitation"
               for a in plan["activity"])
    bed_request = await reread(http, *inputs["bed-request"].split("/"), org=QIAOTOU)
    assert bed_request["performer"] == [{"reference": QIAOTOU}] and bed_request["basedOn"] == [
        {"reference": f"ServiceRequest/{sent['id']}"}]
    assert bed_request["priority"] == "urgent" and bed_request["code"]["coding"][0]["code"] == "admission"
    assert await found_ids(http, "ServiceRequest", QIAOTOU, _tag=f"{codes.FLAG}|priority-bed",
                           performer=QIAOTOU, subject=patient["ref"]) == [bed_request["id"]]
    assert plan_contract  # the contract stays as it was

    # long prescriptions come with it: up to 12 weeks (R12a), added to the plan
    prescription = {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                    "medicationCodeableConcept": {"text": "阿仑膦酸钠片 70mg"},
                    "subject": {"reference": patient["ref"]},
                    "basedOn": [{"reference": f"ServiceRequest/{sent['id']}"}],
                    "dispenseRequest": {"expectedSupplyDuration": {"value": 8, "unit": "周",
                                                                   "system": "http://unitsofmeasure.org",
                                                                   "code": "wk"}}}
    ok = await http.post("/MedicationRequest", json=prescription, headers=acting(HOSPITAL))
    assert ok.status_code == 201, ok.text
    plan = await reread(http, "CarePlan", plan["id"], org=QIAOTOU)
    assert {"reference": f"MedicationRequest/{ok.json()['id']}"} in [a.get("reference") for a in plan["activity"]]
    too_long = dict(prescription, dispenseRequest={"expectedSupplyDuration": {
        "value": 16, "system": "http://unitsofmeasure.org", "code": "wk"}})
    refused = await http.post("/MedicationRequest", json=too_long, headers=acting(HOSPITAL))
    assert refused.status_code == 422
    assert "MedicationRequest.dispenseRequest.expectedSupplyDuration" in issues_text(refused)
    assert "R12a" in issues_text(refused)

    # the contracted clinic takes it over and closes the loop back to the hospital
    for status in ("received", "accepted", "in-progress"):
        response = await move(http, task, status, QIAOTOU)
        assert response.status_code == 200, response.text
        task = response.json()
    visit = await encounter(http, patient["ref"], QIAOTOU)
    response = await move(http, task, "completed", QIAOTOU,
                          output=[{"type": {"text": "随访记录"}, "valueReference": {"reference": visit}}])
    assert response.status_code == 200, response.text
    assert (await reread(http, "ServiceRequest", sent["id"], org=HOSPITAL))["status"] == "completed"
    assert events(engine, "referral.completed", referral=f"ServiceRequest/{sent['id']}")[0]["notify"] == HOSPITAL


async def test_r41_without_a_contract_the_home_district_decides(http: httpx.AsyncClient) -> None:
    """A township resident (郊区) without contract or managing clinic goes to the township
    hospital of the district, to the team of the patient's GP."""
    patient = await hospitalised(http, HEDI, managed=False)
    summary = await document(http, patient["ref"], HOSPITAL)
    sent = await send(http, down_referral(patient["ref"], summary), org=HOSPITAL)
    assert [p["reference"] for p in sent["performer"]] == [HEDI, TEAM[HEDI]]


async def test_r41_else_the_managing_clinic_and_an_expired_contract_does_not_count(
        http: httpx.AsyncClient, referral_app: FastAPI) -> None:
    patient = await hospitalised(http, QIAOTOU, district=("140321", "平定县"))  # lives outside the alliance's districts
    contract(referral_app, patient["ref"], HEDI, start="2024-01-01", end="2025-12-31")  # expired
    summary = await document(http, patient["ref"], HOSPITAL)
    sent = await send(http, down_referral(patient["ref"], summary), org=HOSPITAL)
    assert [p["reference"] for p in sent["performer"]] == [QIAOTOU, TEAM[QIAOTOU]]


async def test_r41_a_downward_referral_carries_the_discharge_summary(http: httpx.AsyncClient) -> None:
    patient = await hospitalised(http)
    body = down_referral(patient["ref"], "x")
    del body["supportingInfo"]
    response = await http.post("/ServiceRequest", json=body, headers=acting(HOSPITAL))
    assert response.status_code == 422 and "ServiceRequest.supportingInfo" in issues_text(response)


async def test_r12a_a_too_long_prescription_in_the_same_transaction_refuses_the_referral(
        http: httpx.AsyncClient, engine: sa.Engine) -> None:
    """The prescription comes first in the Bundle, before its referral exists: the check
    runs again when the referral is sent, and the whole transaction writes nothing."""
    patient = await hospitalised(http)
    summary = await document(http, patient["ref"], HOSPITAL)
    request = "urn:uuid:6e0c4a8e-0021-4b7e-9d7e-0a0a0a0a0021"
    before = len(events(engine))

    def bundle(weeks: int) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                          "medicationCodeableConcept": {"text": "硝苯地平控释片 30mg"},
                          "subject": {"reference": patient["ref"]}, "basedOn": [{"reference": request}],
                          "dispenseRequest": {"expectedSupplyDuration": {"value": weeks * 7, "code": "d",
                                                                         "system": "http://unitsofmeasure.org"}}},
             "request": {"method": "POST", "url": "MedicationRequest"}},
            {"fullUrl": request, "resource": down_referral(patient["ref"], summary, service="long-term-prescription",
                                                           icd10="I10", criteria=()),
             "request": {"method": "POST", "url": "ServiceRequest"}},
        ]}

    response = await http.post("", json=bundle(13), headers={**FHIR, **acting(HOSPITAL)})
    assert response.status_code == 422 and "R12a" in issues_text(response), response.text
    assert len(events(engine)) == before
    response = await http.post("", json=bundle(12), headers={**FHIR, **acting(HOSPITAL)})
    assert response.status_code == 200, response.text
    prescription, referral_ref = (e["response"]["location"].split("/_history")[0] for e in response.json()["entry"])
    task = await task_of(http, referral_ref.split("/")[1], org=HOSPITAL)
    plan_ref = next(i["valueReference"]["reference"] for i in task["input"]
                    if i["type"]["coding"][0]["code"] == "follow-up-plan")
    plan = await reread(http, *plan_ref.split("/"), org=HOSPITAL)
    assert {"reference": prescription} in [a.get("reference") for a in plan["activity"]]
