"""Batch and transaction Bundles (issue #3 point 5)."""

from __future__ import annotations

from uuid import uuid4

import httpx

FHIR = {"Content-Type": "application/fhir+json"}
# A hospital record number system: unique test values without resident-ID check characters.
MRN = "https://his.yq-hospital.example.org/mrn"


def _patient_entry(identifier: str, full_url: str | None = None, **request: str) -> dict:
    return {
        "fullUrl": full_url or f"urn:uuid:{uuid4()}",
        "resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": identifier}],
                     "name": [{"text": "陈平"}]},
        "request": {"method": "POST", "url": "Patient", **request},
    }


async def _count(client: httpx.AsyncClient, resource_type: str, **params: str) -> int:
    response = await client.get(f"/{resource_type}", params={**params, "_total": "accurate"})
    assert response.status_code == 200, response.text
    return response.json()["total"]


async def test_transaction_rewrites_urn_uuid_references(client: httpx.AsyncClient) -> None:
    identifier = f"TX{uuid4().hex[:10]}"
    patient = _patient_entry(identifier)
    referral = {
        "fullUrl": f"urn:uuid:{uuid4()}",
        "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                     "subject": {"reference": patient["fullUrl"]}},
        "request": {"method": "POST", "url": "ServiceRequest"},
    }
    task = {
        "resource": {"resourceType": "Task", "status": "requested", "intent": "order",
                     "focus": {"reference": referral["fullUrl"]}, "for": {"reference": patient["fullUrl"]}},
        "request": {"method": "POST", "url": "Task"},
    }
    response = await client.post("", json={"resourceType": "Bundle", "type": "transaction",
                                           "entry": [task, referral, patient]}, headers=FHIR)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    locations = [e["response"]["location"] for e in result["entry"]]
    assert [loc.split("/")[0] for loc in locations] == ["Task", "ServiceRequest", "Patient"]
    assert all(e["response"]["status"].startswith("201") for e in result["entry"])
    task_id, request_id, patient_id = (loc.split("/")[1] for loc in locations)
    stored_task = (await client.get(f"/Task/{task_id}")).json()
    assert stored_task["focus"]["reference"] == f"ServiceRequest/{request_id}"
    assert stored_task["for"]["reference"] == f"Patient/{patient_id}"
    stored_request = (await client.get(f"/ServiceRequest/{request_id}")).json()
    assert stored_request["subject"]["reference"] == f"Patient/{patient_id}"


async def test_failed_transaction_writes_nothing_and_names_the_entry(client: httpx.AsyncClient) -> None:
    identifier = f"TXF{uuid4().hex[:10]}"
    good = _patient_entry(identifier)
    bad = {"resource": {"resourceType": "Patient", "gender": "robot"}, "request": {"method": "POST", "url": "Patient"}}
    response = await client.post("", json={"resourceType": "Bundle", "type": "transaction",
                                           "entry": [good, bad, _patient_entry(identifier)]}, headers=FHIR)
    assert response.status_code == 422
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[1]" in outcome["issue"][0]["diagnostics"]
    assert await _count(client, "Patient", identifier=f"{MRN}|{identifier}") == 0


async def test_transaction_failing_in_the_database_phase_rolls_back(client: httpx.AsyncClient) -> None:
    """A failure after earlier entries were written (stale ifMatch) undoes them all."""
    existing = (await client.post("/Patient", json={"resourceType": "Patient", "name": [{"text": "旧"}]},
                                  headers=FHIR)).json()
    identifier = f"TXR{uuid4().hex[:10]}"
    stale_update = {"resource": dict(existing, gender="female"),
                    "request": {"method": "PUT", "url": f"Patient/{existing['id']}", "ifMatch": 'W/"7"'}}
    response = await client.post("", json={"resourceType": "Bundle", "type": "transaction",
                                           "entry": [_patient_entry(identifier), stale_update]}, headers=FHIR)
    assert response.status_code == 412
    assert "Bundle.entry[1]" in response.json()["issue"][0]["diagnostics"]
    assert await _count(client, "Patient", identifier=f"{MRN}|{identifier}") == 0
    assert (await client.get(f"/Patient/{existing['id']}")).json()["meta"]["versionId"] == "1"


async def test_conditional_reference_resolves_to_the_single_match(client: httpx.AsyncClient) -> None:
    identifier = f"CR{uuid4().hex[:10]}"
    patient = (await client.post("/Patient", json=_patient_entry(identifier)["resource"], headers=FHIR)).json()
    entry = {"resource": {"resourceType": "Coverage", "status": "active",
                          "beneficiary": {"reference": f"Patient?identifier={MRN}|{identifier}"},
                          "payor": [{"reference": f"Patient?identifier={MRN}|{identifier}"}]},
             "request": {"method": "POST", "url": "Coverage"}}
    response = await client.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry]},
                                 headers=FHIR)
    assert response.status_code == 200, response.text
    coverage_id = response.json()["entry"][0]["response"]["location"].split("/")[1]
    coverage = (await client.get(f"/Coverage/{coverage_id}")).json()
    assert coverage["beneficiary"]["reference"] == f"Patient/{patient['id']}"


async def test_conditional_reference_without_match_fails_the_transaction(client: httpx.AsyncClient) -> None:
    entry = {"resource": {"resourceType": "Coverage", "status": "active",
                          "beneficiary": {"reference": f"Patient?identifier={MRN}|NOBODY{uuid4().hex}"},
                          "payor": [{"reference": "Organization/x"}]},
             "request": {"method": "POST", "url": "Coverage"}}
    response = await client.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry]},
                                 headers=FHIR)
    assert response.status_code == 412
    assert "matches no resources" in response.json()["issue"][0]["diagnostics"]


async def test_conditional_create_inside_transaction_reuses_existing(client: httpx.AsyncClient) -> None:
    identifier = f"CC{uuid4().hex[:10]}"
    condition = f"identifier={MRN}|{identifier}"
    first = await client.post("", headers=FHIR, json={"resourceType": "Bundle", "type": "transaction",
                                                      "entry": [_patient_entry(identifier, ifNoneExist=condition)]})
    second = await client.post("", headers=FHIR, json={"resourceType": "Bundle", "type": "transaction",
                                                       "entry": [_patient_entry(identifier, ifNoneExist=condition)]})
    assert first.json()["entry"][0]["response"]["status"].startswith("201")
    assert second.json()["entry"][0]["response"]["status"].startswith("200")
    assert first.json()["entry"][0]["response"]["location"] == second.json()["entry"][0]["response"]["location"]
    assert await _count(client, "Patient", identifier=f"{MRN}|{identifier}") == 1


async def test_transaction_processes_delete_before_create_and_get_last(client: httpx.AsyncClient) -> None:
    old = (await client.post("/Patient", json={"resourceType": "Patient"}, headers=FHIR)).json()
    identifier = f"ORD{uuid4().hex[:10]}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": f"Patient?identifier={MRN}|{identifier}"}},
        _patient_entry(identifier),
        {"request": {"method": "DELETE", "url": f"Patient/{old['id']}"}},
    ]}
    response = await client.post("", json=bundle, headers=FHIR)
    assert response.status_code == 200, response.text
    search = response.json()["entry"][0]["resource"]
    assert len(search["entry"]) == 1  # the GET ran after the POST
    assert (await client.get(f"/Patient/{old['id']}")).status_code == 410


async def test_batch_entries_succeed_or_fail_independently(client: httpx.AsyncClient) -> None:
    identifier = f"B{uuid4().hex[:10]}"
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        _patient_entry(identifier),
        {"resource": {"resourceType": "Patient", "gender": "robot"}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/definitely-missing"}},
    ]}
    response = await client.post("", json=bundle, headers=FHIR)
    assert response.status_code == 200
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"][:3] for e in result["entry"]]
    assert statuses == ["201", "422", "404"]
    assert result["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert await _count(client, "Patient", identifier=f"{MRN}|{identifier}") == 1


async def test_bundle_of_other_type_is_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post("", json={"resourceType": "Bundle", "type": "collection"}, headers=FHIR)
    assert response.status_code == 400
    assert "batch or transaction" in response.json()["issue"][0]["diagnostics"]


async def test_thousand_entry_transaction(client: httpx.AsyncClient) -> None:
    tag = uuid4().hex[:8]
    entries = [_patient_entry(f"K{tag}{i:04d}") for i in range(1000)]
    response = await client.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                                 headers=FHIR)
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()["entry"]) == 1000
    one = await client.get("/Patient", params={"identifier": f"{MRN}|K{tag}0999"})
    assert len(one.json()["entry"]) == 1


async def test_conditional_reference_to_a_conditional_create_of_the_same_bundle(client: httpx.AsyncClient) -> None:
    """Synthea-style: the Patient is created with ifNoneExist, the Encounter points at it by
    the same query; both resolve to one resource, on the first load and on a reload."""
    identifier = f"SY{uuid4().hex[:10]}"
    query = f"identifier={MRN}|{identifier}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Encounter", "status": "finished",
                      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                      "subject": {"reference": f"Patient?{query}"}},
         "request": {"method": "POST", "url": "Encounter"}},
        _patient_entry(identifier, ifNoneExist=query),
    ]}
    first = await client.post("", json=bundle, headers=FHIR)
    again = await client.post("", json=bundle, headers=FHIR)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    patient_ref = first.json()["entry"][1]["response"]["location"].rsplit("/_history", 1)[0]
    assert again.json()["entry"][1]["response"]["location"].startswith(patient_ref)
    for result in (first, again):
        encounter = result.json()["entry"][0]["response"]["location"].rsplit("/_history", 1)[0]
        assert (await client.get(f"/{encounter}")).json()["subject"]["reference"] == patient_ref


async def test_many_conditional_references_resolve_in_one_bundle(client: httpx.AsyncClient) -> None:
    tag = uuid4().hex[:8]
    created = [(await client.post("/Patient", json=_patient_entry(f"M{tag}{i}")["resource"], headers=FHIR)).json()
               for i in range(30)]
    entries = [{"resource": {"resourceType": "Coverage", "status": "active",
                             "beneficiary": {"reference": f"Patient?identifier={MRN}|M{tag}{i}"},
                             "payor": [{"reference": "Organization/insurer"}]},
                "request": {"method": "POST", "url": "Coverage"}} for i in range(30)]
    response = await client.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                                 headers=FHIR)
    assert response.status_code == 200, response.text
    for i, entry in enumerate(response.json()["entry"]):
        coverage = (await client.get(f"/{entry['response']['location'].rsplit('/_history', 1)[0]}")).json()
        assert coverage["beneficiary"]["reference"] == f"Patient/{created[i]['id']}"
