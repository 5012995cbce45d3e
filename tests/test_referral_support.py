"""Shared fixtures and helpers of the referral tests (tests/test_referral_*.py).

The tests talk HTTP to an app with an injectable clock, over the demo alliance of Yangquan:
the grassroots institutions send with ``X-Yilian-Organization: Organization/clinic-yq-...``,
the lead hospital (or one of its departments) receives with its own header. Each test makes
its own patients, so tests never see each other's referrals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.demo.alliance import demo_resources
from service.demo.resident_id import make_resident_id
from service.fhir import bundles, tables
from service.fhir.access import AccessContext
from service.fhir.store import ResourceStore
from service.referral import codes

BASE = "http://testserver/fhir"
CHINA = timezone(timedelta(hours=8))
#: "now" of the referral tests: Monday 2 March 2026, 09:00 in China
START = datetime(2026, 3, 2, 9, 0, tzinfo=CHINA)

ALLIANCE = "Organization/alliance-yq"
HOSPITAL = "Organization/hospital-yq1"
CARDIOLOGY = "Organization/dept-yq1-cardiology"
ENDOCRINOLOGY = "Organization/dept-yq1-endocrinology"
ORTHOPAEDICS = "Organization/dept-yq1-orthopaedics"
REHABILITATION = "Organization/dept-yq1-rehabilitation"
SHANGZHAN = "Organization/clinic-yq-shangzhan"  # community health center, 城区 (chengqu)
QIAOTOU = "Organization/clinic-yq-qiaotou"  # community health center, 矿区 (kuangqu)
HEDI = "Organization/clinic-yq-hedi"  # township hospital, 郊区 (jiaoqu)
GP = "PractitionerRole/gp-yq-shangzhan-1"
HEDI_GP = "PractitionerRole/gp-yq-hedi-1"
CARDIOLOGIST = "PractitionerRole/spec-yq1-cardiology-1"
TEAM = {SHANGZHAN: "CareTeam/team-yq-shangzhan", QIAOTOU: "CareTeam/team-yq-qiaotou", HEDI: "CareTeam/team-yq-hedi"}
GP_OF = {SHANGZHAN: GP, QIAOTOU: "PractitionerRole/gp-yq-qiaotou-1", HEDI: HEDI_GP}
DISTRICT_OF = {SHANGZHAN: ("140302", "城区"), QIAOTOU: ("140303", "矿区"), HEDI: ("140311", "郊区")}
RESIDENT_ID = "urn:oid:2.16.156.10011.1.1"
PLACER = "https://his.example.org/referral"
LOINC = "http://loinc.org"


class Clock:
    """A clock the test moves: the store, the hooks and the sweep all read it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now.astimezone(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    def set(self, moment: datetime) -> None:
        self.now = moment.astimezone(UTC)


def load_alliance(store: ResourceStore) -> None:
    """Organizations, places, services, staff and teams of the demo alliance (idempotent PUTs)."""
    with store.read_only(AccessContext.internal()) as tx:
        if tx.current_content("CareTeam", "team-yq-hedi") and tx.current_content("HealthcareService",
                                                                              "hcs-yq1-rehabilitation"):
            return
    wanted = {"Organization", "Location", "HealthcareService", "Practitioner", "PractitionerRole", "CareTeam"}
    resources = [r for r in demo_resources(patients=3) if r["resourceType"] in wanted]
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                        for r in resources]}
    bundles.process_bundle(store, AccessContext.internal("test"), bundle, base_url="")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def referral_app(engine: sa.Engine, database_url: str, clock: Clock) -> FastAPI:
    # YILIAN_AUTH=off: callers name their organization in the dev header (the boundary policy
    # of service/security still applies to them)
    app = create_app(Settings(database_url=database_url, base_url=BASE, auth="off"), engine=engine, clock=clock)
    load_alliance(app.state.store)
    return app


@pytest.fixture
async def http(referral_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=referral_app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Accept": "application/fhir+json"}) as client:
        yield client


def acting(org: str | None) -> dict[str, str]:
    """Headers of a caller acting for an organization (the dev header until OAuth lands)."""
    return {"X-Yilian-Organization": org} if org else {}


# -- patients ---------------------------------------------------------------------------------

async def new_patient(http: httpx.AsyncClient, clinic: str = SHANGZHAN, *, coverage: str | None = "urban-employee",
                      district: tuple[str, str] | None = None, managed: bool = True) -> dict[str, Any]:
    """A resident of ``clinic``'s district, managed there, with the clinic's GP; returns
    {"ref", "resident_id", "coverage"}."""
    code, name = district or DISTRICT_OF[clinic]
    number = uuid4().int
    birth = date(1940, 1, 1) + timedelta(days=number % 21000)  # a valid, practically unique resident ID
    resident_id = make_resident_id(code, birth, number // 21000 % 499 + 1, "male")
    patient = {
        "resourceType": "Patient", "name": [{"text": "转诊测试患者", "family": "转", "given": ["测试"]}],
        "gender": "male", "birthDate": birth.isoformat(),
        "identifier": [{"system": RESIDENT_ID, "value": resident_id}],
        "address": [{"use": "home", "text": f"山西省阳泉市{name}某街1号", "city": "阳泉市", "district": name,
                     "state": "山西省", "country": "CN"}],
        "generalPractitioner": [{"reference": GP_OF[clinic]}],
    }
    if managed:
        patient["managingOrganization"] = {"reference": clinic}
    response = await http.post("/Patient", json=patient, headers=acting(clinic))
    assert response.status_code == 201, response.text
    ref = f"Patient/{response.json()['id']}"
    out = {"ref": ref, "resident_id": resident_id, "coverage": None}
    if coverage:
        created = await http.post("/Coverage", headers=acting(clinic), json={
            "resourceType": "Coverage", "status": "active",
            "type": {"coding": [{"system": codes.COVERAGE_TYPE, "code": coverage}]},
            "beneficiary": {"reference": ref}, "payor": [{"reference": "Organization/insurer-yq"}],
        })
        assert created.status_code == 201, created.text
        out["coverage"] = f"Coverage/{created.json()['id']}"
    return out


async def contract(http: httpx.AsyncClient, patient: str, clinic: str, *, status: str = "active",
                   start: str = "2026-01-01", end: str = "2026-12-31") -> str:
    """A family-doctor contract (R1, R2): CarePlan of category family-doctor-contract for the team."""
    response = await http.post("/CarePlan", headers=acting(clinic), json={
        "resourceType": "CarePlan", "status": status, "intent": "plan",
        "category": [codes.concept(codes.CAREPLAN_CATEGORY, "family-doctor-contract", "家庭医生签约")],
        "subject": {"reference": patient}, "period": {"start": start, "end": end},
        "careTeam": [{"reference": TEAM[clinic]}], "author": {"reference": GP_OF[clinic]},
    })
    assert response.status_code == 201, response.text
    return f"CarePlan/{response.json()['id']}"


async def document(http: httpx.AsyncClient, patient: str, org: str, loinc: str = "18842-5",
                   title: str = "出院小结") -> str:
    response = await http.post("/DocumentReference", headers=acting(org), json=document_body(patient, loinc, title))
    assert response.status_code == 201, response.text
    return f"DocumentReference/{response.json()['id']}"


def document_body(patient: str, loinc: str = "18842-5", title: str = "出院小结") -> dict[str, Any]:
    return {"resourceType": "DocumentReference", "status": "current",
            "type": {"coding": [{"system": LOINC, "code": loinc}], "text": title},
            "subject": {"reference": patient},
            "content": [{"attachment": {"contentType": "text/plain", "title": title,
                                        "data": "5Ye66Zmi5bCP57uT"}}]}


async def encounter(http: httpx.AsyncClient, patient: str, org: str) -> str:
    response = await http.post("/Encounter", headers=acting(org), json={
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": patient}, "serviceProvider": {"reference": org},
    })
    assert response.status_code == 201, response.text
    return f"Encounter/{response.json()['id']}"


# -- referrals --------------------------------------------------------------------------------

def referral(patient: str, *, direction: str = "up", icd10: str = "I20.0", service: str = "outpatient-specialist",
             priority: str = "routine", requester: str = GP, performer: list[str] | None = None,
             criteria: tuple[str, ...] = (), override: str | None = None, supporting: list[str] | None = None,
             insurance: str | None = None, status: str = "active", **extra: Any) -> dict[str, Any]:
    """A referral that conforms to the profile (StructureDefinition/referral)."""
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "PLAC"}]},
                        "system": PLACER, "value": uuid4().hex[:12]}],
        "status": status, "intent": "order",
        "category": [codes.concept(codes.DIRECTION, direction, "上转" if direction == "up" else "下转"),
                     codes.concept(codes.SNOMED, codes.PATIENT_REFERRAL, "Patient referral")],
        "priority": priority,
        "code": codes.concept(codes.SERVICE, service),
        "subject": {"reference": patient},
        "requester": {"reference": requester},
        "reasonCode": [codes.concept(codes.ICD10, icd10)],
    }
    if performer:
        body["performer"] = [{"reference": p} for p in performer]
    extensions = [{"url": codes.EXT_CRITERION, "valueCoding": codes.coding(codes.CRITERION, c)} for c in criteria]
    if override:
        extensions.append({"url": codes.EXT_OVERRIDE_REASON, "valueString": override})
    if extensions:
        body["extension"] = extensions
    if supporting:
        body["supportingInfo"] = [{"reference": s} for s in supporting]
    if insurance:
        body["insurance"] = [{"reference": insurance}]
    body.update(extra)
    return body


async def send(http: httpx.AsyncClient, body: dict[str, Any], org: str = SHANGZHAN) -> dict[str, Any]:
    response = await http.post("/ServiceRequest", json=body, headers=acting(org))
    assert response.status_code == 201, response.text
    return response.json()


async def task_of(http: httpx.AsyncClient, referral_id: str, org: str = SHANGZHAN) -> dict[str, Any]:
    bundle = (await http.get("/Task", params={"focus": f"ServiceRequest/{referral_id}"}, headers=acting(org))).json()
    entries = bundle.get("entry", [])
    assert len(entries) == 1, bundle
    return entries[0]["resource"]


async def move(http: httpx.AsyncClient, task: dict[str, Any], status: str, org: str | None,
               **changes: Any) -> httpx.Response:
    """PUT the Task with a new status (and other changes) as ``org``."""
    body = {k: v for k, v in task.items() if k != "meta"}
    body.update(status=status, **changes)
    return await http.put(f"/Task/{task['id']}", json=body, headers=acting(org))


async def reread(http: httpx.AsyncClient, resource_type: str, resource_id: str,
                 org: str = SHANGZHAN) -> dict[str, Any]:
    response = await http.get(f"/{resource_type}/{resource_id}", headers=acting(org))
    assert response.status_code == 200, response.text
    return response.json()


def events(engine: sa.Engine, topic: str | None = None, **match: str) -> list[dict[str, Any]]:
    """Outbox payloads (oldest first) of ``topic`` whose fields equal ``match``."""
    outbox = tables.OutboxEvent.__table__
    query = sa.select(outbox.c.topic, outbox.c.payload).order_by(outbox.c.seq)
    if topic:
        query = query.where(outbox.c.topic == topic)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [dict(payload, topic=t) for t, payload in rows if all(payload.get(k) == v for k, v in match.items())]


def issues_text(response: httpx.Response) -> str:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return " | ".join(i.get("diagnostics", "") + " @" + ",".join(i.get("expression", [])) for i in outcome["issue"])


async def found_ids(http: httpx.AsyncClient, resource_type: str, org: str, **params: str) -> list[str]:
    """Ids a search finds for a caller acting for ``org``."""
    response = await http.get(f"/{resource_type}", params={**params, "_count": "1000"}, headers=acting(org))
    assert response.status_code == 200, response.text
    return [e["resource"]["id"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"]


def assert_refused(response: httpx.Response, source: str, target: str, org: str | None, *, side: bool) -> None:
    """A move the workflow refuses: 422 naming from, to and who. A caller outside the referral
    (``side`` False) may instead be stopped earlier by the organization boundary of
    service/security (403/404) — refused either way, never written."""
    if not side and response.status_code in (403, 404):
        return
    assert response.status_code == 422, f"{source} -> {target} by {org}: {response.text}"
    text = issues_text(response)
    assert source in text and target in text and "Task.status" in text, text
    assert (org or "no organization") in text, text
