"""The bulk loader (service.loader) against a tiny real HTTP server on a loopback port.

The server is a stand-in for a FHIR server's transaction/batch endpoint: it records every
request and answers like a FHIR server would — a transaction fails as a whole with an
OperationOutcome naming the entry, a batch answers 200 with one status per entry. A
resource with ``"gender": "robot"`` is its way to be invalid.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service import loader
from service.demo import demo_bundle
from service.loader import LoadSummary, load_paths

BAD_GENDER = "Patient.gender: 'robot' is not one of male | female | other | unknown"


def outcome(diagnostics: str, expression: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "error", "code": "code-invalid", "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class FakeFhir(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.drop = 0  # close the connection without answering this many times
        self.unavailable = 0  # answer 503 this many times
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"

    def bundles(self) -> list[dict[str, Any]]:
        return [r["json"] for r in self.requests]


class Handler(BaseHTTPRequestHandler):
    server: FakeFhir

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        srv = self.server
        with srv.lock:
            if srv.drop:
                srv.drop -= 1
                self.close_connection = True
                return  # no response at all: the client sees the connection drop
            if srv.unavailable:
                srv.unavailable -= 1
                self._answer(503, outcome("busy"), {"Retry-After": "0"})
                return
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            time.sleep(srv.delay)
            doc = json.loads(body)
            with srv.lock:
                srv.requests.append({"path": self.path, "headers": dict(self.headers), "body": body, "json": doc})
            self._answer(*self._process(doc))
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _process(self, bundle: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
            return 400, outcome("expected a transaction or batch Bundle")
        entries = bundle.get("entry", [])
        bad = [i for i, e in enumerate(entries) if e["resource"].get("gender") == "robot"]
        if bundle["type"] == "transaction":
            if bad:
                return 400, outcome(BAD_GENDER, f"Bundle.entry[{bad[0]}].resource.gender")
            answers = [{"response": {"status": "201 Created"}} for _ in entries]
            return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        answers = []
        for i, _ in enumerate(entries):
            if i in bad:
                answers.append({"response": {"status": "400 Bad Request",
                                             "outcome": outcome(BAD_GENDER, "Patient.gender")}})
            else:
                answers.append({"response": {"status": "201 Created"}})
        return 200, {"resourceType": "Bundle", "type": "batch-response", "entry": answers}

    def _answer(self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server() -> Iterator[FakeFhir]:
    srv = FakeFhir()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def patient(n: int, *, with_id: bool = True, gender: str = "female") -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": "Patient", "gender": gender, "name": [{"text": f"患者{n}"}]}
    if with_id:
        r["id"] = f"p{n}"
    return r


def write_ndjson(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def tx(kind: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind,
            "entry": [{"resource": r, "request": {"method": "PUT", "url": f"Patient/{r['id']}"}} for r in resources]}


def load(paths: list[Path], srv: FakeFhir, **kw: Any) -> LoadSummary:
    kw.setdefault("progress", False)
    return load_paths(paths, srv.base_url, **kw)


# --- NDJSON ------------------------------------------------------------------------------

def test_ndjson_is_grouped_into_batches_of_500_and_failures_name_the_line(server: FakeFhir, tmp_path: Path) -> None:
    lines = []
    for n in range(1, 1202):
        if n == 17:
            lines.append(json.dumps(patient(n, gender="robot")))
        elif n == 30:
            lines.append("{not json")
        elif n == 31:
            lines.append("")
        else:
            lines.append(json.dumps(patient(n, with_id=n % 10 != 0), ensure_ascii=False))
    path = write_ndjson(tmp_path / "Patient.ndjson", lines)

    summary = load([path], server)

    sizes = [len(b["entry"]) for b in server.bundles()]
    assert sorted(sizes) == [199, 500, 500]  # 1,201 lines less a blank and a broken one
    assert all(b["type"] == "batch" for b in server.bundles())
    for req in server.requests:
        assert req["path"] == "/fhir"
        assert req["headers"]["Content-Type"] == "application/fhir+json"
    requests = [e["request"] for b in server.bundles() for e in b["entry"]]
    assert {"method": "PUT", "url": "Patient/p1"} in requests
    assert {"method": "POST", "url": "Patient"} in requests  # line 10 has no id
    assert sum(r["method"] == "POST" for r in requests) == 119  # every tenth line, but line 30 is broken

    assert summary.files == 1 and summary.bundles == 3
    assert summary.resources == 1198
    by_line = {f.line: f for f in summary.failures}
    assert set(by_line) == {17, 30}
    assert by_line[17].file == str(path)
    assert by_line[17].reason == BAD_GENDER  # the server's diagnostics, verbatim
    assert by_line[17].status == 400
    assert by_line[30].reason.startswith("not valid JSON") and by_line[30].status is None
    assert f"{path}:17: HTTP 400: {BAD_GENDER}" in summary.report()
    assert not summary.ok


def test_ndjson_line_that_is_not_a_resource(server: FakeFhir, tmp_path: Path) -> None:
    path = write_ndjson(tmp_path / "x.ndjson", [json.dumps(patient(1)), "[1, 2]", json.dumps({"id": "a"})])
    summary = load([path], server)
    assert summary.resources == 1
    assert [(f.line, f.reason) for f in summary.failures] == [
        (2, "not a FHIR resource: no resourceType"), (3, "not a FHIR resource: no resourceType")]


# --- Bundles in JSON files ---------------------------------------------------------------

def test_transaction_file_is_posted_as_is(server: FakeFhir, tmp_path: Path) -> None:
    bundle = demo_bundle()
    path = write_json(tmp_path / "demo.json", bundle)
    summary = load([path], server)
    assert len(server.requests) == 1
    assert server.requests[0]["body"] == path.read_bytes()
    assert summary.ok, summary.report()
    assert summary.resources == len(bundle["entry"]) and summary.bundles == 1 and summary.files == 1


def test_failed_transaction_reports_entry_and_diagnostics(server: FakeFhir, tmp_path: Path) -> None:
    path = write_json(tmp_path / "tx.json", tx("transaction", [patient(1), patient(2), patient(3, gender="robot")]))
    summary = load([path], server)
    assert summary.resources == 0 and summary.bundles == 1
    [failure] = summary.failures
    assert (failure.file, failure.entry, failure.line, failure.status) == (str(path), 2, None, 400)
    assert failure.reason == BAD_GENDER
    assert str(failure) == f"{path} entry 2: HTTP 400: {BAD_GENDER}"


def test_batch_file_is_read_entry_by_entry(server: FakeFhir, tmp_path: Path) -> None:
    path = write_json(tmp_path / "batch.json", tx("batch", [patient(1), patient(2, gender="robot"), patient(3)]))
    summary = load([path], server)
    assert summary.resources == 2
    [failure] = summary.failures
    assert (failure.entry, failure.line, failure.status, failure.reason) == (1, None, 400, BAD_GENDER)


def test_json_that_is_not_a_transaction_or_batch(server: FakeFhir, tmp_path: Path) -> None:
    a = write_json(tmp_path / "collection.json", {"resourceType": "Bundle", "type": "collection"})
    b = write_json(tmp_path / "patient.json", patient(1))
    c = tmp_path / "broken.json"
    c.write_text("{", encoding="utf-8")
    summary = load([a, b, c], server)
    assert server.requests == []
    reasons = {Path(f.file).name: f.reason for f in summary.failures}
    assert reasons["collection.json"] == "expected a Bundle of type transaction or batch, found a Bundle of type 'collection'"
    assert reasons["patient.json"] == "expected a Bundle of type transaction or batch, found resourceType 'Patient'"
    assert reasons["broken.json"].startswith("not valid JSON")


def test_server_error_without_outcome(server: FakeFhir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Handler, "_process", lambda self, doc: (500, {"oops": True}))
    path = write_ndjson(tmp_path / "Patient.ndjson", [json.dumps(patient(n)) for n in range(1, 4)])
    summary = load([path], server)
    [failure] = summary.failures
    assert failure.status == 500 and failure.line == 1
    assert "batch of lines 1-3 (3 entries) failed" in failure.reason


# --- files and directories ---------------------------------------------------------------

def test_directories_are_walked_recursively_in_waves(server: FakeFhir, tmp_path: Path) -> None:
    data = tmp_path / "export"
    write_ndjson(data / "b" / "Observation.ndjson",
                 [json.dumps({"resourceType": "Observation", "id": f"o{n}", "status": "final"}) for n in range(600)])
    write_ndjson(data / "a" / "Patient.ndjson", [json.dumps(patient(n)) for n in range(700)])
    write_ndjson(data / "Organization.ndjson",
                 [json.dumps({"resourceType": "Organization", "id": f"org{n}"}) for n in range(3)])
    (data / "notes.txt").write_text("not FHIR", encoding="utf-8")
    write_json(data / ".hidden" / "x.json", tx("batch", [patient(1)]))

    summary = load([data], server, concurrency=4)

    assert summary.ok, summary.report()
    assert summary.files == 3 and summary.bundles == 5 and summary.resources == 1303
    order = [b["entry"][0]["resource"]["resourceType"] for b in server.bundles()]
    # references point to earlier waves: Organization, then Patient, then the rest
    assert order == ["Organization", "Patient", "Patient", "Observation", "Observation"]


def test_missing_and_unsupported_paths_are_failures(server: FakeFhir, tmp_path: Path) -> None:
    txt = tmp_path / "data.csv"
    txt.write_text("a,b", encoding="utf-8")
    summary = load([tmp_path / "nope", txt], server)
    assert {Path(f.file).name: f.reason for f in summary.failures} == {
        "nope": "no such file or directory", "data.csv": "unsupported file type: expected .json or .ndjson"}
    assert summary.files == 0 and server.requests == []


def test_bundles_are_sent_concurrently(server: FakeFhir, tmp_path: Path) -> None:
    server.delay = 0.15
    paths = [write_json(tmp_path / f"t{n}.json", tx("transaction", [patient(n)])) for n in range(8)]
    summary = load(paths, server, concurrency=4)
    assert summary.ok and summary.resources == 8
    assert server.max_in_flight > 1


# --- resuming ----------------------------------------------------------------------------

def test_rerun_with_state_file_skips_completed_files(server: FakeFhir, tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = write_ndjson(data / "good.ndjson", [json.dumps(patient(n)) for n in range(5)])
    bad = write_json(data / "bad.json", tx("transaction", [patient(10), patient(11, gender="robot")]))
    state = data / "load-state.json"  # inside the loaded directory: must not be loaded itself

    first = load([data], server, state_file=state)
    assert first.files == 2 and first.resources == 5 and len(first.failures) == 1
    assert state.exists()
    recorded = json.loads(state.read_text("utf-8"))["servers"][server.base_url]
    assert list(recorded) == [str(good.resolve())]  # only the file that loaded completely

    server.requests.clear()
    second = load([data], server, state_file=state)
    assert second.skipped_files == 1 and second.files == 1
    assert [r["json"]["type"] for r in server.requests] == ["transaction"]  # only bad.json again

    # a changed file is loaded again
    server.requests.clear()
    good.write_text(good.read_text("utf-8") + json.dumps(patient(99)) + "\n", encoding="utf-8")
    third = load([good], server, state_file=state)
    assert third.skipped_files == 0 and third.resources == 6
    server.requests.clear()
    fourth = load([good], server, state_file=state)
    assert fourth.skipped_files == 1 and server.requests == []

    # the state is per server: another base URL loads everything
    other = load_paths([good], server.base_url + "2", state_file=state, progress=False)
    assert other.skipped_files == 0 and other.resources == 6


def test_unreadable_state_file_starts_afresh(server: FakeFhir, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("garbage", encoding="utf-8")
    path = write_ndjson(tmp_path / "Patient.ndjson", [json.dumps(patient(1))])
    summary = load([path], server, state_file=state)
    assert summary.ok and summary.resources == 1
    assert str(path.resolve()) in json.loads(state.read_text("utf-8"))["servers"][server.base_url]


# --- retries -----------------------------------------------------------------------------

def test_dropped_connections_are_retried(server: FakeFhir, tmp_path: Path) -> None:
    server.drop = 2
    path = write_json(tmp_path / "tx.json", tx("transaction", [patient(1)]))
    summary = load([path], server)
    assert summary.ok, summary.report()
    assert summary.retries == 2 and summary.bundles == 1 and summary.resources == 1


def test_503_is_retried(server: FakeFhir, tmp_path: Path) -> None:
    server.unavailable = 1
    path = write_json(tmp_path / "tx.json", tx("transaction", [patient(1)]))
    summary = load([path], server)
    assert summary.ok and summary.retries == 1 and summary.resources == 1


def test_unreachable_server_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    path = write_ndjson(tmp_path / "Patient.ndjson", [json.dumps(patient(1)), json.dumps(patient(2))])
    summary = load_paths([path], f"http://127.0.0.1:{port}/fhir", progress=False)
    assert summary.retries == len(loader.RETRY_DELAYS)
    assert summary.bundles == 0 and summary.resources == 0
    [failure] = summary.failures
    assert failure.line == 1 and "ConnectError" in failure.reason


# --- progress ----------------------------------------------------------------------------

def test_progress_bar_goes_to_stderr(server: FakeFhir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_ndjson(tmp_path / "Patient.ndjson", [json.dumps(patient(n)) for n in range(3)])
    load_paths([path], server.base_url, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "100%" in captured.err and "1/1 files" in captured.err and "3 resources" in captured.err


def test_no_progress_output_when_disabled(server: FakeFhir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_ndjson(tmp_path / "Patient.ndjson", [json.dumps(patient(1))])
    load_paths([path], server.base_url, progress=False)
    assert capsys.readouterr().err == ""


def test_mtime_change_alone_reloads(server: FakeFhir, tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    path = write_ndjson(tmp_path / "Patient.ndjson", [json.dumps(patient(1))])
    load([path], server, state_file=state)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = load([path], server, state_file=state)
    assert again.skipped_files == 0 and again.resources == 1
