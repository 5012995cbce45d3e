"""The pure parts of the benchmark harness (bench/): data generation, wrk output parsing,
the result table, waiting for the audit queue (on a SQLite file). Nothing here starts a
server or runs wrk, and nothing is timed."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from bench import cpu, data
from bench.run import (
    SCENARIOS,
    DatabaseResult,
    LoadResult,
    ScenarioResult,
    format_cpu,
    format_table,
    make_dataset,
    parse_args,
    wait_for_audit_queue,
)
from bench.wrk import LUA_DIR, WrkError, WrkResult, parse_wrk_output
from service.demo.resident_id import birth_date_of, is_valid, sex_of
from service.fhir.db import create_engine
from service.fhir.validation import validate_resource
from service.migrate import upgrade

# Captured from wrk 4.1.0 (Debian) running bench/lua/stats.lua + get.lua against a server that
# answered half the paths with 404.
WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:18777
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.71ms    2.27ms  17.82ms   77.35%
    Req/Sec     1.11k   144.29     1.34k    60.00%
  Latency Distribution
     50%    2.97ms
     75%    4.70ms
     90%    6.87ms
     99%   11.11ms
  1100 requests in 1.00s, 381.57KB read
  Non-2xx or 3xx responses: 554
Requests/sec:   1098.77
Transfer/sec:    381.15KB
@@BENCH {"requests":1100,"duration_us":1001115,"bytes":390728,"errors":{"connect":0,"read":0,"write":0,\
"status":554,"timeout":0},"latency_us":{"p50":2969,"p90":6869,"p99":11110,"max":17821,"mean":3711.8},\
"statuses":{"404":554,"200":546}}
@@SAMPLE 404 <!DOCTYPE HTML> <html lang="en">  <body> <h1>Error response</h1> </body> </html>
"""

WRK_PLAIN_OUTPUT = """\
Running 15s test @ http://127.0.0.1:8000
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    27.40ms   12.01ms 612.33ms   91.02%
    Req/Sec     1.18k    95.11     1.40k    71.33%
  Latency Distribution
     50%   25.10ms
     75%   29.87ms
     90%   36.02ms
     99%    1.02s
  17650 requests in 15.01s, 21.33MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
Requests/sec:   1175.88
Transfer/sec:      1.42MB
"""


# -- data -----------------------------------------------------------------------------------

def test_patients_are_chinese_with_valid_unique_resident_ids() -> None:
    patients = data.PatientFactory(1).patients(300)
    rids = [data.resident_id_of(p) for p in patients]
    assert len(set(rids)) == len(rids)
    for patient, rid in zip(patients, rids, strict=True):
        assert len(rid) == 18 and is_valid(rid)
        assert sex_of(rid) == patient["gender"]
        name = patient["name"][0]
        assert name["text"] == name["family"] + name["given"][0]
        assert re.fullmatch(r"[\u4e00-\u9fff]{2,4}", name["text"])
        assert patient["address"][0]["text"].startswith("山西省阳泉市")
        assert re.fullmatch(r"1\d{10}", patient["telecom"][0]["value"])


def test_the_same_seed_gives_the_same_patients() -> None:
    assert data.PatientFactory(7).patients(20) == data.PatientFactory(7).patients(20)


def test_transaction_bundle_is_a_valid_transaction_of_valid_patients() -> None:
    patients = data.PatientFactory(2).patients(25)
    bundle = data.transaction_bundle(patients, rng=random.Random(3))
    assert validate_resource(bundle, expected_type="Bundle") == []
    assert bundle["type"] == "transaction"
    assert len(bundle["entry"]) == 25
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == 25 and all(u.startswith("urn:uuid:") for u in full_urls)
    for entry in bundle["entry"]:
        assert entry["request"] == {"method": "POST", "url": "Patient"}
        assert validate_resource(entry["resource"], expected_type="Patient") == []


def test_dataset_splits_patients_into_bundles() -> None:
    dataset = make_dataset(1_050, 500)
    assert [len(orjson.loads(b)["entry"]) for b in dataset.bundles] == [500, 500, 50]


def test_created_ids_read_the_transaction_response_locations() -> None:
    response = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": "Patient/abc/_history/1"}},
        {"response": {"status": "201", "location": "http://127.0.0.1:9/fhir/Patient/def/_history/1"}},
    ]}
    assert data.created_ids(response) == ["abc", "def"]
    with pytest.raises(ValueError):
        data.created_ids({"entry": [{"response": {"status": "400 Bad Request"}}]})


def test_templates_fill_with_valid_resident_ids_and_matching_birth_dates() -> None:
    factory = data.PatientFactory(5)
    bundle = data.transaction_bundle([factory.template() for _ in range(10)])
    text = orjson.dumps(bundle).decode()
    assert text.count("@@RID:") == 10 and text.count(data.BIRTH_PLACEHOLDER) == 10
    filled = orjson.loads(data.fill_placeholders(text, data.PatientFactory(6)))
    assert validate_resource(filled, expected_type="Bundle") == []
    for entry in filled["entry"]:
        patient = entry["resource"]
        rid = data.resident_id_of(patient)
        assert is_valid(rid) and rid.startswith("110105")
        assert sex_of(rid) == patient["gender"]
        assert birth_date_of(rid).isoformat() == patient["birthDate"]


def test_lua_post_script_uses_the_same_placeholders() -> None:
    lua = (LUA_DIR / "post.lua").read_text()
    assert '"BIRTH"' in lua and "RID:" in lua and "110105" in lua
    assert all(p.strip("@") in data._PLACEHOLDER.pattern for p in [*data.RID_PLACEHOLDER.values(), data.BIRTH_PLACEHOLDER])


def test_request_paths_are_url_encoded() -> None:
    assert data.identifier_paths(["11010519580307001X"]) == [
        "/fhir/Patient?identifier=urn%3Aoid%3A2.16.156.10011.1.1%7C11010519580307001X"]
    assert data.name_paths(["王"]) == ["/fhir/Patient?name=%E7%8E%8B"]
    assert data.read_paths(["a1"]) == ["/fhir/Patient/a1"]
    assert data.floor_paths(["a1"]) == ["/bench/floor/Patient/a1"]


def test_name_prefixes_are_one_or_two_leading_characters_of_real_names() -> None:
    patients = data.PatientFactory(8).patients(200)
    texts = {p["name"][0]["text"] for p in patients}
    prefixes = data.name_prefixes(patients, 100)
    assert {len(p) for p in prefixes} == {1, 2}
    assert all(any(t.startswith(p) for t in texts) for p in prefixes)


# -- wrk output -----------------------------------------------------------------------------

def test_parse_wrk_output_reads_the_lua_summary_line() -> None:
    result = parse_wrk_output(WRK_OUTPUT)
    assert result.requests == 1100
    assert result.requests_per_s == pytest.approx(1100 / 1.001115)
    assert (result.p50_ms, result.p90_ms, result.p99_ms, result.max_ms) == (2.969, 6.869, 11.11, 17.821)
    assert result.statuses == {404: 554, 200: 546}
    assert result.non_2xx == 554
    assert result.socket_errors == 0
    assert not result.ok
    assert result.error_sample is not None and result.error_sample.startswith("404 ")


def test_parse_wrk_output_falls_back_to_wrks_own_summary() -> None:
    result = parse_wrk_output(WRK_PLAIN_OUTPUT)
    assert result.requests == 17650
    assert result.requests_per_s == 1175.88
    assert result.duration_s == pytest.approx(15.01)
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == (25.10, 36.02, 1020.0)
    assert result.max_ms == 612.33
    assert result.errors == {"connect": 0, "read": 3, "write": 0, "timeout": 2}
    assert result.socket_errors == 5 and not result.ok
    assert result.non_2xx == 0


def test_parse_wrk_output_counts_non_2xx_from_the_plain_summary() -> None:
    result = parse_wrk_output(WRK_OUTPUT.split("@@BENCH")[0])
    assert result.non_2xx == 554 and not result.ok


def test_parse_wrk_output_refuses_what_is_not_wrk_output() -> None:
    with pytest.raises(WrkError):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


# -- the table and the options --------------------------------------------------------------

def _wrk(rps: float, *, statuses: dict[int, int] | None = None) -> WrkResult:
    requests = int(rps * 10)
    return WrkResult(requests=requests, duration_s=10.0, requests_per_s=rps, p50_ms=5.0, p90_ms=8.0, p99_ms=20.0,
                     statuses=statuses or {200: requests})


def _verdict(row: str) -> str:
    """The verdict column of a scenario row (after the target's)."""
    return row.split(" | ")[7]


def test_format_table_shows_ratios_targets_and_failures() -> None:
    result = DatabaseResult("postgres", "postgresql://x/y", 15, 32, load=LoadResult(10_000, 20, 500, 5.0))
    for scenario, rps in zip(SCENARIOS, (1000.0, 700.0, 500.0, 300.0, 200.0, 50.0), strict=True):
        result.scenarios[scenario.key] = ScenarioResult(scenario.key, scenario.label,
                                                        scenario.resources_per_request, _wrk(rps))
    result.scenarios["search-name"].wrk = _wrk(200.0, statuses={200: 1990, 500: 10})
    result.scenarios["search-name"].failure = "10 non-2xx answers"
    table = format_table(result)
    rows = {s.key: next(line for line in table.splitlines() if line.startswith(f"| {s.label} |")) for s in SCENARIOS}
    assert "2,000 resources/s" in table and "PASS" in table.splitlines()[2]  # bulk load 10,000 in 5 s
    assert "| 700 |" in rows["read"] and "0.70" in rows["read"] and _verdict(rows["read"]) == "PASS"
    assert _verdict(rows["create"]) == "below"  # 500/s < 750/s
    assert "0.30" in rows["search-identifier"] and _verdict(rows["search-identifier"]) == "below"
    assert "50 (500 resources/s)" in rows["transaction"]
    assert "FAILED" in table and "| 10 |" in table
    assert result.failed  # a failed scenario fails the database


def test_format_table_without_a_floor_gives_no_verdict_on_relative_targets() -> None:
    result = DatabaseResult("sqlite", "sqlite:///x", 15, 32)
    result.scenarios["read"] = ScenarioResult("read", "read: GET", 1, _wrk(700.0))
    row = next(line for line in format_table(result).splitlines() if line.startswith("| read"))
    assert _verdict(row) == "–"


def test_create_target_applies_to_postgres_only() -> None:
    result = DatabaseResult("sqlite", "sqlite:///x", 15, 32)
    result.scenarios["create"] = ScenarioResult("create", "create: POST", 1, _wrk(100.0))
    row = next(line for line in format_table(result).splitlines() if line.startswith("| create"))
    assert "750" not in row and "below" not in row


def test_default_options() -> None:
    args = parse_args([])
    assert (args.database, args.duration, args.connections, args.patients) == ("both", 15.0, 32, 10_000)
    assert args.auth == "off"
    assert parse_args(["--only", "read,floor"]).only == {"read", "floor"}
    with pytest.raises(SystemExit):
        parse_args(["--only", "nonsense"])


# -- CPU accounting -------------------------------------------------------------------------

def test_parse_stat_reads_name_group_and_cpu_seconds() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    line = "4242 (yilian serve (w)) S 1 4200 4200 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 99 0 0"
    comm, pgrp, seconds = cpu.parse_stat(line)
    assert (comm, pgrp) == ("yilian serve (w)", 4200)
    assert seconds == pytest.approx(300 / cpu._TICK)


def test_parse_machine_counts_idle_and_iowait_as_not_busy() -> None:
    busy, total = cpu.parse_machine("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n")
    assert total == pytest.approx(1000 / cpu._TICK)
    assert busy == pytest.approx(150 / cpu._TICK)


def test_usage_is_the_difference_per_role_and_what_others_took() -> None:
    before = cpu.Snapshot({1: ("server", 10.0), 2: ("postgres", 5.0)}, machine_busy=100.0, machine_total=200.0)
    after = cpu.Snapshot({1: ("server", 13.0), 2: ("postgres", 6.0), 3: ("postgres", 0.5)},
                         machine_busy=110.0, machine_total=220.0)
    usage = cpu.usage(before, after, wrk_seconds=0.5)
    assert usage is not None
    assert usage.seconds == {"server": 3.0, "postgres": 1.5, "wrk": 0.5}
    assert usage.others == pytest.approx(5.0)
    assert usage.share(usage.others) == pytest.approx(0.25)
    assert usage.per_request_ms("server", 1000) == pytest.approx(3.0)
    assert cpu.usage(None, after) is None


def test_the_cpu_table_shows_the_machine_speed_probe_of_each_scenario() -> None:
    assert cpu.speed_probe_ms(200_000) > 0
    before = cpu.Snapshot({1: ("server", 10.0)}, machine_busy=100.0, machine_total=200.0)
    after = cpu.Snapshot({1: ("server", 13.0)}, machine_busy=104.0, machine_total=220.0)
    result = DatabaseResult("postgres", "postgresql://x/y", 10, 32)
    result.scenarios["create"] = ScenarioResult("create", "create: POST", 1, _wrk(600.0),
                                                cpu_usage=cpu.usage(before, after), probe_ms=412.4)
    lines = format_cpu(result)
    assert lines[2].endswith("| probe ms |")
    assert lines[-1].startswith("| create | 0.50 |") and lines[-1].endswith("| 412 |")


def test_the_table_shows_the_rate_counting_the_audit_drain_after_wrk_stopped() -> None:
    result = DatabaseResult("postgres", "postgresql://x/y", 10, 32)
    result.scenarios["create"] = ScenarioResult("create", "create: POST", 1, _wrk(600.0), audit_tail_s=2.0)
    result.scenarios["read"] = ScenarioResult("read", "read: GET", 1, _wrk(700.0))  # not measured: dashes
    rows = {line.split(" | ")[0]: line for line in format_table(result).splitlines() if line.startswith("| ")}
    assert result.scenarios["create"].sustained_rps == 6000 / 12.0
    assert rows["| create: POST"].rstrip().endswith("| 2.0 | 500 |")
    assert rows["| read: GET"].rstrip().endswith("| – | – |")


def test_waiting_for_the_audit_queue_ends_when_the_server_has_drained_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO audit_queue (queued_at, resource) VALUES (CURRENT_TIMESTAMP, '{}')"))
        drained = threading.Event()

        def drain() -> None:  # what the server's background drain does, a moment later
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM audit_queue"))
            drained.set()

        timer = threading.Timer(0.3, drain)
        timer.start()
        waited = wait_for_audit_queue(url, poll_s=0.02)
        assert drained.is_set() and waited is not None and waited >= 0.25
        assert wait_for_audit_queue(url, timeout_s=0.1) is not None  # empty: at once
    finally:
        engine.dispose()
