"""Organization boundaries (issue #4): nobody sees what their organization does not need.

A small world of two alliances is written once per module through the app's own store (as the
service itself), then read and written through the REST API as each organization (the
development header, authorization off) and, for patient apps and auditors, through tokens.
Every cross-boundary attempt must answer as if the resource did not exist (404, empty search,
totals that count only what is visible) and every write outside must be refused (403).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, date, datetime
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI

from service.demo.resident_id import make_resident_id
from service.fhir.access import AccessContext
from service.fhir.errors import Forbidden, NotFound
from service.fhir.store import ResourceStore
from service.security.policy import BoundaryPolicy
from service.security.resident_id import SYSTEM as RESIDENT_ID
from tests.conftest import bearer

FHIR = {"Content-Type": "application/fhir+json"}
ORG_TYPE = "https://yilian.example.org/fhir/CodeSystem/organization-type"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"


def ref(reference: str) -> dict[str, str]:
    return {"reference": reference}


def resident_id(rng: random.Random, sex: str = "male") -> str:
    birth = date(rng.randint(1940, 2000), rng.randint(1, 12), rng.randint(1, 28))
    return make_resident_id("140302", birth, rng.randint(1, 499), sex)


@dataclass
class World:
    """Ids of one alliance A (desk, hospital with two departments, two clinics) and one other
    alliance B (hospital, clinic), their patients, referrals and records."""

    tag: str
    ids: dict[str, str]
    resident_ids: dict[str, str]
    since: str  # an instant just before the world was written (for _history?_since=)

    def __getitem__(self, key: str) -> str:
        return self.ids[key]

    def as_org(self, key: str) -> dict[str, str]:
        return {"X-Yilian-Organization": f"Organization/{self.ids[key]}"}


def build_world(store: ResourceStore) -> World:
    tag = uuid4().hex[:8]
    rng = random.Random(tag)
    ids = {k: f"{k}-{tag}" for k in (
        "alliance-a", "hosp-a", "dept-a", "dept-a2", "clinic-a1", "clinic-a2", "alliance-b", "hosp-b", "clinic-b",
        "p1", "p2", "p3", "p4", "p5", "cond-p5", "sr1", "task1", "sr4", "sr-x", "sr-b", "cond-p1", "obs-p2",
        "cond-p3", "cond-p4",
        "doc1", "bin1", "role-a1", "consent-p4")}
    rids = {k: resident_id(rng) for k in ("p1", "p2", "p3", "p4", "p5")}
    system = AccessContext.internal("test-world")

    def org(key: str, name: str, *, part_of: str | None = None, kind: str | None = None) -> dict:
        body: dict = {"resourceType": "Organization", "id": ids[key], "name": f"{name} {tag}", "active": True}
        if kind:
            body["type"] = [{"coding": [{"system": ORG_TYPE, "code": kind}]}]
        if part_of:
            body["partOf"] = ref(f"Organization/{ids[part_of]}")
        return body

    def patient(key: str, managing: str, family: str) -> dict:
        return {"resourceType": "Patient", "id": ids[key], "name": [{"family": f"{family}{tag}", "given": ["测试"]}],
                "identifier": [{"system": RESIDENT_ID, "value": rids[key]}],
                "managingOrganization": ref(f"Organization/{ids[managing]}")}

    def condition(key: str, who: str, code: str) -> dict:
        return {"resourceType": "Condition", "id": ids[key], "subject": ref(f"Patient/{ids[who]}"),
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": code}], "text": tag}}

    resources = [
        org("alliance-a", "联盟A", kind="alliance"),
        org("hosp-a", "医院A", part_of="alliance-a", kind="hospital"),
        org("dept-a", "心内科A", part_of="hosp-a", kind="department"),
        org("dept-a2", "骨科A", part_of="hosp-a", kind="department"),
        org("clinic-a1", "社区A1", part_of="alliance-a", kind="community-health-center"),
        org("clinic-a2", "社区A2", part_of="alliance-a", kind="community-health-center"),
        org("alliance-b", "联盟B", kind="alliance"),
        org("hosp-b", "医院B", part_of="alliance-b", kind="hospital"),
        org("clinic-b", "社区B", part_of="alliance-b", kind="community-health-center"),
        {"resourceType": "PractitionerRole", "id": ids["role-a1"], "active": True,
         "organization": ref(f"Organization/{ids['clinic-a1']}")},
        patient("p1", "clinic-a1", "张"),
        patient("p2", "clinic-a2", "李"),
        patient("p3", "clinic-b", "王"),
        patient("p4", "clinic-a1", "赵"),
        patient("p5", "clinic-b", "孙"),  # alliance B only
        # clinic A1 refers P1 up to the cardiology department of hospital A (R30, R32)
        {"resourceType": "ServiceRequest", "id": ids["sr1"], "status": "active", "intent": "order",
         "subject": ref(f"Patient/{ids['p1']}"), "requester": ref(f"PractitionerRole/{ids['role-a1']}"),
         "performer": [ref(f"Organization/{ids['dept-a']}")]},
        {"resourceType": "Task", "id": ids["task1"], "status": "requested", "intent": "order",
         "focus": ref(f"ServiceRequest/{ids['sr1']}"), "for": ref(f"Patient/{ids['p1']}")},
        # an earlier, finished referral of P4 to hospital A
        {"resourceType": "ServiceRequest", "id": ids["sr4"], "status": "completed", "intent": "order",
         "subject": ref(f"Patient/{ids['p4']}"), "requester": ref(f"Organization/{ids['clinic-a1']}"),
         "performer": [ref(f"Organization/{ids['hosp-a']}")]},
        # a referral inside alliance A about alliance B's patient: B must not learn of it
        {"resourceType": "ServiceRequest", "id": ids["sr-x"], "status": "active", "intent": "order",
         "subject": ref(f"Patient/{ids['p3']}"), "requester": ref(f"Organization/{ids['clinic-a1']}"),
         "performer": [ref(f"Organization/{ids['clinic-a2']}")]},
        # hospital B's own referral of P3, which also names A's referral as replaced
        {"resourceType": "ServiceRequest", "id": ids["sr-b"], "status": "active", "intent": "order",
         "subject": ref(f"Patient/{ids['p3']}"), "requester": ref(f"Organization/{ids['hosp-b']}"),
         "replaces": [ref(f"ServiceRequest/{ids['sr1']}")]},
        condition("cond-p1", "p1", "I10"),
        {"resourceType": "Observation", "id": ids["obs-p2"], "status": "final", "code": {"text": tag},
         "subject": ref(f"Patient/{ids['p2']}")},
        condition("cond-p3", "p3", "E11"),
        condition("cond-p4", "p4", "I10"),
        condition("cond-p5", "p5", "I10"),
        {"resourceType": "Binary", "id": ids["bin1"], "contentType": "text/plain", "data": "5Ye66Zmi5bCP57uT"},
        {"resourceType": "DocumentReference", "id": ids["doc1"], "status": "current",
         "subject": ref(f"Patient/{ids['p1']}"), "context": {"related": [ref(f"ServiceRequest/{ids['sr1']}")]},
         "content": [{"attachment": {"contentType": "text/plain", "url": f"Binary/{ids['bin1']}"}}]},
    ]
    since = datetime.now(UTC).isoformat()
    with store.write(system) as tx:
        for resource in resources:
            tx.update(resource["resourceType"], resource["id"], resource)
    return World(tag, ids, rids, since)


@pytest.fixture(scope="module")
def world(app: FastAPI) -> World:
    return build_world(app.state.store)


def system_read(app: FastAPI, resource_type: str, resource_id: str) -> dict:
    return app.state.store.read(AccessContext.internal(), resource_type, resource_id).as_dict()


async def status(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> int:
    return (await client.get(path, headers=headers)).status_code


async def search(client: httpx.AsyncClient, path: str, headers: dict[str, str], **params: str) -> dict:
    response = await client.get(path, params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def entry_ids(bundle: dict, mode: str | None = None) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])
            if "resource" in e and (mode is None or e.get("search", {}).get("mode") == mode)}


# -- reading ----------------------------------------------------------------------------------------

async def test_hospital_sees_its_referral_its_patient_and_the_patients_records(client: httpx.AsyncClient,
                                                                                world: World) -> None:
    hospital = world.as_org("hosp-a")
    for path in (f"/ServiceRequest/{world['sr1']}", f"/Task/{world['task1']}", f"/Patient/{world['p1']}",
                 f"/Condition/{world['cond-p1']}", f"/DocumentReference/{world['doc1']}", f"/Binary/{world['bin1']}"):
        assert await status(client, path, hospital) == 200, path
    for path in (f"/Patient/{world['p2']}", f"/Observation/{world['obs-p2']}", f"/Patient/{world['p3']}",
                 f"/Condition/{world['cond-p3']}", f"/ServiceRequest/{world['sr-x']}"):
        assert await status(client, path, hospital) == 404, path


async def test_a_department_sees_its_referral_and_a_sibling_department_does_not(client: httpx.AsyncClient,
                                                                              world: World) -> None:
    assert await status(client, f"/ServiceRequest/{world['sr1']}", world.as_org("dept-a")) == 200
    assert await status(client, f"/Patient/{world['p1']}", world.as_org("dept-a")) == 200
    assert await status(client, f"/ServiceRequest/{world['sr1']}", world.as_org("dept-a2")) == 404
    assert await status(client, f"/Patient/{world['p1']}", world.as_org("dept-a2")) == 404


async def test_clinic_sees_its_residents_their_records_and_their_referrals(client: httpx.AsyncClient,
                                                                        world: World) -> None:
    clinic = world.as_org("clinic-a1")
    bundle = await search(client, "/Patient", clinic, _id=",".join(world[k] for k in ("p1", "p2", "p3", "p4", "p5")))
    # its two residents, and P3 whom it referred (sr-x)
    assert entry_ids(bundle) == {world["p1"], world["p3"], world["p4"]} and bundle["total"] == 3
    assert await status(client, f"/Condition/{world['cond-p4']}", clinic) == 200
    assert await status(client, f"/ServiceRequest/{world['sr1']}", clinic) == 200
    assert await status(client, f"/Observation/{world['obs-p2']}", clinic) == 404  # another clinic's resident


async def test_alliance_desk_sees_its_alliance_and_not_the_other(client: httpx.AsyncClient, world: World) -> None:
    desk = world.as_org("alliance-a")
    patients = await search(client, "/Patient", desk, _id=",".join(world[k] for k in ("p1", "p2", "p3", "p4", "p5")))
    # every resident of its members, and B's P3 referred inside A (sr-x); never B's P5
    assert entry_ids(patients) == {world[k] for k in ("p1", "p2", "p3", "p4")} and patients["total"] == 4
    assert await status(client, f"/Observation/{world['obs-p2']}", desk) == 200
    assert await status(client, f"/ServiceRequest/{world['sr1']}", desk) == 200
    assert await status(client, f"/Condition/{world['cond-p5']}", desk) == 404
    assert await status(client, f"/Patient/{world['p5']}", desk) == 404


async def test_other_alliance_gets_404_on_read_vread_and_history(client: httpx.AsyncClient, world: World) -> None:
    other = world.as_org("hosp-b")
    for path in (f"/Patient/{world['p1']}", f"/Patient/{world['p1']}/_history/1",
                 f"/Patient/{world['p1']}/_history", f"/Condition/{world['cond-p1']}/_history/1",
                 f"/ServiceRequest/{world['sr1']}/_history"):
        assert await status(client, path, other) == 404, path
    type_history = await search(client, "/Patient/_history", other, _count="1000", _since=world.since)
    assert world["p1"] not in entry_ids(type_history) and world["p3"] in entry_ids(type_history)
    system_history = await search(client, "/_history", other, _count="1000", _since=world.since)
    seen = entry_ids(system_history)
    assert not seen & {world[k] for k in ("p1", "p2", "p4", "cond-p1", "sr1", "doc1", "bin1", "sr-x")}
    assert world["p3"] in seen and world["sr-b"] in seen  # its own


async def test_search_counts_only_what_the_caller_may_see(client: httpx.AsyncClient, world: World) -> None:
    ours = {"_id": ",".join(world[k] for k in ("cond-p1", "cond-p3", "cond-p4", "cond-p5")), "_count": "1"}
    assert (await search(client, "/Condition", world.as_org("hosp-b"), **ours))["total"] == 1  # P3, its referral
    assert (await search(client, "/Condition", world.as_org("hosp-a"), **ours))["total"] == 2  # P1 and P4
    assert (await search(client, "/Condition", world.as_org("clinic-b"), **ours))["total"] == 2  # P3 and P5
    counted = await search(client, "/Condition", world.as_org("hosp-b"), _summary="count", **ours)
    assert counted["total"] == 1 and "entry" not in counted


async def test_include_and_revinclude_leave_out_what_is_not_visible(client: httpx.AsyncClient, world: World) -> None:
    other = world.as_org("hosp-b")
    own = await search(client, "/ServiceRequest", other, _id=world["sr-b"],
                       _include="ServiceRequest:replaces")
    assert entry_ids(own, "match") == {world["sr-b"]}
    assert entry_ids(own, "include") == set()  # A's referral it names stays hidden
    patient = await search(client, "/Patient", other, _id=world["p3"],
                           _revinclude=["ServiceRequest:subject", "Condition:subject"])
    assert entry_ids(patient, "include") == {world["sr-b"], world["cond-p3"]}  # not sr-x
    hospital = await search(client, "/ServiceRequest", world.as_org("hosp-a"), _id=world["sr1"],
                            _include="ServiceRequest:subject", _revinclude="Task:focus")
    assert entry_ids(hospital, "include") == {world["p1"], world["task1"]}


async def test_chains_and_has_do_not_look_into_hidden_resources(client: httpx.AsyncClient, world: World) -> None:
    other = world.as_org("hosp-b")
    has = await search(client, "/Patient", other, _id=world["p3"], **{"_has:ServiceRequest:subject:_id": world["sr-x"]})
    assert has["total"] == 0  # sr-x is A's: its existence must not show through B's own patient
    chain = await search(client, "/ServiceRequest", other, **{"replaces.subject": f"Patient/{world['p1']}"})
    assert chain["total"] == 0
    mine = await search(client, "/Patient", world.as_org("clinic-a1"), _id=world["p1"],
                        **{"_has:ServiceRequest:subject:_id": world["sr1"]})
    assert mine["total"] == 1


async def test_patient_everything_equivalent_shows_only_what_is_shared(client: httpx.AsyncClient,
                                                                     world: World) -> None:
    """Patient/$everything is not implemented; its equivalent is a search with revincludes."""
    params = {"_id": world["p1"], "_revinclude": ["Condition:subject", "ServiceRequest:subject", "Task:patient",
                                                  "DocumentReference:subject", "Observation:subject"]}
    hospital = await search(client, "/Patient", world.as_org("hosp-a"), **params)
    assert entry_ids(hospital) == {world[k] for k in ("p1", "cond-p1", "sr1", "task1", "doc1")}
    other = await search(client, "/Patient", world.as_org("hosp-b"), **params)
    assert entry_ids(other) == set() and other["total"] == 0
    for path, key in (("/Condition", "cond-p1"), ("/DocumentReference", "doc1"), ("/Task", "task1")):
        found = await search(client, path, world.as_org("hosp-b"), patient=world["p1"])
        assert found["total"] == 0, key


async def test_batch_and_transaction_entries_obey_the_boundary(client: httpx.AsyncClient, world: World,
                                                               app: FastAPI) -> None:
    other = {**world.as_org("hosp-b"), **FHIR}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{world['p1']}"}},
        {"request": {"method": "GET", "url": f"Condition?subject=Patient/{world['p1']}"}},
        {"request": {"method": "GET", "url": f"Patient/{world['p3']}"}},
    ]}
    answered = (await client.post("", json=batch, headers=other)).json()["entry"]
    assert answered[0]["response"]["status"].startswith("404")
    assert answered[1]["resource"]["total"] == 0
    assert answered[2]["response"]["status"].startswith("200")
    before = system_read(app, "Patient", world["p1"])
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": world["p1"], "gender": "other"},
         "request": {"method": "PUT", "url": f"Patient/{world['p1']}"}},
    ]}
    refused = await client.post("", json=transaction, headers=other)
    assert refused.status_code == 403, refused.text
    assert system_read(app, "Patient", world["p1"]) == before


async def test_conditional_operations_never_match_hidden_resources(client: httpx.AsyncClient, world: World,
                                                                   app: FastAPI) -> None:
    other = {**world.as_org("hosp-b"), **FHIR}
    criteria = f"identifier={RESIDENT_ID}|{world.resident_ids['p1']}"
    before = system_read(app, "Patient", world["p1"])
    body = {"resourceType": "Patient", "identifier": [{"system": RESIDENT_ID, "value": world.resident_ids["p1"]}],
            "managingOrganization": ref(f"Organization/{world['hosp-b']}")}
    created = await client.post("/Patient", json=body, headers={**other, "If-None-Exist": criteria})
    assert created.status_code == 201 and created.json()["id"] != world["p1"]  # B's own record, not A's
    updated = await client.put(f"/Patient?{criteria}&organization=Organization/{world['hosp-b']}",
                               json=body, headers=other)
    assert updated.status_code == 200 and updated.json()["id"] == created.json()["id"]
    deleted = await client.delete("/Patient", params={"_id": world["p1"]}, headers=other)
    assert deleted.status_code == 204
    assert system_read(app, "Patient", world["p1"]) == before  # neither revealed, changed nor deleted
    conditional_reference = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Condition", "subject": ref(f"Patient?{criteria}&_id={world['p1']}")},
         "request": {"method": "POST", "url": "Condition"}}]}
    refused = await client.post("", json=conditional_reference, headers=other)
    assert refused.status_code == 412 and "matches no resources" in refused.text


# -- writing ------------------------------------------------------------------------------------------

async def test_writes_outside_the_boundary_are_forbidden(client: httpx.AsyncClient, world: World,
                                                         app: FastAPI) -> None:
    other = {**world.as_org("hosp-b"), **FHIR}
    p1 = system_read(app, "Patient", world["p1"])
    assert (await client.put(f"/Patient/{world['p1']}", json=p1, headers=other)).status_code == 403
    assert (await client.delete(f"/ServiceRequest/{world['sr1']}", headers=other)).status_code == 403
    grab = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "subject": ref(f"Patient/{world['p1']}"), "requester": ref(f"Organization/{world['hosp-b']}")}
    assert (await client.post("/ServiceRequest", json=grab, headers=other)).status_code == 403
    record = {"resourceType": "Condition", "subject": ref(f"Patient/{world['p1']}"), "code": {"text": "x"}}
    assert (await client.post("/Condition", json=record, headers=other)).status_code == 403
    for_someone_else = {"resourceType": "Patient", "managingOrganization": ref(f"Organization/{world['clinic-a1']}")}
    assert (await client.post("/Patient", json=for_someone_else, headers=other)).status_code == 403
    assert await status(client, f"/Patient/{world['p1']}", world.as_org("clinic-a1")) == 200
    assert system_read(app, "Patient", world["p1"])["meta"]["versionId"] == p1["meta"]["versionId"]


async def test_each_write_is_judged_by_its_own_references(client: httpx.AsyncClient, world: World) -> None:
    """The reference check's statement is shared by writes of the same shape from the same
    caller (service.security.policy._statement); its answer must follow each write's ids."""
    clinic = {**world.as_org("clinic-a1"), **FHIR}
    for patient, expected in [("p1", 201), ("p5", 403), ("p4", 201), ("p5", 403), ("p1", 201)]:
        record = {"resourceType": "Condition", "subject": ref(f"Patient/{world[patient]}"), "code": {"text": "x"}}
        assert (await client.post("/Condition", json=record, headers=clinic)).status_code == expected, patient
    both = {"resourceType": "Condition", "subject": ref(f"Patient/{world['p1']}"), "code": {"text": "x"},
            "asserter": ref(f"Patient/{world['p4']}")}
    assert (await client.post("/Condition", json=both, headers=clinic)).status_code == 201
    both["asserter"] = ref(f"Patient/{world['p5']}")
    assert (await client.post("/Condition", json=both, headers=clinic)).status_code == 403


async def test_writes_inside_the_boundary_succeed(client: httpx.AsyncClient, world: World) -> None:
    clinic = {**world.as_org("clinic-a1"), **FHIR}
    own = {"resourceType": "Patient", "managingOrganization": ref(f"Organization/{world['clinic-a1']}")}
    created = await client.post("/Patient", json=own, headers=clinic)
    assert created.status_code == 201, created.text
    referral = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                "subject": ref(f"Patient/{created.json()['id']}"),
                "requester": ref(f"Organization/{world['clinic-a1']}"),
                "performer": [ref(f"Organization/{world['hosp-a']}")]}
    sent = await client.post("/ServiceRequest", json=referral, headers=clinic)
    assert sent.status_code == 201, sent.text
    # the hospital receives it and may now see and answer it
    hospital = {**world.as_org("hosp-a"), **FHIR}
    assert await status(client, f"/Patient/{created.json()['id']}", hospital) == 200
    accepted = dict(sent.json(), status="completed")
    assert (await client.put(f"/ServiceRequest/{accepted['id']}", json=accepted, headers=hospital)).status_code == 200


async def test_directory_data_is_shared_but_written_only_by_its_owner(client: httpx.AsyncClient, world: World,
                                                                       app: FastAPI) -> None:
    clinic_a1 = system_read(app, "Organization", world["clinic-a1"])
    assert await status(client, f"/Organization/{world['clinic-a1']}", world.as_org("hosp-b")) == 200
    changed = dict(clinic_a1, alias=["改名"])
    assert (await client.put(f"/Organization/{world['clinic-a1']}", json=changed,
                             headers={**world.as_org("hosp-b"), **FHIR})).status_code == 403
    department = system_read(app, "Organization", world["dept-a2"])
    renamed = dict(department, alias=[f"骨科 {world.tag}"])
    assert (await client.put(f"/Organization/{world['dept-a2']}", json=renamed,
                             headers={**world.as_org("hosp-a"), **FHIR})).status_code == 200


async def test_attachments_follow_their_referral(client: httpx.AsyncClient, world: World) -> None:
    assert await status(client, f"/Binary/{world['bin1']}", world.as_org("dept-a")) == 200
    assert await status(client, f"/Binary/{world['bin1']}", world.as_org("hosp-b")) == 404
    assert await status(client, f"/Binary/{world['bin1']}", world.as_org("clinic-a2")) == 404
    upload = {"resourceType": "Binary", "contentType": "text/plain", "data": "dGVzdA=="}
    stored = await client.post("/Binary", json=upload, headers={**world.as_org("hosp-b"), **FHIR})
    assert stored.status_code == 201  # an upload may come before the DocumentReference linking it
    assert await status(client, f"/Binary/{stored.json()['id']}", world.as_org("clinic-a1")) == 404
    pointing = {"resourceType": "DocumentReference", "status": "current", "subject": ref(f"Patient/{world['p3']}"),
                "content": [{"attachment": {"url": f"Binary/{world['bin1']}"}}]}
    refused = await client.post("/DocumentReference", json=pointing, headers={**world.as_org("hosp-b"), **FHIR})
    assert refused.status_code == 403  # no access to A's document by pointing at it


async def test_a_draft_referral_is_the_senders_until_it_is_sent(client: httpx.AsyncClient, world: World,
                                                              app: FastAPI) -> None:
    clinic, hospital = {**world.as_org("clinic-a2"), **FHIR}, world.as_org("hosp-a")
    draft = {"resourceType": "ServiceRequest", "status": "draft", "intent": "order",
             "subject": ref(f"Patient/{world['p2']}"), "requester": ref(f"Organization/{world['clinic-a2']}"),
             "performer": [ref(f"Organization/{world['hosp-a']}")]}
    created = await client.post("/ServiceRequest", json=draft, headers=clinic)
    assert created.status_code == 201, created.text
    path = f"/ServiceRequest/{created.json()['id']}"
    assert await status(client, path, clinic) == 200
    assert await status(client, path, hospital) == 404  # not sent: not the hospital's yet
    assert await status(client, f"/Patient/{world['p2']}", hospital) == 404
    sent = await client.put(path, json=dict(created.json(), status="active"), headers=clinic)
    assert sent.status_code == 200
    assert await status(client, path, hospital) == 200
    assert await status(client, f"/Patient/{world['p2']}", hospital) == 200
    assert await status(client, f"/Observation/{world['obs-p2']}", hospital) == 200  # treating now
    revoked = await client.put(path, json=dict(sent.json(), status="revoked"), headers=clinic)
    assert revoked.status_code == 200


async def test_a_receivers_task_stays_visible_while_another_task_is_a_draft(
        client: httpx.AsyncClient, world: World, app: FastAPI) -> None:
    """The "not while draft" test of a Task's receivers is about *that* Task: its subquery once
    lost its correlation (two levels down) and asked whether any draft Task existed at all."""
    system = AccessContext.internal("test")
    sent = app.state.store.create(system, {
        "resourceType": "Task", "status": "requested", "intent": "order",
        "requester": ref(f"Organization/{world['clinic-a1']}"), "owner": ref(f"Organization/{world['hosp-a']}"),
    }).resource
    draft = app.state.store.create(system, {
        "resourceType": "Task", "status": "draft", "intent": "order",
        "requester": ref(f"Organization/{world['clinic-b']}"), "owner": ref(f"Organization/{world['hosp-b']}"),
    }).resource
    hospital = world.as_org("hosp-a")
    assert await status(client, f"/Task/{sent.id}", hospital) == 200
    assert await status(client, f"/Task/{draft.id}", world.as_org("hosp-b")) == 404  # a draft is the sender's
    assert await status(client, f"/Task/{draft.id}", world.as_org("clinic-b")) == 200


# -- consent (R50) ----------------------------------------------------------------------------------

async def test_rejected_consent_stops_sharing_beyond_treating_organizations(client: httpx.AsyncClient,
                                                                            world: World, app: FastAPI) -> None:
    hospital, clinic, desk = world.as_org("hosp-a"), world.as_org("clinic-a1"), world.as_org("alliance-a")
    condition = f"/Condition/{world['cond-p4']}"
    assert await status(client, condition, hospital) == 200  # shared after the finished referral
    system = AccessContext.internal("test")
    consent = {"resourceType": "Consent", "id": world["consent-p4"], "status": "rejected",
               "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
               "category": [{"text": "record sharing"}], "patient": ref(f"Patient/{world['p4']}")}
    app.state.store.update(system, "Consent", consent["id"], consent)
    try:
        assert await status(client, condition, hospital) == 404  # not treating: the referral is finished
        assert await status(client, condition, desk) == 404  # the desk treats nobody
        assert await status(client, condition, clinic) == 200  # the family doctor is treating
        assert await status(client, f"/Patient/{world['p4']}", hospital) == 200  # the referral itself stays
        assert await status(client, f"/ServiceRequest/{world['sr4']}", hospital) == 200
        referral = system_read(app, "ServiceRequest", world["sr4"])
        app.state.store.update(system, "ServiceRequest", world["sr4"], dict(referral, status="active"))
        assert await status(client, condition, hospital) == 200  # treating again
        app.state.store.update(system, "ServiceRequest", world["sr4"], dict(referral, status="completed"))
    finally:
        app.state.store.update(system, "Consent", consent["id"], dict(consent, status="active"))
    assert await status(client, condition, hospital) == 200


# -- patient apps and contexts built directly ------------------------------------------------------

async def test_patient_app_sees_only_its_patient(auth_client: httpx.AsyncClient, token_for, world: World) -> None:
    token = token_for("patient/*.rs", patient=world["p1"], user=f"resident-{world.tag}", organization=None)
    headers = bearer(token)
    assert (await auth_client.get(f"/Patient/{world['p1']}", headers=headers)).status_code == 200
    assert (await auth_client.get(f"/Condition/{world['cond-p1']}", headers=headers)).status_code == 200
    assert (await auth_client.get(f"/ServiceRequest/{world['sr1']}", headers=headers)).status_code == 200
    assert (await auth_client.get(f"/Patient/{world['p4']}", headers=headers)).status_code == 404
    assert (await auth_client.get(f"/Condition/{world['cond-p4']}", headers=headers)).status_code == 404
    conditions = await auth_client.get("/Condition", params={"_id": f"{world['cond-p1']},{world['cond-p4']}"},
                                       headers=headers)
    assert entry_ids(conditions.json()) == {world["cond-p1"]}


async def test_callers_searching_alike_share_statements_but_not_what_they_see(
        client: httpx.AsyncClient, auth_client: httpx.AsyncClient, token_for, world: World) -> None:
    """Searches of one shape under one caller's boundary share statements (keyed by the
    policies' visibility_key): every caller must still see exactly its own, whatever ran before."""
    from service.fhir.search import execute as search_engine

    search_engine._PLANS.clear()
    ids = f"{world['p1']},{world['p4']},{world['p5']}"
    for _ in range(2):
        for org, expected in [("clinic-a1", {"p1", "p4"}), ("clinic-b", {"p5"}), ("hosp-b", set()),
                              ("clinic-a1", {"p1", "p4"})]:
            bundle = await search(client, "/Patient", world.as_org(org), _id=ids)
            assert entry_ids(bundle) == {world[k] for k in expected}, org
            rid = world.resident_ids["p1"]
            by_identifier = await search(client, "/Patient", world.as_org(org), identifier=f"{RESIDENT_ID}|{rid}")
            # (another test gives hosp-b a Patient of its own with this resident ID)
            assert (world["p1"] in entry_ids(by_identifier)) == ("p1" in expected), org
            read = await client.get(f"/Patient/{world['p5']}", headers=world.as_org(org))
            assert read.status_code == (200 if "p5" in expected else 404), org
    assert len(search_engine._PLANS) == 6  # two shapes × three boundaries (clinic-a1, clinic-b, hosp-b)
    # SMART patient context: the same scopes for two patients are two visibilities
    for patient, other in [("p1", "p4"), ("p4", "p1"), ("p1", "p4")]:
        token = token_for("patient/*.rs", patient=world[patient], user=f"resident-{world.tag}", organization=None)
        found = await auth_client.get("/Patient", params={"_id": f"{world['p1']},{world['p4']}"},
                                      headers=bearer(token))
        assert entry_ids(found.json()) == {world[patient]}, patient
        assert (await auth_client.get(f"/Patient/{world[other]}", headers=bearer(token))).status_code == 404


def test_store_level_contexts_follow_the_same_rules(engine, world: World, settings) -> None:
    store = ResourceStore(engine, policy=BoundaryPolicy(settings.model_copy(update={"auth": "on"})))
    patient_app = AccessContext(client_id="app", patient=f"Patient/{world['p2']}")
    assert store.read(patient_app, "Observation", world["obs-p2"]).id == world["obs-p2"]
    with pytest.raises(NotFound):
        store.read(patient_app, "Patient", world["p1"])
    nobody = AccessContext(client_id="no-org")  # authenticated, acting for no one
    with pytest.raises(NotFound):
        store.read(nobody, "Patient", world["p1"])
    assert store.read(nobody, "Organization", world["hosp-a"]).id == world["hosp-a"]  # directory data
    with pytest.raises(Forbidden):
        store.create(nobody, {"resourceType": "Basic", "code": {"text": "x"}})
    internal = AccessContext.internal()
    assert store.read(internal, "Patient", world["p1"]).id == world["p1"]


def test_unrestricted_development_callers_see_everything(engine, world: World, settings) -> None:
    store = ResourceStore(engine, policy=BoundaryPolicy(settings))  # YILIAN_AUTH=off in the tests
    anonymous = AccessContext(client_id="anonymous")
    assert store.read(anonymous, "Patient", world["p3"]).id == world["p3"]
    assert store.read(anonymous, "Condition", world["cond-p1"]).id == world["cond-p1"]
