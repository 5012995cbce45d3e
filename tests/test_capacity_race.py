"""No double booking, ever (R32): real HTTP clients racing against real uvicorn workers.

On PostgreSQL two worker processes share a fresh database; on SQLite one worker (SQLite has
one writer at a time). Nothing in the workers coordinates them but the database: a booking is
a conditional UPDATE of the slot's capacity row with RETURNING.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
import sqlalchemy as sa

from service.capacity._fhir import CHINA
from service.capacity.tables import SLOTS
from service.fhir.access import AccessContext
from service.fhir.db import create_engine
from service.fhir.store import ResourceStore
from service.migrate import upgrade
from tests.live_server import live_server
from tests.test_capacity_support import (
    CLINIC,
    day_bundle,
    load_alliance,
    parameters,
    upward_referral,
)

ORTHOPAEDICS = "HealthcareService/hcs-yq1-orthopaedics"
ORTHOPAEDIST = "PractitionerRole/spec-yq1-orthopaedics-1"


@dataclass
class Server:
    base: str  # http://127.0.0.1:<port>
    database_url: str
    workers: int

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"


def _fresh_database(test_url: str, tmp_path: Path) -> tuple[str, sa.Engine | None]:
    if not test_url.startswith("postgres"):
        return f"sqlite:///{tmp_path / 'race.db'}", None
    name = f"yilian_race_{uuid4().hex[:8]}"
    admin = create_engine(test_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return test_url.rsplit("/", 1)[0] + "/" + name, admin


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    url, admin = _fresh_database(database_url, tmp_path_factory.mktemp("race"))
    workers = 2 if admin is not None else 1
    try:
        upgrade(url)
        engine = create_engine(url)
        load_alliance(ResourceStore(engine))
        engine.dispose()
        with live_server(url, workers=workers) as fhir_base:
            yield Server(fhir_base.removesuffix("/fhir"), url, workers)
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
            admin.dispose()


def _future_day() -> date:
    """A day the real clock sees as bookable: beyond release_before, inside booking_window."""
    return (datetime.now(CHINA) + timedelta(days=3)).date()


async def _setup(server: Server, n: int) -> tuple[list[str], str, str]:
    """n reserved slots (the orthopaedics department reserves everything here), a referred patient."""
    async with httpx.AsyncClient(base_url=server.fhir, timeout=60) as http:
        policy = await http.put(f"{server.base}/admin/capacity/policy/{ORTHOPAEDICS}",
                                json={"specialist_reserved_share": 1})
        assert policy.status_code == 200, policy.text
        schedule_id = f"race-{uuid4().hex[:8]}"
        bundle, slot_ids = day_bundle(schedule_id, _future_day(), n, actor=ORTHOPAEDIST, specialty="394801008")
        published = await http.post("", json=bundle)
        assert published.status_code == 200, published.text
        patient = (await http.post("/Patient", json={"resourceType": "Patient", "name": [{"text": "并发"}],
                                                      "managingOrganization": {"reference": CLINIC}})).json()
    engine = create_engine(server.database_url)
    try:
        referral = await upward_referral(engine, f"Patient/{patient['id']}")
    finally:
        engine.dispose()
    return slot_ids, f"Patient/{patient['id']}", referral


async def _race(server: Server, targets: list[str], patient: str, referral: str) -> list[httpx.Response]:
    """One real HTTP client per booking, all released at the same moment."""
    go = asyncio.Event()
    clients = [httpx.AsyncClient(base_url=server.fhir, timeout=120, headers={"X-Yilian-Organization": CLINIC})
               for _ in targets]

    async def book(client: httpx.AsyncClient, slot: str) -> httpx.Response:
        await go.wait()
        return await client.post("/Appointment/$book",
                                 json=parameters(slot=f"Slot/{slot}", patient=patient, referral=referral))

    try:
        tasks = [asyncio.create_task(book(c, s)) for c, s in zip(clients, targets, strict=True)]
        await asyncio.sleep(0.1)
        go.set()
        return await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def _booked_appointments(server: Server, slot_ids: list[str]) -> Counter[str]:
    """Per slot, how many booked Appointments name it — from the resources themselves."""
    counts: Counter[str] = Counter()
    for slot in slot_ids:
        bundle = httpx.get(f"{server.fhir}/Appointment", params={"slot": f"Slot/{slot}", "status": "booked"},
                           timeout=60).json()
        counts[slot] = bundle["total"]
    return counts


async def test_r32_fifty_clients_booking_one_slot_exactly_one_wins(server: Server) -> None:
    slot_ids, patient, referral = await _setup(server, 4)
    responses = await _race(server, [slot_ids[0]] * 50, patient, referral)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 409: 49}, statuses
    for response in responses:
        if response.status_code == 409:
            assert response.json()["resourceType"] == "OperationOutcome"
            assert response.json()["issue"][0]["code"] == "conflict"
    winner = next(r.json() for r in responses if r.status_code == 200)
    engine = create_engine(server.database_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(SLOTS.c.status, SLOTS.c.appointment_id)
                           .where(SLOTS.c.ref == f"Slot/{slot_ids[0]}")).one()
    engine.dispose()
    assert tuple(row) == ("busy", winner["id"])
    assert _booked_appointments(server, slot_ids[:1]) == {slot_ids[0]: 1}
    slot = httpx.get(f"{server.fhir}/Slot/{slot_ids[0]}", timeout=30).json()
    assert slot["status"] == "busy"


async def test_r32_two_hundred_clients_booking_one_hundred_slots_book_each_once(server: Server) -> None:
    slot_ids, patient, referral = await _setup(server, 100)
    targets = [s for s in slot_ids for _ in range(2)]
    responses = await _race(server, targets, patient, referral)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 100, 409: 100}, statuses
    won = Counter(r.json()["slot"][0]["reference"] for r in responses if r.status_code == 200)
    assert set(won) == {f"Slot/{s}" for s in slot_ids} and set(won.values()) == {1}
    assert set(_booked_appointments(server, slot_ids).values()) == {1}
    engine = create_engine(server.database_url)
    with engine.connect() as conn:
        busy = conn.execute(sa.select(sa.func.count()).select_from(SLOTS).where(
            SLOTS.c.ref.in_([f"Slot/{s}" for s in slot_ids]), SLOTS.c.status == "busy",
            SLOTS.c.appointment_id.is_not(None))).scalar()
    engine.dispose()
    assert busy == 100
    assert server.workers == (2 if server.database_url.startswith("postgres") else 1)


async def test_r32_a_locked_slot_does_not_hold_up_bookings_of_other_slots(server: Server) -> None:
    """Bookings of different slots take different row locks, never one global lock: while a
    transaction holds slot A's rows locked, slot B books; A books once the lock is gone."""
    if not server.database_url.startswith("postgres"):
        pytest.skip("SQLite has one writer at a time by design; row locks are PostgreSQL's")
    slot_ids, patient, referral = await _setup(server, 4)
    slot_a, slot_b = slot_ids[0], slot_ids[1]
    engine = create_engine(server.database_url)
    headers = {"X-Yilian-Organization": CLINIC}
    try:
        with engine.connect() as conn, conn.begin() as locked:
            conn.execute(sa.text("SELECT id FROM resource WHERE resource_type = 'Slot' AND id = :id FOR UPDATE"),
                         {"id": slot_a})
            conn.execute(sa.select(SLOTS.c.ref).where(SLOTS.c.ref == f"Slot/{slot_a}").with_for_update())
            async with httpx.AsyncClient(base_url=server.fhir, timeout=60, headers=headers) as http:
                waiting = asyncio.create_task(http.post("/Appointment/$book", json=parameters(
                    slot=f"Slot/{slot_a}", patient=patient, referral=referral)))
                other = await http.post("/Appointment/$book", json=parameters(
                    slot=f"Slot/{slot_b}", patient=patient, referral=referral))
                assert other.status_code == 200, other.text  # B did not wait for A's lock
                assert not waiting.done()
                locked.rollback()
                assert (await waiting).status_code == 200
    finally:
        engine.dispose()


async def test_r32_a_booking_that_waited_for_a_change_of_its_slot_writes_on_top_of_it(server: Server) -> None:
    """The claim reads the slot's row and its Slot's content in the statement that locks the
    Slot. When another transaction (a HIS adding a comment) changed the Slot while the booking
    waited for that lock, the booking's Slot version builds on the change, not on what was
    there before: nothing the HIS wrote is lost, and the booking still succeeds."""
    if not server.database_url.startswith("postgres"):
        pytest.skip("SQLite has one writer at a time by design; row locks are PostgreSQL's")
    slot_ids, patient, referral = await _setup(server, 2)
    slot = slot_ids[0]
    engine = create_engine(server.database_url)
    store = ResourceStore(engine)
    his = AccessContext.internal("his")
    try:
        async with httpx.AsyncClient(base_url=server.fhir, timeout=60,
                                     headers={"X-Yilian-Organization": CLINIC}) as http:
            with store.write(his) as tx:
                changed = tx.read("Slot", slot).as_dict()
                changed["comment"] = "改在门诊三楼"
                tx.update("Slot", slot, changed)
                waiting = asyncio.create_task(http.post("/Appointment/$book", json=parameters(
                    slot=f"Slot/{slot}", patient=patient, referral=referral)))
                await _until_a_lock_is_awaited(engine)
            booked = await waiting
        assert booked.status_code == 200, booked.text
        with store.read_only(his) as tx:
            now = tx.read("Slot", slot).as_dict()
        assert now["comment"] == "改在门诊三楼" and now["status"] == "busy"
        assert now["meta"]["versionId"] == "3"  # published, the HIS's change, the booking
    finally:
        engine.dispose()


async def _until_a_lock_is_awaited(engine: sa.Engine, timeout: float = 30.0) -> None:
    waited = 0.0
    while waited < timeout:
        with engine.connect() as conn:
            if conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND wait_event_type = 'Lock'")).scalar():
                return
        await asyncio.sleep(0.05)
        waited += 0.05
    raise AssertionError("no booking waited for the Slot's lock")
