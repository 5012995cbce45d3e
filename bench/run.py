"""``make bench``: load 10,000 Chinese Patients, then measure the FHIR interactions with wrk.

Per database (PostgreSQL and/or SQLite), a run:

1. drops and recreates the bench database, migrates it (``yilian db upgrade``) and loads the
   demo alliance (``yilian demo-data``: the clinic our patients are contracted with, and its
   OAuth client);
2. starts ``yilian serve --workers 2`` on a free loopback port with ``YILIAN_BENCH_FLOOR=true``
   (which adds ``GET /bench/floor/{type}/{id}``: the stored JSON by primary key, nothing else:
   the floor every FHIR interaction is compared with) and waits for ``/healthz``. With
   ``--auth off`` (the default) the server runs with ``YILIAN_AUTH=off``; with ``--auth on``
   every request carries a bearer token of the demo clinic's client (``yilian demo-token``);
3. loads ``--patients`` Patients in transaction Bundles of ``--bundle-size`` entries, timed
   (the bulk-load figure, resources/s);
4. runs each scenario with wrk for ``--duration`` seconds at ``--connections`` connections,
   on PostgreSQL after a ``VACUUM (ANALYZE)`` of the database (as pgbench does before each
   run: the previous scenario's leftovers are not cleaned up during this one, see
   :func:`vacuum_postgres`), after a short warm-up and a one-request smoke check of the answer's content, and counts the
   CPU time the server, PostgreSQL and wrk used meanwhile (``bench.cpu``) — until the server's
   background drain has stored the scenario's audit records too: the table shows how long
   that took after wrk stopped and the rate counting that time ("req/s with it"). Before each
   scenario a fixed Python loop is timed (``bench.cpu.speed_probe_ms``, the "probe ms" column):
   on a shared host the machine's speed wanders. A hint, not a yardstick: it catches a slow
   core, not a neighbour that takes the caches and memory bandwidth the database needs;
5. stops the server (SIGINT, then SIGKILL of its process group if it lingers) whatever happens.

Reads and searches run before the writes, so that every search sees exactly the loaded
patients; the table lists the scenarios in the usual order. A scenario with any non-2xx answer
or socket error (a timeout included) fails (exit status 1); a figure below its target is
reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from bench import cpu, data
from bench.wrk import WrkError, WrkResult, build_script, ensure_wrk, run_wrk
from service.demo.resident_id import birth_date_of, is_valid, sex_of

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = ROOT / "var" / "bench"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/yilian_bench"
FHIR_JSON = "application/fhir+json"

READ_TARGET = 0.60  # of the floor's req/s
IDENTIFIER_TARGET = 0.40  # of the floor's req/s
CREATE_TARGET = 750.0  # req/s, PostgreSQL
BULK_TARGET = 1500.0  # resources/s
TRANSACTION_SIZE = 10


# -- scenarios ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    resources_per_request: int = 1
    writes: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("floor", "floor: GET /bench/floor/Patient/{id}"),
    Scenario("read", "read: GET /fhir/Patient/{id}"),
    Scenario("create", "create: POST /fhir/Patient", writes=True),
    Scenario("search-identifier", "search: Patient?identifier={system}\\|{resident id}"),
    Scenario("search-name", "search: Patient?name={1-2 chars}"),
    Scenario("transaction", f"transaction: POST /fhir, {TRANSACTION_SIZE} Patients",
             resources_per_request=TRANSACTION_SIZE, writes=True),
)
#: Execution order: reads and searches on the loaded data first, writes last.
RUN_ORDER = ("floor", "read", "search-identifier", "search-name", "create", "transaction")


@dataclass
class ScenarioResult:
    key: str
    label: str
    resources_per_request: int
    wrk: WrkResult | None = None
    failure: str | None = None
    cpu_usage: cpu.CpuUsage | None = None
    audit_tail_s: float | None = None  # after wrk stopped, until the audit queue was empty
    probe_ms: float | None = None  # cpu.speed_probe_ms() just before the scenario

    @property
    def rps(self) -> float | None:
        return self.wrk.requests_per_s if self.wrk else None

    @property
    def sustained_rps(self) -> float | None:
        """Requests per second counting the time the server's background drain still needed
        to store their audit records after wrk stopped: the rate it can keep up all day."""
        if self.wrk is None or self.audit_tail_s is None or self.wrk.duration_s <= 0:
            return None
        return self.wrk.requests / (self.wrk.duration_s + self.audit_tail_s)


@dataclass
class LoadResult:
    resources: int
    bundles: int
    bundle_size: int
    seconds: float
    cpu_usage: cpu.CpuUsage | None = None

    @property
    def resources_per_s(self) -> float:
        return self.resources / self.seconds if self.seconds > 0 else 0.0


@dataclass
class DatabaseResult:
    database: str  # postgres | sqlite
    url: str
    duration: float
    connections: int
    auth: bool = True
    load: LoadResult | None = None
    scenarios: dict[str, ScenarioResult] = field(default_factory=dict)
    failure: str | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None or any(s.failure for s in self.scenarios.values())


# -- targets and the table ------------------------------------------------------------------

def target_of(database: str, key: str) -> tuple[str, Callable[[float, float | None], bool | None]] | None:
    """(description, check(req/s, floor req/s)) for a scenario, or None when it has no target.
    The check answers None when it cannot tell (no floor measured)."""
    if key == "read":
        return (f"≥ {READ_TARGET:.0%} of floor",
                lambda rps, floor: None if floor is None else rps >= READ_TARGET * floor)
    if key == "search-identifier":
        return (f"≥ {IDENTIFIER_TARGET:.0%} of floor",
                lambda rps, floor: None if floor is None else rps >= IDENTIFIER_TARGET * floor)
    if key == "create" and database == "postgres":
        return f"≥ {CREATE_TARGET:,.0f}/s", lambda rps, _floor: rps >= CREATE_TARGET
    return None


def _verdict(passed: bool | None) -> str:
    return "–" if passed is None else ("PASS" if passed else "below")


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def format_table(result: DatabaseResult) -> str:
    """The result of one database as a Markdown table (also readable on a terminal)."""
    title = {"postgres": "PostgreSQL", "sqlite": "SQLite"}.get(result.database, result.database)
    lines = [f"### {title}", ""]
    if result.load is not None:
        load = result.load
        verdict = "PASS" if load.resources_per_s >= BULK_TARGET else "below"
        lines.append(f"Bulk load: {load.resources:,} Patients in {load.bundles} transaction Bundles of "
                     f"{load.bundle_size} in {load.seconds:.1f} s = **{load.resources_per_s:,.0f} resources/s** "
                     f"(target ≥ {BULK_TARGET:,.0f}/s: {verdict})")
        usage = load.cpu_usage
        if usage is not None:
            pg = usage.per_request_ms("postgres", load.resources)
            lines.append(f"CPU per resource loaded: server {_num(usage.per_request_ms('server', load.resources), 2)} ms"
                         + (f", PostgreSQL {_num(pg, 2)} ms" if pg is not None else "")
                         + f"; other processes took {usage.share(usage.others):.0%} of the machine meanwhile")
        lines.append("")
    if result.failure:
        lines.append(f"FAILED: {result.failure}")
        lines.append("")
    if result.scenarios:
        who = (f"authorization on: bearer token of {data.DEMO_CLIENT} ({data.CLINIC_REFERENCE})" if result.auth
               else "authorization off (YILIAN_AUTH=off)")
        lines.append(f"wrk, {result.connections} connections, {result.duration:g} s per scenario; {who}")
        lines.append("")
        lines.append("| scenario | req/s | p50 ms | p99 ms | ÷ floor | non-2xx | target | | audit drained after, s "
                     "| req/s with it |")
        lines.append("|---|---:|---:|---:|---:|---:|---|---|---:|---:|")
        floor = result.scenarios.get("floor")
        floor_rps = floor.rps if floor and not floor.failure else None
        for scenario in SCENARIOS:
            got = result.scenarios.get(scenario.key)
            if got is None:
                continue
            w = got.wrk
            rps = got.rps
            rps_text = _num(rps)
            if rps is not None and got.resources_per_request > 1:
                rps_text += f" ({rps * got.resources_per_request:,.0f} resources/s)"
            ratio = _num(rps / floor_rps, 2) if rps is not None and floor_rps else "–"
            target = target_of(result.database, scenario.key)
            target_text, verdict = ("", "")
            if target is not None:
                target_text = target[0]
                verdict = "–" if rps is None else _verdict(target[1](rps, floor_rps))
            if got.failure:
                verdict = "FAILED"
            non2xx = "–" if w is None else f"{w.non_2xx:,}"
            lines.append(f"| {got.label} | {rps_text} | {_num(w.p50_ms if w else None, 1)} | "
                         f"{_num(w.p99_ms if w else None, 1)} | {ratio} | {non2xx} | {target_text} | {verdict} | "
                         f"{_num(got.audit_tail_s, 1)} | {_num(got.sustained_rps)} |")
        cpu_lines = format_cpu(result)
        if cpu_lines:
            lines += ["", *cpu_lines]
        failures = [s for s in result.scenarios.values() if s.failure]
        if failures:
            lines.append("")
            for s in failures:
                lines.append(f"- {s.key} FAILED: {s.failure}")
    return "\n".join(lines)


def format_cpu(result: DatabaseResult) -> list[str]:
    """CPU time per request of the server's workers, PostgreSQL and wrk, and how much of the
    machine other processes took meanwhile (a busy machine makes every figure lower)."""
    rows = []
    for scenario in SCENARIOS:
        got = result.scenarios.get(scenario.key)
        if got is None or got.cpu_usage is None or got.wrk is None or got.wrk.requests == 0:
            continue
        usage, n = got.cpu_usage, got.wrk.requests
        pg = usage.per_request_ms("postgres", n)
        rows.append(f"| {scenario.key} | {_num(usage.per_request_ms('server', n), 2)} | "
                    f"{_num(pg, 2) if result.database == 'postgres' else '–'} | {_num(usage.per_request_ms('wrk', n), 3)} | "
                    f"{usage.share(sum(usage.seconds.values())):.0%} | {usage.share(usage.others):.0%} | "
                    f"{_num(got.probe_ms, 0)} |")
    if not rows:
        return []
    return ["CPU time per request (ms) and share of the machine's CPU during the run; probe: CPU ms of a "
            "fixed Python loop just before the scenario (bench.cpu.speed_probe_ms), the machine's speed then",
            "", "| scenario | server workers | PostgreSQL | wrk | ours, of machine | other processes | probe ms |",
            "|---|---:|---:|---:|---:|---:|---:|", *rows]


# -- the server -----------------------------------------------------------------------------

def yilian_command() -> list[str]:
    """The ``yilian`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("yilian")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(database_url: str, port: int, *, auth: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YILIAN_")}
    env.update({
        "YILIAN_DATABASE_URL": database_url,
        "YILIAN_BENCH_FLOOR": "true",
        "YILIAN_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        # No access log: one line per request would measure the terminal, not the server.
        "YILIAN_LOG_LEVEL": "warning",
        "YILIAN_AUTH": "on" if auth else "off",
    })
    if auth:
        # One client sends everything here: its per-client rate limit (20/s by default) would
        # answer 429 to nearly all of it. Token checks still run on every request.
        env.update({"YILIAN_RATE_LIMIT_PER_MINUTE": "100000000", "YILIAN_RATE_LIMIT_BURST": "1000000"})
    return env


class Credentials:
    """The ``Authorization`` header of the benchmark's caller: a bearer token of the demo
    clinic's client (``yilian demo-token``), renewed before each step because backend tokens
    live five minutes at most; no header at all with authorization off."""

    def __init__(self, database_url: str, port: int, *, auth: bool) -> None:
        self.database_url, self.port, self.auth = database_url, port, auth
        self.token: str | None = None

    def renew(self) -> dict[str, str]:
        if not self.auth:
            return {}
        command = [*yilian_command(), "demo-token", "--client", data.DEMO_CLIENT]
        completed = subprocess.run(command, env=server_env(self.database_url, self.port), capture_output=True,
                                   text=True, timeout=120, check=False)
        token = next((line.split("=", 1)[1].strip() for line in completed.stdout.splitlines()
                      if line.startswith("export TOKEN=")), None)
        if completed.returncode != 0 or not token:
            raise RuntimeError(f"`yilian demo-token --client {data.DEMO_CLIENT}` failed ({completed.returncode}):\n"
                               f"{(completed.stdout + completed.stderr)[-2000:]}")
        self.token = token
        return self.headers()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.auth and self.token else {}


class Server:
    """``yilian serve`` as a subprocess in its own process group; stopped on exit, whatever happens."""

    def __init__(self, database_url: str, *, port: int, workers: int, log_path: Path, auth: bool = True) -> None:
        self.database_url = database_url
        self.auth = auth
        self.port = port
        self.workers = workers
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Self:
        command = [*yilian_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", str(self.workers)]
        print(f"starting: {' '.join(command)} (log: {self.log_path})", flush=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, env=server_env(self.database_url, self.port, auth=self.auth), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        _RUNNING.add(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_tail())
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not answer /healthz within {timeout:.0f} s; see {self.log_path}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes (children of the supervisor), for a profiler to attach to."""
        if self.proc is None:
            return []
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn: graceful shutdown of the supervisor and its workers
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"the server did not stop within {timeout:.0f} s: killing process group {proc.pid}", flush=True)
                _kill_group(proc.pid)
                proc.wait(timeout=10)
        _kill_group(proc.pid)  # any worker left behind in the group (normally none)
        _RUNNING.discard(self)
        self.proc = None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_RUNNING: set[Server] = set()


def _stop_all_on_signal(signum: int, _frame: object) -> None:
    for server in list(_RUNNING):
        server.stop(timeout=5)
    raise SystemExit(128 + signum)


# -- databases ------------------------------------------------------------------------------

def prepare_postgres(url: str) -> None:
    """Drop and recreate the database named in ``url`` (connecting to ``postgres`` to do so)."""
    import psycopg

    parsed = make_url(url)
    name = parsed.database or ""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise RuntimeError(f"refusing to drop database {name!r}: give a plain name like yilian_bench")
    if name in ("postgres", "template0", "template1"):
        raise RuntimeError(f"refusing to drop the {name} database")
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL is not reachable at {admin}: {exc}".strip()) from None


def vacuum_postgres(url: str) -> float:
    """VACUUM (ANALYZE) the bench database, as pgbench does before each run; its seconds.

    Before each scenario: the statistics then see the real sizes (after the bulk load, plans
    see 10,000 patients), and what the previous scenario left to clean up — the audit queue's
    deleted rows, tens of thousands of new AuditEvents and their index rows — is cleaned up
    now rather than by autovacuum in the middle of the next scenario, on the same two cores.
    What a scenario leaves behind itself is still cleaned up during it, as in production."""
    import psycopg

    began = time.monotonic()
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return time.monotonic() - began


def prepare_sqlite(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return f"sqlite:///{path}"


def yilian(database_url: str, port: int, *arguments: str) -> None:
    """Run a ``yilian`` command on the bench database (what an operator would type)."""
    command = [*yilian_command(), *arguments]
    completed = subprocess.run(command, env=server_env(database_url, port), capture_output=True, text=True,
                               timeout=300, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"`yilian {' '.join(arguments)}` failed ({completed.returncode}):\n"
                           f"{(completed.stdout + completed.stderr)[-3000:]}")


def migrate(database_url: str, port: int) -> None:
    """``yilian db upgrade``, then ``yilian demo-data``: the demo alliance holds the clinic our
    patients belong to and its OAuth client (a few hundred resources beside the 10,000)."""
    yilian(database_url, port, "db", "upgrade")
    yilian(database_url, port, "demo-data")


# -- bulk load ------------------------------------------------------------------------------

@dataclass
class Dataset:
    patients: list[dict[str, Any]]
    bundles: list[bytes]
    bundle_size: int


def make_dataset(count: int, bundle_size: int, seed: int = data.DEFAULT_SEED) -> Dataset:
    factory = data.PatientFactory(seed)
    patients = factory.patients(count)
    import random

    rng = random.Random(seed)
    bundles = [orjson.dumps(data.transaction_bundle(chunk, rng=rng)) for chunk in data.chunked(patients, bundle_size)]
    return Dataset(patients, bundles, bundle_size)


def bulk_load(base: str, dataset: Dataset, *, concurrency: int, headers: dict[str, str],
              timeout: float = 300.0) -> tuple[LoadResult, list[str]]:
    """POST every bundle (``concurrency`` at a time); the ids the server gave, in patient order.
    The whole load must finish within ``timeout`` seconds."""
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, **headers}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    deadline = started + timeout
    done = 0
    with httpx.Client(base_url=base, headers=headers, limits=limits) as client:
        def post(body: bytes) -> list[str]:
            nonlocal done
            left = deadline - time.perf_counter()
            if left <= 0:
                raise RuntimeError("deadline passed")
            response = client.post("/fhir", content=body, timeout=left)
            if response.status_code != 200:
                raise RuntimeError(f"transaction Bundle answered {response.status_code}: {response.text[:1000]}")
            done += 1
            return data.created_ids(response.json())

        try:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                id_lists = list(pool.map(post, dataset.bundles))
        except (httpx.TimeoutException, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "deadline" not in str(exc):
                raise
            raise RuntimeError(f"the bulk load did not finish within {timeout:.0f} s (--load-timeout): "
                               f"{done} of {len(dataset.bundles)} Bundles of {dataset.bundle_size} were loaded") from None
        seconds = time.perf_counter() - started
    ids = [i for chunk in id_lists for i in chunk]
    if len(ids) != len(dataset.patients):
        raise RuntimeError(f"{len(ids)} ids came back for {len(dataset.patients)} patients")
    return LoadResult(len(ids), len(dataset.bundles), dataset.bundle_size, seconds), ids


def warm_up(base: str, *, workers: int, headers: dict[str, str]) -> None:
    """Before the timed load: one small transaction per worker (and then some), so that the
    one-time costs of a fresh process (imports, validation tables, index compilers) are not
    counted as bulk-load time. The patients it writes have area 110105, like wrk's."""
    factory = data.PatientFactory(99)
    bodies = [orjson.dumps(data.transaction_bundle([factory.template(sex="female")])) for _ in range(4 * workers)]
    bodies = [fill_template(orjson.loads(b), factory, area="110105") for b in bodies]
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, **headers}
    with httpx.Client(base_url=base, headers=headers, timeout=120.0) as client:
        def post(body: bytes) -> None:
            _expect(client.post("/fhir", content=body), 200)
            _expect(client.get("/fhir/Patient", params={"name": "王"}), 200)

        with ThreadPoolExecutor(max_workers=2 * workers) as pool:
            list(pool.map(post, bodies))


# -- scenario inputs and smoke checks -------------------------------------------------------

@dataclass
class Inputs:
    """Files the Lua scripts read, and what the smoke checks expect."""

    ids: list[str]
    resident_ids: list[str]
    files: dict[str, Path]
    create_body: dict[str, Any]
    transaction_body: dict[str, Any]


def write_inputs(workdir: Path, dataset: Dataset, ids: list[str], *, seed: int = data.DEFAULT_SEED) -> Inputs:
    resident_ids = [data.resident_id_of(p) for p in dataset.patients]
    prefixes = data.name_prefixes(dataset.patients, 2000, seed=seed)
    factory = data.PatientFactory(seed + 1)
    create_template = factory.template()
    transaction_template = data.transaction_bundle([factory.template() for _ in range(TRANSACTION_SIZE)])
    files = {
        "floor": _write_lines(workdir / "floor_paths.txt", data.floor_paths(ids)),
        "read": _write_lines(workdir / "read_paths.txt", data.read_paths(ids)),
        "search-identifier": _write_lines(workdir / "identifier_paths.txt", data.identifier_paths(resident_ids)),
        "search-name": _write_lines(workdir / "name_paths.txt", data.name_paths(prefixes)),
        "create": _write_bytes(workdir / "create_template.json", orjson.dumps(create_template)),
        "transaction": _write_bytes(workdir / "transaction_template.json", orjson.dumps(transaction_template)),
    }
    return Inputs(ids, resident_ids, files, create_template, transaction_template)


def _write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def fill_template(body: dict[str, Any], factory: data.PatientFactory, *, area: str = "110105") -> bytes:
    """The template with real resident IDs, as the Lua script would send it (smoke checks, warm-up)."""
    return data.fill_placeholders(orjson.dumps(body).decode(), factory, area=area).encode()


def smoke_check(client: httpx.Client, key: str, inputs: Inputs) -> None:
    """One request of the scenario, checking what it answers, not only its status."""
    first_id, first_rid = inputs.ids[0], inputs.resident_ids[0]
    if key in ("floor", "read"):
        path = (data.floor_paths if key == "floor" else data.read_paths)([first_id])[0]
        body = _expect(client.get(path), 200)
        if body.get("resourceType") != "Patient" or body.get("id") != first_id:
            raise AssertionError(f"GET {path} did not answer Patient/{first_id}")
    elif key == "search-identifier":
        path = data.identifier_paths([first_rid])[0]
        body = _expect(client.get(path), 200)
        found = [e["resource"]["id"] for e in _matches(body)]
        if found != [first_id]:
            raise AssertionError(f"GET {path} found {found}, expected [{first_id!r}]")
    elif key == "search-name":
        path = data.name_paths(["王"])[0]
        body = _expect(client.get(path), 200)
        entries = _matches(body)  # beside them, an outcome entry may say why there is no total
        if not entries or len(entries) > 20 or not all(
                any(n.get("text", "").startswith("王") for n in e["resource"].get("name", [])) for e in entries):
            raise AssertionError(f"GET {path} answered {len(entries)} entries, not up to 20 patients named 王…")
    elif key in ("create", "transaction"):
        factory = data.PatientFactory(4242)
        if key == "create":
            body = _expect(client.post("/fhir/Patient", content=fill_template(inputs.create_body, factory)), 201)
            if body.get("resourceType") != "Patient" or not body.get("id"):
                raise AssertionError("POST /fhir/Patient did not answer the created Patient")
        else:
            body = _expect(client.post("/fhir", content=fill_template(inputs.transaction_body, factory)), 200)
            statuses = [e["response"]["status"] for e in body.get("entry", [])]
            if len(statuses) != TRANSACTION_SIZE or not all(s.startswith("201") for s in statuses):
                raise AssertionError(f"the transaction answered {statuses}")


def _matches(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """A searchset's entries with search mode ``match``."""
    return [e for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


def check_written_ids(client: httpx.Client) -> None:
    """After a write scenario: the newest Patients (written by wrk's Lua) carry valid resident IDs."""
    body = _expect(client.get("/fhir/Patient/_history", params={"_count": "20"}), 200)
    bad = []
    for entry in body.get("entry", []):
        resource = entry.get("resource") or {}
        for identifier in resource.get("identifier", []):
            value = identifier.get("value", "")
            if identifier.get("system") != data.RESIDENT_ID_SYSTEM:
                continue
            if (not is_valid(value) or sex_of(value) != resource.get("gender")
                    or birth_date_of(value).isoformat() != resource.get("birthDate")):
                bad.append(f"{value} ({resource.get('gender')}, {resource.get('birthDate')})")
    if not body.get("entry"):
        raise AssertionError("no Patient history after a write scenario")
    if bad:
        raise AssertionError(f"Patients written by the Lua script carry invalid resident IDs, or IDs that "
                             f"disagree with their gender or birth date: {bad[:5]}")


def _expect(response: httpx.Response, status: int) -> dict[str, Any]:
    if response.status_code != status:
        raise AssertionError(f"{response.request.method} {response.request.url} answered {response.status_code}, "
                             f"expected {status}: {response.text[:500]}")
    return response.json()


def wrk_arguments(key: str, inputs: Inputs) -> tuple[str, list[str]]:
    """(Lua script name, its arguments) for a scenario."""
    if key == "create":
        return "post", ["POST", "/fhir/Patient", str(inputs.files["create"])]
    if key == "transaction":
        return "post", ["POST", "/fhir", str(inputs.files["transaction"])]
    return "get", [str(inputs.files[key])]


# -- one database ---------------------------------------------------------------------------

def bench_database(database: str, args: argparse.Namespace, dataset: Dataset, wrk: str) -> DatabaseResult:
    workdir: Path = args.workdir
    if database == "postgres":
        url = args.postgres_url
        print(f"\n== PostgreSQL: recreating {url}", flush=True)
        prepare_postgres(url)
    else:
        url = prepare_sqlite(workdir / "yilian_bench.db")
        print(f"\n== SQLite: fresh {url}", flush=True)
    result = DatabaseResult(database, url, args.duration, args.connections, auth=args.auth == "on")
    try:
        _bench_database(result, args, dataset, wrk)
    except (RuntimeError, httpx.HTTPError, OSError, subprocess.SubprocessError, ValueError) as exc:
        print(f"bench on {database} FAILED: {exc}", file=sys.stderr, flush=True)
        result.failure = str(exc)
    return result


def _bench_database(result: DatabaseResult, args: argparse.Namespace, dataset: Dataset, wrk: str) -> None:
    database, url, workdir = result.database, result.url, args.workdir
    port = free_port()
    migrate(url, port)
    credentials = Credentials(url, port, auth=args.auth == "on")
    with Server(url, port=port, workers=args.workers, log_path=workdir / f"server-{database}.log",
                auth=credentials.auth) as server:
        server.wait_healthy()
        warm_up(server.base, workers=args.workers, headers=credentials.renew())
        print(f"loading {len(dataset.patients):,} Patients in {len(dataset.bundles)} transaction Bundles "
              f"of {dataset.bundle_size} ({args.load_concurrency} at a time)…", flush=True)
        pg_name = make_url(url).database if database == "postgres" else None
        before = cpu.snapshot(server_pgid=server.proc.pid if server.proc else None, database=pg_name)
        result.load, ids = bulk_load(server.base, dataset, concurrency=args.load_concurrency,
                                     headers=credentials.renew(), timeout=args.load_timeout)
        after = cpu.snapshot(server_pgid=server.proc.pid if server.proc else None, database=pg_name)
        result.load.cpu_usage = cpu.usage(before, after)
        print(f"  {result.load.seconds:.1f} s, {result.load.resources_per_s:,.0f} resources/s", flush=True)
        inputs = write_inputs(workdir, dataset, ids)
        scripts = {name: build_script(name, workdir) for name in ("get", "post")}
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        with httpx.Client(base_url=server.base, headers=headers, timeout=60.0) as client:
            for key in RUN_ORDER:
                if args.only and key not in args.only:
                    continue
                scenario = next(s for s in SCENARIOS if s.key == key)
                if database == "postgres":
                    print(f"   VACUUM (ANALYZE) before {key}: {vacuum_postgres(url):.1f} s", flush=True)
                client.headers.update(credentials.renew())
                result.scenarios[key] = run_scenario(scenario, server, client, inputs, scripts, args, wrk,
                                                     credentials.headers())


def run_scenario(scenario: Scenario, server: Server, client: httpx.Client, inputs: Inputs,
                 scripts: dict[str, Path], args: argparse.Namespace, wrk: str,
                 headers: dict[str, str]) -> ScenarioResult:
    got = ScenarioResult(scenario.key, scenario.label, scenario.resources_per_request)
    print(f"-- {scenario.key}: {scenario.label}", flush=True)
    try:
        smoke_check(client, scenario.key, inputs)
    except (AssertionError, httpx.HTTPError, KeyError, ValueError) as exc:
        got.failure = f"smoke check: {exc}"
        print(f"   FAILED {got.failure}", flush=True)
        return got
    script, script_args = wrk_arguments(scenario.key, inputs)
    got.probe_ms = cpu.speed_probe_ms()
    try:
        if args.warmup > 0:
            run_wrk(wrk, server.base, scripts[script], script_args, duration=args.warmup,
                    connections=args.connections, threads=args.threads, headers=headers)
        database = make_url(server.database_url).database if server.database_url.startswith("postgres") else None
        before = cpu.snapshot(server_pgid=server.proc.pid if server.proc else None, database=database)
        children_before = cpu.children_seconds()
        got.wrk = run_wrk(wrk, server.base, scripts[script], script_args, duration=args.duration,
                          connections=args.connections, threads=args.threads, headers=headers)
        # Every request left an AuditEvent (and a write a Provenance) in the queue, which the
        # server's background drain stores a moment later: its work belongs to this scenario,
        # in its CPU figures, and not to the next one.
        got.audit_tail_s = wait_for_audit_queue(server.database_url)
        after = cpu.snapshot(server_pgid=server.proc.pid if server.proc else None, database=database)
        got.cpu_usage = cpu.usage(before, after, wrk_seconds=cpu.children_seconds() - children_before)
    except WrkError as exc:
        got.failure = str(exc)
        print(f"   FAILED {exc}", flush=True)
        return got
    w = got.wrk
    print(f"   {w.requests_per_s:,.0f} req/s, p50 {w.p50_ms:.1f} ms, p99 {w.p99_ms:.1f} ms, "
          f"statuses {dict(sorted(w.statuses.items()))}", flush=True)
    if not w.ok:
        problems = []
        if w.non_2xx:
            problems.append(f"{w.non_2xx} non-2xx answers {dict(sorted(w.statuses.items()))}")
        if w.socket_errors:
            problems.append(f"socket errors {w.errors}")
        if w.requests == 0:
            problems.append(f"no request completed within {args.duration:g} s (a longer --duration may help)")
        if w.error_sample:
            problems.append(f"first: {w.error_sample[:300]}")
        got.failure = "; ".join(problems)
        print(f"   FAILED {got.failure}", flush=True)
    elif scenario.writes:
        try:
            check_written_ids(client)
        except (AssertionError, httpx.HTTPError) as exc:
            got.failure = f"after the run: {exc}"
            print(f"   FAILED {got.failure}", flush=True)
    return got


def wait_for_audit_queue(database_url: str, *, timeout_s: float = 120.0, poll_s: float = 0.05) -> float | None:
    """Seconds until the server's drains have emptied the audit queue (None: not within
    ``timeout_s``; the scenario's CPU figures then miss part of its audit work)."""
    from service.fhir.db import create_engine

    engine = create_engine(database_url, pool_size=1)
    began = time.monotonic()
    try:
        with engine.connect() as conn:
            while True:
                waiting = conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM audit_queue)")).scalar()
                conn.rollback()  # a fresh snapshot for the next look (SQLite keeps one per transaction)
                if not waiting:
                    return time.monotonic() - began
                if time.monotonic() - began > timeout_s:
                    return None
                time.sleep(poll_s)
    finally:
        engine.dispose()


# -- command line ---------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=("postgres", "sqlite", "both"), default="both")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per wrk run (default 15)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--patients", type=int, default=10_000, help="patients to load (default 10000)")
    parser.add_argument("--bundle-size", type=int, default=500, help="entries per bulk-load Bundle (default 500)")
    parser.add_argument("--load-concurrency", type=int, default=2, help="Bundles in flight while loading (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    parser.add_argument("--auth", choices=("on", "off"), default="off",
                        help="off (default): YILIAN_AUTH=off, the FHIR engine alone, like the floor; on: every "
                             "request carries the demo clinic client's bearer token and goes through token checks, "
                             "scopes, the organization boundary and audit, as deployed")
    parser.add_argument("--load-timeout", type=float, default=240.0,
                        help="seconds the whole bulk load may take before the run fails (default 240)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leave the cores to the server)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured wrk before each scenario")
    parser.add_argument("--only", type=lambda s: set(s.split(",")), default=None,
                        help=f"comma-separated scenarios to run: {','.join(RUN_ORDER)}")
    parser.add_argument("--postgres-url", default=os.environ.get("YILIAN_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="the bench database, dropped and recreated (default %(default)s)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch files and server logs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.only:
        unknown = args.only - set(RUN_ORDER)
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(RUN_ORDER)}")
    if args.duration < 1 or args.connections < 1 or args.patients < 1 or args.bundle_size < 1:
        parser.error("--duration, --connections, --patients and --bundle-size must be at least 1")
    return args


def busy_warning() -> str | None:
    """A warning when other processes keep the machine busy: the figures would be low and noisy."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load < 0.5 * cores:
        return None
    return (f"WARNING: the machine is busy before we start (1-minute load average {load:.1f} on {cores} cores); "
            "other processes will take CPU from the server and the figures will be low and noisy")


def to_json(results: list[DatabaseResult]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        item = asdict(r)
        for key, s in r.scenarios.items():
            if s.wrk is not None:
                item["scenarios"][key]["wrk"].pop("output", None)
                item["scenarios"][key]["wrk"]["non_2xx"] = s.wrk.non_2xx
        if r.load is not None:
            item["load"]["resources_per_s"] = r.load.resources_per_s
        out.append(item)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # Ctrl-C raises KeyboardInterrupt: the finally below
        signal.signal(signum, _stop_all_on_signal)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        wrk = ensure_wrk()
    except WrkError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    databases = ["postgres", "sqlite"] if args.database == "both" else [args.database]
    busy = busy_warning()
    if busy:
        print(busy, flush=True)
    started = time.monotonic()
    print(f"generating {args.patients:,} Patients…", flush=True)
    dataset = make_dataset(args.patients, args.bundle_size)
    results: list[DatabaseResult] = []
    try:
        for database in databases:
            results.append(bench_database(database, args, dataset, wrk))
    finally:
        for server in list(_RUNNING):
            server.stop(timeout=5)
    print("\n## Results\n")
    for result in results:
        print(format_table(result))
        print()
    print(f"(whole run: {time.monotonic() - started:.0f} s; work files and server logs in {args.workdir})")
    if args.json:
        args.json.write_text(json.dumps(to_json(results), indent=2, ensure_ascii=False), encoding="utf-8")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
