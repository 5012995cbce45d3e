"""Every resource type the alliance exchanges round-trips through create / read / search,
and the CapabilityStatement tells the truth about them (issue #2 points 4-5)."""

from __future__ import annotations

import httpx
import pytest

FHIR = {"Content-Type": "application/fhir+json"}
SUBJECT = {"reference": "Patient/p1"}
CONCEPT = {"coding": [{"system": "http://loinc.org", "code": "8480-6"}], "text": "收缩压"}

# A minimal valid instance of each type named in issue #2, with its required elements.
MINIMAL: dict[str, dict] = {
    "Patient": {"name": [{"text": "刘备"}]},
    "Practitioner": {"name": [{"text": "华佗"}]},
    "PractitionerRole": {"practitioner": {"reference": "Practitioner/x"}},
    "Organization": {"name": "人民医院"},
    "Location": {"name": "心内科病区", "physicalType": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": "wa"}]}},
    "HealthcareService": {"name": "心内科门诊"},
    "Endpoint": {"status": "active", "address": "https://his.example.org/fhir",
                 "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                                    "code": "hl7-fhir-rest"},
                 "payloadType": [{"text": "FHIR"}]},
    "CareTeam": {"name": "家庭医生团队"},
    "CarePlan": {"status": "active", "intent": "plan", "subject": SUBJECT},
    "ServiceRequest": {"status": "active", "intent": "order", "subject": SUBJECT},
    "Task": {"status": "requested", "intent": "order"},
    "Coverage": {"status": "active", "beneficiary": SUBJECT, "payor": [{"reference": "Organization/o1"}]},
    "Schedule": {"actor": [{"reference": "Practitioner/x"}]},
    "Slot": {"schedule": {"reference": "Schedule/s1"}, "status": "free",
             "start": "2026-12-01T08:00:00+08:00", "end": "2026-12-01T08:15:00+08:00"},
    "Appointment": {"status": "proposed", "participant": [{"actor": SUBJECT, "status": "needs-action"}]},
    "Encounter": {"status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                                  "code": "AMB"}},
    "Condition": {"subject": SUBJECT, "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10",
                                                           "code": "I10"}]}},
    "Observation": {"status": "final", "code": CONCEPT, "subject": SUBJECT},
    "MedicationRequest": {"status": "active", "intent": "order", "subject": SUBJECT,
                          "medicationCodeableConcept": {"text": "氨氯地平"}},
    "AllergyIntolerance": {"patient": SUBJECT},
    "Procedure": {"status": "completed", "subject": SUBJECT},
    "DiagnosticReport": {"status": "final", "code": CONCEPT},
    "DocumentReference": {"status": "current", "content": [{"attachment": {"contentType": "text/plain",
                                                                          "data": "5Ye66Zmi5bCP57uT"}}]},
    "Composition": {"status": "final", "type": {"text": "出院小结"}, "date": "2026-11-20",
                    "author": [{"reference": "Practitioner/x"}], "title": "出院小结"},
    "Consent": {"status": "active",
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                      "code": "patient-privacy"}]},
                "category": [{"text": "record sharing"}]},
    "Communication": {"status": "completed"},
    "Provenance": {"target": [SUBJECT], "recorded": "2026-11-20T10:00:00+08:00",
                   "agent": [{"who": {"reference": "Practitioner/x"}}]},
    "AuditEvent": {"type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
                   "recorded": "2026-11-20T10:00:00+08:00", "agent": [{"requestor": True}],
                   "source": {"observer": {"display": "yilian"}}},
    "Subscription": {"status": "requested", "reason": "referral updates", "criteria": "Task?status=requested",
                     "channel": {"type": "rest-hook", "endpoint": "https://his.example.org/hook"}},
    "Bundle": {"type": "collection"},
}


@pytest.mark.parametrize("resource_type", sorted(MINIMAL))
async def test_each_alliance_type_round_trips(client: httpx.AsyncClient, resource_type: str) -> None:
    body = {"resourceType": resource_type, **MINIMAL[resource_type]}
    created = await client.post(f"/{resource_type}", json=body, headers=FHIR)
    assert created.status_code == 201, created.text
    stored = created.json()
    read = await client.get(f"/{resource_type}/{stored['id']}")
    assert read.status_code == 200
    for key, value in MINIMAL[resource_type].items():
        assert read.json()[key] == value
    found = await client.get(f"/{resource_type}", params={"_id": stored["id"]})
    assert found.status_code == 200
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [stored["id"]]


async def test_capability_statement_lists_types_interactions_and_search_params(client: httpx.AsyncClient) -> None:
    response = await client.get("/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    rest = statement["rest"][0]
    by_type = {r["type"]: r for r in rest["resource"]}
    assert set(MINIMAL) <= set(by_type)
    assert len(by_type) >= 140  # every R4 resource type
    patient = by_type["Patient"]
    assert {i["code"] for i in patient["interaction"]} >= {"read", "vread", "update", "patch", "delete",
                                                          "history-instance", "create", "search-type"}
    params = {p["name"]: p["type"] for p in patient["searchParam"]}
    assert params["identifier"] == "token"
    assert params["name"] == "string"
    assert params["birthdate"] == "date"
    assert params["general-practitioner"] == "reference"
    assert {"composite", "special"}.isdisjoint(params.values())
    assert {i["code"] for i in rest["interaction"]} >= {"transaction", "batch", "history-system"}
    assert any(op["name"] == "validate" for op in rest["operation"])
    direction = {p["name"] for p in by_type["ServiceRequest"]["searchParam"]}
    assert "direction" in direction  # our own SearchParameter from fhir_profiles/


async def test_every_listed_search_parameter_is_accepted_by_the_engine(client: httpx.AsyncClient) -> None:
    """The statement must not promise a parameter the engine would reject under strict handling."""
    statement = (await client.get("/metadata")).json()
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    for resource_type in ("Patient", "ServiceRequest", "Task", "Slot", "Appointment", "Observation"):
        for param in by_type[resource_type]["searchParam"]:
            value = {"date": "2026", "number": "1", "quantity": "1", "reference": "Patient/1"}.get(param["type"], "x")
            response = await client.get(f"/{resource_type}", params={param["name"]: value},
                                        headers={"Prefer": "handling=strict"})
            assert response.status_code == 200, (resource_type, param["name"], response.text)


async def test_health_endpoint(client: httpx.AsyncClient) -> None:
    response = await client.get("http://testserver/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
