"""``python -m bench.booking``: reserved-capacity booking under load (R32, issue #5).

A run:

1. creates a fresh PostgreSQL database (dropped at the end), migrates it, and loads the demo
   alliance's organizations and staff;
2. starts ``uvicorn service.main:app --workers 2`` on a free loopback port
   (``YILIAN_AUTH=off``: the caller names its clinic in ``X-Yilian-Organization``) and waits
   for ``/healthz``;
3. lets the orthopaedics department reserve all of its slots (admin policy API) and publishes
   ``--slots`` slots (one transaction Bundle per 100 slots), all in the reserved pool;
4. writes one patient with an active upward referral per client (straight into the store);
5. warms up on a separate day, then books the slots through ``POST /fhir/Appointment/$book``
   as a grassroots clinic at ``--clients`` concurrent connections, every slot asked for once:
   by default with wrk (``bench/lua/book.lua``, one Lua state handing out the slots; the run
   is timed to the last answer), or with ``--load httpx``, ``--clients`` httpx clients in this
   process taking slots from a shared queue (that generator needs most of a core itself, so
   on 2 cores it cannot show more than ~100 bookings/s);
6. reports bookings/s, p50/p99 latency, and checks in the database that the bookings equal
   the slots: every slot busy with exactly one booked Appointment, no 409, no error;
7. for comparison, lets the same clients create as many plain Appointments (no slot): the cost
   of one write on this stack, which a booking (an Appointment and a Slot version) exceeds.

Exit status 1 when the check fails; a throughput under the target is reported, not failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from uuid import uuid4

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET = 300.0  # bookings/s, PostgreSQL, 2 workers, this 2-core machine
CLINIC = "Organization/clinic-yq-shangzhan"
ORTHOPAEDICS = "HealthcareService/hcs-yq1-orthopaedics"
ORTHOPAEDIST = "PractitionerRole/spec-yq1-orthopaedics-1"
REFERRAL_DIRECTION = "https://yilian.example.org/fhir/CodeSystem/referral-direction"


@dataclass
class Result:
    database: str
    load: str  # the load generator: wrk or httpx
    workers: int
    clients: int
    slots: int
    bookings: int
    conflicts: int
    errors: int
    seconds: float
    bookings_per_second: float
    p50_ms: float
    p99_ms: float
    busy_slots: int
    booked_appointments: int
    check: bool
    app_cpu_ms_per_booking: float = 0.0  # uvicorn workers' CPU / bookings
    db_cpu_ms_per_booking: float = 0.0  # PostgreSQL backends' CPU / bookings
    plain_creates_per_second: float | None = None  # POST /Appointment without a slot, same clients
    app_cpu_ms_per_plain_create: float | None = None
    db_cpu_ms_per_plain_create: float | None = None

    def table(self) -> str:
        verdict = "ok" if self.bookings_per_second >= TARGET else f"below the {TARGET:.0f}/s target"
        plain = ("-" if self.plain_creates_per_second is None else
                 f"{self.plain_creates_per_second:.0f}/s, {self.app_cpu_ms_per_plain_create} + "
                 f"{self.db_cpu_ms_per_plain_create} ms")
        return "\n".join([
            "| database | load | workers | clients | slots | bookings | bookings/s | p50 ms | p99 ms | bookings = slots "
            "| CPU ms per booking (app + db) | plain create, same stack (rate, CPU ms app + db) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {self.database} | {self.load} | {self.workers} | {self.clients} | {self.slots} | {self.bookings} | "
            f"{self.bookings_per_second:.0f} ({verdict}) | {self.p50_ms:.1f} | {self.p99_ms:.1f} | "
            f"{'yes' if self.check else 'NO'} | {self.app_cpu_ms_per_booking} + {self.db_cpu_ms_per_booking} | "
            f"{plain} |",
        ])


# -- the server ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _create_database(admin_url: str) -> tuple[str, sa.Engine]:
    from service.fhir.db import create_engine

    name = f"yilian_booking_{uuid4().hex[:8]}"
    admin = create_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name, admin


def _start(url: str, workers: int, port: int) -> subprocess.Popen:
    env = dict(os.environ, YILIAN_DATABASE_URL=url, YILIAN_AUTH="off", YILIAN_LOG_LEVEL="warning",
               YILIAN_BASE_URL=f"http://127.0.0.1:{port}/fhir")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            raise SystemExit("uvicorn did not start")
        time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the process group we started
            process.wait()


# -- CPU accounting: the machine is shared, so count what the server and database really used --------

def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of these processes so far (Linux /proc), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _server_pids(process: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    return [process.pid, *(int(p) for p in children.read_text().split())] if children.exists() else [process.pid]


def _database_pids(url: str) -> list[int]:
    """The PostgreSQL backends serving the bench database (the server's connection pools)."""
    from service.fhir.db import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                             "AND pid <> pg_backend_pid()")).scalars())
    finally:
        engine.dispose()


def _measure(process: subprocess.Popen, url: str, load):  # type: ignore[no-untyped-def]
    """Run ``load()`` and return (its result, app CPU seconds, database CPU seconds)."""
    app_pids = _server_pids(process)
    db_before = {pid: _cpu_seconds([pid]) for pid in _database_pids(url)}
    app_before = _cpu_seconds(app_pids)
    result = load()
    app = _cpu_seconds(app_pids) - app_before
    db_after = _database_pids(url)
    db = sum(_cpu_seconds([pid]) - db_before.get(pid, 0.0) for pid in db_after)
    return result, app, db


# -- the data ----------------------------------------------------------------------------------------

def _load_alliance(url: str) -> None:
    """The demo alliance's organizations, places, services and staff (no patients)."""
    from service.demo.alliance import demo_resources
    from service.fhir import bundles
    from service.fhir.access import AccessContext
    from service.fhir.db import create_engine
    from service.fhir.store import ResourceStore

    wanted = {"Organization", "Location", "HealthcareService", "Practitioner", "PractitionerRole"}
    resources = [r for r in demo_resources(patients=1) if r["resourceType"] in wanted]
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                        for r in resources]}
    engine = create_engine(url)
    try:
        bundles.process_bundle(ResourceStore(engine), AccessContext.internal("bench"), bundle, base_url="")
    finally:
        engine.dispose()


def _slot_bundle(schedule_id: str, day: datetime, first: int, count: int) -> tuple[dict, list[str]]:
    ids = [f"{schedule_id}-{i:04d}" for i in range(first, first + count)]
    entries = [{"resource": {"resourceType": "Schedule", "id": schedule_id, "active": True,
                             "actor": [{"reference": ORTHOPAEDIST}],
                             "specialty": [{"coding": [{"system": "http://snomed.info/sct", "code": "394801008"}]}]},
                "request": {"method": "PUT", "url": f"Schedule/{schedule_id}"}}]
    for n, slot_id in enumerate(ids, start=first):
        start = day + timedelta(minutes=n)
        entries.append({"resource": {"resourceType": "Slot", "id": slot_id, "status": "free",
                                     "schedule": {"reference": f"Schedule/{schedule_id}"},
                                     "start": start.isoformat(), "end": (start + timedelta(minutes=1)).isoformat()},
                        "request": {"method": "PUT", "url": f"Slot/{slot_id}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, ids


def _publish(fhir: str, schedule_id: str, day: datetime, slots: int) -> list[str]:
    ids: list[str] = []
    with httpx.Client(base_url=fhir, timeout=300) as http:
        for first in range(0, slots, 100):
            bundle, chunk = _slot_bundle(schedule_id, day, first, min(100, slots - first))
            response = http.post("", json=bundle)
            response.raise_for_status()
            ids += chunk
    return ids


def _referred_patients(url: str, count: int) -> list[tuple[str, str]]:
    """Patients with an active upward referral, as the referral workflow leaves them (R32)."""
    from service.fhir.access import AccessContext
    from service.fhir.db import create_engine
    from service.fhir.store import ResourceStore

    engine = create_engine(url)
    store = ResourceStore(engine)
    ctx = AccessContext.internal("bench")
    out = []
    try:
        for i in range(count):
            patient = store.create(ctx, {"resourceType": "Patient", "name": [{"text": f"压测患者{i}"}],
                                           "managingOrganization": {"reference": CLINIC}}).resource
            referral = store.create(ctx, {
                "resourceType": "ServiceRequest", "status": "active", "intent": "order",
                "category": [{"coding": [{"system": REFERRAL_DIRECTION, "code": "up"}]}],
                "subject": {"reference": patient.reference}}).resource
            out.append((patient.reference, referral.reference))
    finally:
        engine.dispose()
    return out


def _book_body(slot: str, patient: str, referral: str) -> dict:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "slot", "valueReference": {"reference": f"Slot/{slot}"}},
        {"name": "patient", "valueReference": {"reference": patient}},
        {"name": "referral", "valueReference": {"reference": referral}}]}


# -- the load ------------------------------------------------------------------------------------------

async def _load(fhir: str, slots: list[str], people: list[tuple[str, str]]) -> tuple[list[float], list[int], float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for slot in slots:
        queue.put_nowait(slot)
    latencies: list[float] = []
    statuses: list[int] = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def client(patient: str, referral: str) -> None:
        async with httpx.AsyncClient(base_url=fhir, timeout=120, limits=limits,
                                     headers={"X-Yilian-Organization": CLINIC}) as http:
            while True:
                try:
                    slot = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                began = time.perf_counter()
                response = await http.post("/Appointment/$book", json=_book_body(slot, patient, referral))
                latencies.append(time.perf_counter() - began)
                statuses.append(response.status_code)
                if response.status_code != 200 and len(failures) < 3:
                    failures.append(f"{response.status_code} {response.text[:300]}")

    began = time.perf_counter()
    await asyncio.gather(*(client(p, r) for p, r in people))
    for failure in failures:
        print("failed booking:", failure, file=sys.stderr)
    return latencies, statuses, time.perf_counter() - began


def _load_wrk(fhir: str, slots: list[str], people: list[tuple[str, str]], clients: int,
              workdir: Path) -> tuple[list[float], list[int], float]:
    """Book every slot once with wrk; ([p50, p99] latency in s, statuses, seconds to the last answer)."""
    from bench.wrk import build_script, ensure_wrk, parse_wrk_output

    plan, done = workdir / "plan.txt", workdir / "done"
    plan.write_text("-\n" + "".join(f"Slot/{slot} {people[i % len(people)][0]} {people[i % len(people)][1]}\n"
                            for i, slot in enumerate(slots)), encoding="utf-8")
    done.unlink(missing_ok=True)
    script = build_script("book", workdir)
    limit = 300.0  # seconds; 1,000 bookings take well under a minute
    command = [ensure_wrk(), "-t1", f"-c{clients}", f"-d{int(limit)}s", "--timeout=120s", "--latency",
               "-s", str(script), fhir, "--", str(plan), str(done), CLINIC]
    began = time.perf_counter()
    wrk = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not done.exists():
            if wrk.poll() is not None or time.perf_counter() - began > limit:
                raise SystemExit("wrk ended before every booking was answered:\n" + (wrk.communicate()[0] or "")[-2000:])
            time.sleep(0.005)
        seconds = time.perf_counter() - began
        wrk.send_signal(signal.SIGINT)  # its clock runs to -d otherwise; it prints its summary now
        output, _ = wrk.communicate(timeout=60)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    result = parse_wrk_output(output)
    statuses = [code for code, n in result.statuses.items() for _ in range(n)]
    if result.error_sample:
        print("failed booking:", result.error_sample, file=sys.stderr)
    return [result.p50_ms / 1000, result.p99_ms / 1000], statuses, seconds


async def _plain_creates(fhir: str, count: int, people: list[tuple[str, str]]) -> float:
    """The same clients creating Appointments without a slot: what one write costs on this
    stack (security, audit, referral hooks included), to read the booking figure against."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def client(patient: str) -> None:
        async with httpx.AsyncClient(base_url=fhir, timeout=120, limits=limits,
                                     headers={"X-Yilian-Organization": CLINIC}) as http:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                response = await http.post("/Appointment", json={
                    "resourceType": "Appointment", "status": "proposed",
                    "participant": [{"actor": {"reference": patient}, "status": "accepted"}]})
                response.raise_for_status()

    began = time.perf_counter()
    await asyncio.gather(*(client(p) for p, _ in people))
    return count / (time.perf_counter() - began)


def _check(url: str, slots: list[str]) -> tuple[int, int]:
    """(busy slots with an appointment, booked Appointments naming one of the slots)."""
    from service.capacity.tables import SLOTS
    from service.fhir.db import create_engine
    from service.fhir.tables import ReferenceIndex, ResourceRow

    refs = [f"Slot/{s}" for s in slots]
    engine = create_engine(url)
    index, resource = ReferenceIndex.__table__, ResourceRow.__table__
    try:
        with engine.connect() as conn:
            busy = conn.execute(sa.select(sa.func.count()).select_from(SLOTS).where(
                SLOTS.c.ref.in_(refs), SLOTS.c.status == "busy", SLOTS.c.appointment_id.is_not(None))).scalar()
            booked = conn.execute(
                sa.select(sa.func.count(sa.distinct(index.c.resource_id)))
                .select_from(index.join(resource, sa.and_(resource.c.resource_type == index.c.resource_type,
                                                          resource.c.id == index.c.resource_id)))
                .where(index.c.resource_type == "Appointment", index.c.param == "slot",
                       index.c.target_type == "Slot", index.c.target_id.in_(slots), resource.c.deleted.is_(False))
            ).scalar()
    finally:
        engine.dispose()
    return int(busy or 0), int(booked or 0)


def run(admin_url: str, *, clients: int, slots: int, workers: int, baseline: bool = True,
        load: str = "wrk", warmup: int = 1000) -> Result:
    from service.capacity._fhir import CHINA
    from service.migrate import upgrade

    url, admin = _create_database(admin_url)
    process = None
    workdir = Path(tempfile.mkdtemp(prefix="yilian-booking-"))  # wrk's plan and script
    try:
        upgrade(url)
        _load_alliance(url)
        port = _free_port()
        process = _start(url, workers, port)
        base, fhir = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/fhir"
        httpx.put(f"{base}/admin/capacity/policy/{ORTHOPAEDICS}", json={"specialist_reserved_share": 1},
                  timeout=30).raise_for_status()
        day = datetime.now(CHINA).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=3)
        warm = _publish(fhir, f"warm-{uuid4().hex[:6]}", day + timedelta(days=1), warmup)
        measured = _publish(fhir, f"bench-{uuid4().hex[:6]}", day, slots)
        people = _referred_patients(url, clients)
        # Warm-up: connections, caches, and PostgreSQL's plans. Each pooled connection plans a
        # prepared statement afresh for its first five executions before it settles on the
        # generic plan, and the boundary checks cost milliseconds to plan: with ~50 pooled
        # connections a short warm-up leaves that start-up cost in the measured run.
        if load == "wrk":
            def measure(units: list[str]) -> tuple[list[float], list[int], float]:
                return _load_wrk(fhir, units, people, clients, workdir)
        else:
            def measure(units: list[str]) -> tuple[list[float], list[int], float]:
                return asyncio.run(_load(fhir, units, people))
        measure(warm)
        (latencies, statuses, seconds), app_cpu, db_cpu = _measure(process, url, lambda: measure(measured))
        busy, booked = _check(url, measured)
        plain = plain_app = plain_db = None
        if baseline:
            plain, plain_app, plain_db = _measure(process, url,
                                                  lambda: asyncio.run(_plain_creates(fhir, slots, people)))
        ok = statuses.count(200)
        ms = sorted(x * 1000 for x in latencies)
        p50, p99 = (ms[0], ms[1]) if load == "wrk" else (statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))])
        check = ok == slots == busy == booked and len(statuses) == slots
        return Result(database="PostgreSQL", load=load, workers=workers, clients=clients, slots=slots, bookings=ok,
                      conflicts=statuses.count(409), errors=len(statuses) - ok - statuses.count(409),
                      seconds=round(seconds, 3), bookings_per_second=round(slots / seconds, 1),
                      p50_ms=round(p50, 1), p99_ms=round(p99, 1),
                      busy_slots=busy, booked_appointments=booked, check=check,
                      app_cpu_ms_per_booking=round(app_cpu * 1000 / slots, 1),
                      db_cpu_ms_per_booking=round(db_cpu * 1000 / slots, 1),
                      plain_creates_per_second=None if plain is None else round(plain, 1),
                      app_cpu_ms_per_plain_create=None if plain_app is None else round(plain_app * 1000 / slots, 1),
                      db_cpu_ms_per_plain_create=None if plain_db is None else round(plain_db * 1000 / slots, 1))
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.booking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", default=os.environ.get("YILIAN_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="a PostgreSQL database to connect to; the run creates and drops its own")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--slots", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--load", choices=("wrk", "httpx"), default="wrk",
                        help="the load generator (wrk: installed when missing, as for make bench)")
    parser.add_argument("--warmup", type=int, default=1000, help="bookings on another day before the measured run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-create comparison")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args(argv)
    result = run(args.postgres_url, clients=args.clients, slots=args.slots, workers=args.workers,
                 baseline=not args.no_baseline, load=args.load, warmup=args.warmup)
    print(result.table())
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    return 0 if result.check else 1


if __name__ == "__main__":
    sys.exit(main())
