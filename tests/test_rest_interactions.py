"""FHIR REST interactions over HTTP: status codes, headers, versioning (issue #2 point 4)."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import httpx
import pytest

FHIR = "application/fhir+json"
# A hospital record number system: unique test values without resident-ID check characters.
MRN = "https://his.yq-hospital.example.org/mrn"


def patient(family: str = "王", given: str = "小明", identifier: str | None = None) -> dict:
    body: dict = {"resourceType": "Patient", "name": [{"family": family, "given": [given], "text": family + given}],
                  "gender": "male", "birthDate": "1960-05-01"}
    if identifier:
        body["identifier"] = [{"system": MRN, "value": identifier}]
    return body


async def create(client: httpx.AsyncClient, resource: dict, **headers: str) -> httpx.Response:
    response = await client.post(f"/{resource['resourceType']}", json=resource,
                                 headers={"Content-Type": FHIR, **headers})
    assert response.status_code in (200, 201), response.text
    return response


async def history_count(client: httpx.AsyncClient, path: str) -> int:
    response = await client.get(f"{path}/_history")
    assert response.status_code == 200
    return len(response.json()["entry"])


async def test_create_returns_201_with_location_etag_and_last_modified(client: httpx.AsyncClient) -> None:
    response = await create(client, patient())
    body = response.json()
    assert response.status_code == 201
    assert response.headers["content-type"].startswith(FHIR)
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["location"] == f"http://testserver/fhir/Patient/{body['id']}/_history/1"
    assert "GMT" in response.headers["last-modified"]
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")


async def test_read_returns_stored_resource_and_etag(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient("李", "华"))).json()
    response = await client.get(f"/Patient/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["etag"] == 'W/"1"'


async def test_read_unknown_id_is_404_operation_outcome(client: httpx.AsyncClient) -> None:
    response = await client.get("/Patient/does-not-exist")
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"
    assert response.json()["issue"][0]["code"] == "not-found"


async def test_unknown_resource_type_is_404(client: httpx.AsyncClient) -> None:
    for response in (await client.get("/Patiennt/1"), await client.get("/Referral"),
                     await client.post("/Nonsense", json={"resourceType": "Nonsense"},
                                       headers={"Content-Type": FHIR})):
        assert response.status_code == 404
        assert response.json()["resourceType"] == "OperationOutcome"


async def test_update_creates_new_version_and_vread_returns_each(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient("赵", "云"))).json()
    changed = dict(created, gender="female")
    response = await client.put(f"/Patient/{created['id']}", json=changed, headers={"Content-Type": FHIR})
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"2"'
    first = await client.get(f"/Patient/{created['id']}/_history/1")
    second = await client.get(f"/Patient/{created['id']}/_history/2")
    assert first.json()["gender"] == "male"
    assert second.json()["gender"] == "female"
    assert (await client.get(f"/Patient/{created['id']}/_history/9")).status_code == 404


async def test_update_as_create_with_client_id_returns_201(client: httpx.AsyncClient) -> None:
    client_id = f"his-{uuid4().hex[:12]}"
    body = dict(patient(), id=client_id)
    response = await client.put(f"/Patient/{client_id}", json=body, headers={"Content-Type": FHIR})
    assert response.status_code == 201
    assert response.json()["id"] == client_id
    again = await client.put(f"/Patient/{client_id}", json=body, headers={"Content-Type": FHIR})
    assert again.status_code == 200
    assert again.json()["meta"]["versionId"] == "2"


async def test_update_with_mismatched_id_is_400(client: httpx.AsyncClient) -> None:
    body = dict(patient(), id="other")
    response = await client.put("/Patient/mine", json=body, headers={"Content-Type": FHIR})
    assert response.status_code == 400
    assert "id" in response.json()["issue"][0]["diagnostics"]


async def test_stale_if_match_returns_412_and_writes_nothing(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient("钱", "多"))).json()
    path = f"/Patient/{created['id']}"
    ok = await client.put(path, json=created, headers={"Content-Type": FHIR, "If-Match": 'W/"1"'})
    assert ok.status_code == 200
    stale = await client.put(path, json=dict(created, gender="other"),
                             headers={"Content-Type": FHIR, "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    current = await client.get(path)
    assert current.json()["meta"]["versionId"] == "2"
    assert current.json()["gender"] == "male"
    assert await history_count(client, path) == 2


async def test_delete_then_read_is_410_and_history_keeps_versions(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient("孙", "悟"))).json()
    path = f"/Patient/{created['id']}"
    deleted = await client.delete(path)
    assert deleted.status_code == 204
    assert (await client.get(path)).status_code == 410
    history = (await client.get(f"{path}/_history")).json()
    assert history["type"] == "history"
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert "resource" not in history["entry"][0]
    assert (await client.delete(path)).status_code == 204  # deleting again is harmless


async def test_type_and_system_history_list_recent_changes(client: httpx.AsyncClient) -> None:
    created = (await create(client, {"resourceType": "Organization", "name": f"社区卫生服务中心 {uuid4().hex[:6]}"})).json()
    type_history = (await client.get("/Organization/_history", params={"_count": 5})).json()
    assert type_history["entry"][0]["resource"]["id"] == created["id"]
    system_history = (await client.get("/_history", params={"_count": 1})).json()
    assert system_history["entry"][0]["resource"]["id"] == created["id"]
    assert any(link["relation"] == "next" for link in system_history["link"])


async def test_history_pages_follow_next_links_without_overlap(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient("周", "瑜"))).json()
    path = f"/Patient/{created['id']}"
    for gender in ("female", "other", "unknown", "male"):
        await client.put(path, json=dict(created, gender=gender), headers={"Content-Type": FHIR})
    seen: list[str] = []
    url: str | None = f"{path}/_history?_count=2"
    while url:
        page = (await client.get(url)).json()
        seen += [e["resource"]["meta"]["versionId"] for e in page["entry"]]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert seen == ["5", "4", "3", "2", "1"]


async def test_conditional_create_no_match_creates_one_match_returns_it(client: httpx.AsyncClient) -> None:
    identifier = f"TEST{uuid4().hex[:10]}"
    condition = f"identifier={MRN}|{identifier}"
    first = await create(client, patient(identifier=identifier), **{"If-None-Exist": condition})
    assert first.status_code == 201
    second = await create(client, patient(identifier=identifier), **{"If-None-Exist": condition})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["meta"]["versionId"] == "1"  # nothing written


async def test_conditional_create_with_several_matches_is_412(client: httpx.AsyncClient) -> None:
    identifier = f"DUP{uuid4().hex[:10]}"
    await create(client, patient(identifier=identifier))
    await create(client, patient(identifier=identifier))
    response = await client.post("/Patient", json=patient(identifier=identifier),
                                 headers={"Content-Type": FHIR,
                                          "If-None-Exist": f"identifier={MRN}|{identifier}"})
    assert response.status_code == 412


async def test_conditional_update_creates_then_updates_the_match(client: httpx.AsyncClient) -> None:
    identifier = f"CU{uuid4().hex[:10]}"
    query = {"identifier": f"{MRN}|{identifier}"}
    first = await client.put("/Patient", params=query, json=patient(identifier=identifier),
                             headers={"Content-Type": FHIR})
    assert first.status_code == 201
    second = await client.put("/Patient", params=query, json=dict(patient(identifier=identifier), gender="female"),
                              headers={"Content-Type": FHIR})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["meta"]["versionId"] == "2"


async def test_conditional_delete_removes_the_single_match(client: httpx.AsyncClient) -> None:
    identifier = f"CD{uuid4().hex[:10]}"
    created = (await create(client, patient(identifier=identifier))).json()
    response = await client.delete("/Patient", params={"identifier": f"{MRN}|{identifier}"})
    assert response.status_code == 204
    assert (await client.get(f"/Patient/{created['id']}")).status_code == 410


async def test_json_patch_creates_a_version(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient("吴", "用"))).json()
    path = f"/Patient/{created['id']}"
    ops = [{"op": "replace", "path": "/gender", "value": "female"},
           {"op": "add", "path": "/telecom", "value": [{"system": "phone", "value": "13800138000"}]}]
    response = await client.patch(path, json=ops, headers={"Content-Type": "application/json-patch+json",
                                                           "If-Match": 'W/"1"'})
    assert response.status_code == 200, response.text
    assert response.json()["gender"] == "female"
    assert response.headers["etag"] == 'W/"2"'


async def test_json_patch_that_breaks_the_resource_is_422_and_writes_nothing(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient("郑", "和"))).json()
    path = f"/Patient/{created['id']}"
    bad = [{"op": "replace", "path": "/gender", "value": "robot"}]
    response = await client.patch(path, json=bad, headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 422
    assert (await client.get(path)).json()["meta"]["versionId"] == "1"
    missing = [{"op": "remove", "path": "/nothing-here"}]
    response = await client.patch(path, json=missing, headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 422


async def test_prefer_return_minimal_and_operation_outcome(client: httpx.AsyncClient) -> None:
    minimal = await client.post("/Patient", json=patient(), headers={"Content-Type": FHIR,
                                                                     "Prefer": "return=minimal"})
    assert minimal.status_code == 201
    assert minimal.content == b""
    assert minimal.headers["location"]
    outcome = await client.post("/Patient", json=patient(), headers={"Content-Type": FHIR,
                                                                     "Prefer": "return=OperationOutcome"})
    assert outcome.status_code == 201
    assert outcome.json()["resourceType"] == "OperationOutcome"


async def test_format_and_accept_negotiation(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient())).json()
    path = f"/Patient/{created['id']}"
    as_json = await client.get(path, params={"_format": "json"})
    assert as_json.status_code == 200
    assert as_json.headers["content-type"].startswith(FHIR)
    plain = await client.get(path, headers={"Accept": "application/json"})
    assert plain.headers["content-type"].startswith("application/json")
    assert (await client.get(path, params={"_format": "xml"})).status_code == 406
    assert (await client.get(path, headers={"Accept": "application/fhir+xml"})).status_code == 406


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/Patient", content=b"<Patient/>", headers={"Content-Type": "application/xml"})
    assert response.status_code == 415
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_unparseable_body_is_400_and_invalid_resource_is_422(client: httpx.AsyncClient) -> None:
    broken = await client.post("/Patient", content=b'{"resourceType": "Patient",', headers={"Content-Type": FHIR})
    assert broken.status_code == 400
    assert broken.json()["resourceType"] == "OperationOutcome"
    identifier = f"BAD{uuid4().hex[:8]}"
    invalid = dict(patient(identifier=identifier), gender="robot", birthDate="1990-13-45")
    response = await client.post("/Patient", json=invalid, headers={"Content-Type": FHIR})
    assert response.status_code == 422
    expressions = [e for issue in response.json()["issue"] for e in issue.get("expression", [])]
    assert any("gender" in e for e in expressions)
    assert any("birthDate" in e for e in expressions)
    found = await client.get("/Patient", params={"identifier": f"{MRN}|{identifier}"})
    assert found.json().get("entry", []) == []  # nothing half-written


async def test_body_type_must_match_url(client: httpx.AsyncClient) -> None:
    response = await client.post("/Patient", json={"resourceType": "Organization"}, headers={"Content-Type": FHIR})
    assert response.status_code == 400


async def test_validate_operation_reports_without_writing(client: httpx.AsyncClient) -> None:
    ok = await client.post("/Patient/$validate", json=patient(), headers={"Content-Type": FHIR})
    assert ok.status_code == 200
    assert ok.json()["issue"][0]["severity"] == "information"
    bad = await client.post("/Patient/$validate", json=dict(patient(), gender="robot"),
                            headers={"Content-Type": FHIR})
    assert bad.status_code == 200
    assert bad.json()["issue"][0]["severity"] == "error"
    wrapped = await client.post("/Patient/$validate", headers={"Content-Type": FHIR}, json={
        "resourceType": "Parameters", "parameter": [{"name": "resource", "resource": dict(patient(), gender="x")}]})
    assert wrapped.json()["issue"][0]["severity"] == "error"


async def test_unsupported_method_is_405_operation_outcome(client: httpx.AsyncClient) -> None:
    response = await client.delete("/metadata")
    assert response.status_code in (404, 405)
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_concurrent_updates_with_same_if_match_exactly_one_wins(client: httpx.AsyncClient) -> None:
    created = (await create(client, patient("冯", "唐"))).json()
    path = f"/Patient/{created['id']}"

    async def attempt(gender: str) -> int:
        response = await client.put(path, json=dict(created, gender=gender),
                                    headers={"Content-Type": FHIR, "If-Match": 'W/"1"'})
        return response.status_code

    statuses = await asyncio.gather(*(attempt(g) for g in ("female", "other", "unknown", "female", "other")))
    assert sorted(statuses) == [200, 412, 412, 412, 412]
    assert await history_count(client, path) == 2


@pytest.mark.parametrize("etag", ['W/"1"', '"1"', "1"])
async def test_if_match_accepts_weak_and_strong_forms(client: httpx.AsyncClient, etag: str) -> None:
    created = (await create(client, patient())).json()
    response = await client.put(f"/Patient/{created['id']}", json=created,
                                headers={"Content-Type": FHIR, "If-Match": etag})
    assert response.status_code == 200
