"""Shared fixtures and helpers of the reserved-capacity tests (test_capacity_*.py).

The demo alliance (Organization/alliance-yq, hospital-yq1 with its departments, three primary
clinics) plus a second alliance with a clinic of its own; a clock the tests move by hand
(the store and the release functions take the same clock); a HIS that publishes a day of
slots as one transaction Bundle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import uuid4

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from service.app import create_app
from service.capacity._fhir import (
    CHINA,
    KIND_SYSTEM,
    POOL_SYSTEM,
    REFERRAL_DIRECTION_SYSTEM,
)
from service.capacity.tables import SLOTS
from service.config import Settings
from service.demo.alliance import demo_resources
from service.demo.codes import ORGANIZATION_TYPE, org_type
from service.fhir import bundles
from service.fhir.access import AccessContext
from service.fhir.store import ResourceStore

BASE = "http://testserver/fhir"
HOSPITAL = "Organization/hospital-yq1"
ALLIANCE = "Organization/alliance-yq"
CLINIC = "Organization/clinic-yq-shangzhan"  # primary, same alliance
OTHER_CLINIC = "Organization/clinic-other-1"  # primary, another alliance
CARDIOLOGY = "HealthcareService/hcs-yq1-cardiology"
ENDOCRINOLOGY = "HealthcareService/hcs-yq1-endocrinology"
CARDIOLOGIST = "PractitionerRole/spec-yq1-cardiology-1"
#: "now" of the tests: Sunday 1 March 2026, 09:00 in China
START = datetime(2026, 3, 1, 9, 0, tzinfo=CHINA)
DAY = date(2026, 3, 3)  # two days ahead: beyond release_before (24 h), inside the booking window (14 d)


class Clock:
    """A clock the test moves: the store, the hooks and the release run all read it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now.astimezone(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    def set(self, moment: datetime) -> None:
        self.now = moment.astimezone(UTC)


def _other_alliance() -> list[dict[str, Any]]:
    return [
        {"resourceType": "Organization", "id": "alliance-other", "active": True, "type": [org_type("alliance")],
         "name": "另一个医联体"},
        {"resourceType": "Organization", "id": "clinic-other-1", "active": True,
         "type": [{"coding": [{"system": ORGANIZATION_TYPE, "code": "community-health-center"}]}, org_type("primary")],
         "name": "外联体社区卫生服务中心", "partOf": {"reference": "Organization/alliance-other"}},
    ]


def load_alliance(store: ResourceStore) -> None:
    """The demo alliance's organizations, places, services and staff, a few patients, and a
    second alliance; idempotent (PUT with stable ids), skipped when already there."""
    with store.read_only(AccessContext.internal()) as tx:
        if tx.current_content("Organization", "clinic-other-1") and tx.current_content("Patient", "patient-yq-003"):
            return
    wanted = {"Organization", "Location", "HealthcareService", "Practitioner", "PractitionerRole", "Patient"}
    resources = [r for r in demo_resources(patients=3) if r["resourceType"] in wanted] + _other_alliance()
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                        for r in resources]}
    bundles.process_bundle(store, AccessContext.internal("test"), bundle, base_url="")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def capacity_app(engine: sa.Engine, database_url: str, clock: Clock) -> FastAPI:
    app = create_app(Settings(database_url=database_url, base_url=BASE, auth="off"), engine=engine, clock=clock)
    load_alliance(app.state.store)
    return app


@pytest.fixture
async def http(capacity_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=capacity_app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Accept": "application/fhir+json"}) as client:
        yield client


def clinic(org: str = CLINIC) -> dict[str, str]:
    """Headers of a caller acting for an organization (dev header until OAuth lands)."""
    return {"X-Yilian-Organization": org}


# -- publishing (the HIS) ---------------------------------------------------------------------

def schedule_resource(schedule_id: str, *, actor: str = CARDIOLOGIST, kind: str | None = None,
                      specialty: str = "394579002") -> dict[str, Any]:
    schedule: dict[str, Any] = {
        "resourceType": "Schedule", "id": schedule_id, "active": True,
        "actor": [{"reference": actor}],
        "specialty": [{"coding": [{"system": "http://snomed.info/sct", "code": specialty}]}],
        "serviceType": [{"coding": [{"system": "https://yilian.example.org/fhir/CodeSystem/test-service",
                                     "code": "expert-clinic"}], "text": "专家门诊"}],
    }
    if kind:
        schedule["serviceCategory"] = [{"coding": [{"system": KIND_SYSTEM, "code": kind}]}]
    return schedule


def slot_times(day: date, n: int, *, first_hour: int = 8, minutes: int = 15) -> list[tuple[datetime, datetime]]:
    begin = datetime(day.year, day.month, day.day, first_hour, 0, tzinfo=CHINA)
    return [(begin + timedelta(minutes=minutes * i), begin + timedelta(minutes=minutes * (i + 1))) for i in range(n)]


def day_bundle(schedule_id: str, day: date, n: int, *, order: list[int] | None = None, schedule_first: bool = True,
               **schedule_kw: Any) -> tuple[dict[str, Any], list[str]]:
    """A HIS's day as one transaction: PUT the Schedule, PUT its n Slots (ids in time order)."""
    slot_ids = [f"{schedule_id}-{i:03d}" for i in range(n)]
    slots = [{"resourceType": "Slot", "id": slot_ids[i], "schedule": {"reference": f"Schedule/{schedule_id}"},
              "status": "free", "start": s.isoformat(), "end": e.isoformat()}
             for i, (s, e) in enumerate(slot_times(day, n))]
    slots = [slots[i] for i in order] if order else slots
    entries = [{"resource": r, "request": {"method": "PUT", "url": f"Slot/{r['id']}"}} for r in slots]
    schedule = {"resource": schedule_resource(schedule_id, **schedule_kw),
                "request": {"method": "PUT", "url": f"Schedule/{schedule_id}"}}
    entries = [schedule, *entries] if schedule_first else [*entries, schedule]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, slot_ids


async def publish_day(http: httpx.AsyncClient, n: int = 10, *, day: date = DAY, **kw: Any) -> tuple[str, list[str]]:
    schedule_id = f"sch-{uuid4().hex[:10]}"
    bundle, slot_ids = day_bundle(schedule_id, day, n, **kw)
    response = await http.post("", json=bundle)
    assert response.status_code == 200, response.text
    return schedule_id, slot_ids


def pools(engine: sa.Engine, slot_ids: list[str]) -> list[str]:
    """The pools of the slots, in the order given (from the capacity table)."""
    with engine.connect() as conn:
        found = dict(conn.execute(sa.select(SLOTS.c.ref, SLOTS.c.pool)
                                  .where(SLOTS.c.ref.in_([f"Slot/{i}" for i in slot_ids]))).all())
    return [found[f"Slot/{i}"] for i in slot_ids]


def unit(engine: sa.Engine, ref: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(SLOTS).where(SLOTS.c.ref == ref)).mappings().one())


def tag_pool(resource: dict[str, Any]) -> str | None:
    return next((t["code"] for t in resource.get("meta", {}).get("tag", []) if t["system"] == POOL_SYSTEM), None)


# -- patients and referrals ----------------------------------------------------------------------

async def new_patient(http: httpx.AsyncClient, managed_by: str = CLINIC) -> str:
    """A resident registered at a clinic (so that the clinic may book for them)."""
    response = await http.post("/Patient", json={"resourceType": "Patient", "name": [{"text": "测试患者"}],
                                                 "managingOrganization": {"reference": managed_by}})
    assert response.status_code == 201, response.text
    return f"Patient/{response.json()['id']}"


async def upward_referral(engine: sa.Engine, patient: str, *, status: str = "active", direction: str = "up") -> str:
    """An upward referral as the referral package leaves it: an active ServiceRequest of
    category up (R30, R32). Written straight into the store (no referral workflow hooks):
    capacity only reads these, and the referral profile is not what is tested here."""
    referral = {
        "resourceType": "ServiceRequest", "status": status, "intent": "order",
        "category": [{"coding": [{"system": REFERRAL_DIRECTION_SYSTEM, "code": direction}]}],
        "code": {"text": "心内科专家门诊"}, "subject": {"reference": patient},
        "requester": {"reference": "PractitionerRole/gp-yq-shangzhan-1"}, "performer": [{"reference": HOSPITAL}],
    }
    created = ResourceStore(engine).create(AccessContext.internal("test-referral"), referral)
    return created.resource.reference


async def referred_patient(http: httpx.AsyncClient, engine: sa.Engine, managed_by: str = CLINIC) -> tuple[str, str]:
    patient = await new_patient(http, managed_by)
    return patient, await upward_referral(engine, patient)


def parameters(**values: Any) -> dict[str, Any]:
    """A Parameters resource: references, strings and resources by their Python shape."""
    out = []
    for name, value in values.items():
        name = name.replace("_", "-") if name != "_count" else name
        if isinstance(value, dict) and "resourceType" in value:
            out.append({"name": name, "resource": value})
        elif isinstance(value, str) and "/" in value and not value[0].isdigit() and name != "appointment-id":
            out.append({"name": name, "valueReference": {"reference": value}})
        elif isinstance(value, int):
            out.append({"name": name, "valueInteger": value})
        else:
            out.append({"name": name, "valueString": value})
    return {"resourceType": "Parameters", "parameter": out}


def slot_start(slot_index: int, day: date = DAY) -> datetime:
    return slot_times(day, slot_index + 1)[slot_index][0]


@pytest.fixture
def store(capacity_app: FastAPI) -> Iterator[ResourceStore]:
    yield capacity_app.state.store
