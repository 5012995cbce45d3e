"""Bulk loading of FHIR data into a FHIR server: the engine behind ``yilian load PATH...``.

What it accepts, and why that way:

- ``*.json`` holding a Bundle of type ``transaction`` or ``batch`` is POSTed to the base URL
  unchanged (bytes as read), so what the server sees is exactly what the file says;
- ``*.ndjson`` (FHIR bulk-data format, one resource per line) is grouped into ``batch``
  Bundles of :data:`NDJSON_BATCH_SIZE` entries: ``PUT Type/id`` when the resource has an
  id (idempotent, so a rerun does no harm) and ``POST Type`` otherwise;
- directories are walked recursively for both (hidden files and the state file skipped).

Results are read entry by entry: a batch answers ``200`` even when some entries failed, so
each ``entry.response.status`` is checked and a failure keeps the file, the NDJSON line or
the entry index, and the server's ``OperationOutcome.issue.diagnostics`` as its reason.

Order: bundles run ``concurrency`` at a time, but files are loaded in *waves* by what they
hold (see :data:`LOAD_ORDER`), each wave finishing before the next starts, so a server that
checks references sees Organizations before the Practitioners and Patients that point to
them. Files of the same wave, and the batches of one NDJSON file, run concurrently.

Resumable: with a ``state_file``, every file that loaded without a failure is recorded
(path, size, mtime, base URL) as soon as it finishes, and skipped on the next run unless
it changed. A file with failures is not recorded, so a rerun sends all of it again: its
``PUT`` entries are harmless to repeat, its ``POST`` entries (NDJSON lines without an id)
are created again.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
NDJSON_BATCH_SIZE = 500
JSON_SUFFIXES = (".json",)
NDJSON_SUFFIXES = (".ndjson",)

#: Seconds to wait before each retry of a request that never reached the server (or was
#: refused with 429/503). Its length is the number of retries. Tests set it to zeros.
RETRY_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
#: Statuses that say "not processed, try again later" — safe to retry even for POST.
RETRY_STATUSES = frozenset({429, 503})
#: Transport errors worth a retry: the connection could not be made or was dropped. A read
#: *timeout* is not among them: the server may still be working on the bundle, and sending
#: it again could create its POST entries twice.
RETRY_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
    httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
)
#: Largest Retry-After honoured, in seconds.
MAX_RETRY_AFTER = 30.0

#: Load waves, by the resource type a file name starts with (bulk-data export naming:
#: ``Organization.ndjson``, ``Patient.000.ndjson``). Referenced types come first. Synthea's
#: ``hospitalInformation*.json`` / ``practitionerInformation*.json`` go in the first wave.
#: Any other file (transaction bundles of one patient, say) goes in the last wave.
LOAD_ORDER: tuple[tuple[str, ...], ...] = (
    ("Organization", "hospitalInformation", "practitionerInformation"),
    ("Location", "Practitioner", "Endpoint", "Medication", "Substance", "Device"),
    ("HealthcareService",),
    ("PractitionerRole", "CareTeam"),
    ("Patient",),
    ("RelatedPerson", "Coverage", "Account", "Group", "EpisodeOfCare"),
    ("Encounter",),
)

_NAME_PREFIX = re.compile(r"^[A-Za-z]+")
_ENTRY_EXPRESSION = re.compile(r"Bundle\.entry\[(\d+)\]")
_STATUS_CODE = re.compile(r"^\s*(\d{3})")


# --- results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """One thing that did not load."""

    file: str
    reason: str  # the server's OperationOutcome diagnostics, or what went wrong locally
    line: int | None = None  # 1-based line of an NDJSON file
    entry: int | None = None  # 0-based index of the entry in the Bundle the server saw
    status: int | None = None  # HTTP status of the request or of the batch entry

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        elif self.entry is not None:
            where += f" entry {self.entry}"
        status = f"HTTP {self.status}: " if self.status is not None else ""
        return f"{where}: {status}{self.reason}"


@dataclass
class LoadSummary:
    """What a :func:`load_paths` run did."""

    files: int = 0  # files read and sent this run
    skipped_files: int = 0  # files skipped because the state file records them as loaded
    bundles: int = 0  # Bundles POSTed (a retried request counts once)
    resources: int = 0  # entries the server accepted (2xx)
    retries: int = 0  # requests sent again after a connection error, 429 or 503
    failures: list[Failure] = field(default_factory=list)
    elapsed: float = 0.0  # seconds

    @property
    def ok(self) -> bool:
        return not self.failures

    def report(self, max_failures: int = 20) -> str:
        """A human-readable report for the command line (``yilian load`` prints it)."""
        text = (f"loaded {self.resources:,} resources in {self.bundles:,} bundles "
                f"from {self.files:,} files in {self.elapsed:.1f} s")
        if self.skipped_files:
            text += f" ({self.skipped_files:,} files skipped as already loaded)"
        if not self.failures:
            return text
        lines = [text + f"; {len(self.failures):,} failures:"]
        lines += [f"  {f}" for f in self.failures[:max_failures]]
        if len(self.failures) > max_failures:
            lines.append(f"  ... and {len(self.failures) - max_failures:,} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


# --- input files -------------------------------------------------------------------------

@dataclass
class _File:
    """A file being loaded, and the bookkeeping that tells when it is finished."""

    path: Path
    size: int
    mtime_ns: int
    pending: int = 0  # bundles sent and not yet answered
    generated: bool = False  # all its bundles have been submitted
    failed: bool = False
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return str(self.path)


@dataclass
class _Job:
    """One Bundle to POST."""

    file: _File
    body: bytes
    kind: str  # transaction | batch
    entries: int
    lines: list[int] | None  # NDJSON: the line of each entry
    weight: int  # bytes of input it stands for, for the progress bar


def collect_files(paths: Sequence[Path], *, exclude: Path | None = None) -> tuple[list[Path], list[Failure]]:
    """The files to load, in load order, and failures for paths that cannot be loaded.

    Directories are walked recursively (sorted, hidden names skipped); a file named
    explicitly must still be ``.json`` or ``.ndjson``.
    """
    found: list[Path] = []
    failures: list[Failure] = []
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude else None

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen and key != excluded:
            seen.add(key)
            found.append(p)

    for p in paths:
        p = Path(p)
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                rel = child.relative_to(p).parts
                if child.is_file() and child.suffix in JSON_SUFFIXES + NDJSON_SUFFIXES \
                        and not any(part.startswith(".") for part in rel):
                    add(child)
        elif p.is_file():
            if p.suffix in JSON_SUFFIXES + NDJSON_SUFFIXES:
                add(p)
            else:
                failures.append(Failure(str(p), "unsupported file type: expected .json or .ndjson"))
        else:
            failures.append(Failure(str(p), "no such file or directory"))
    return sorted(found, key=load_wave), failures


def load_wave(path: Path) -> int:
    """The wave (index in :data:`LOAD_ORDER`) a file is loaded in; unknown names go last."""
    m = _NAME_PREFIX.match(path.name)
    prefix = m.group(0) if m else ""
    for wave, names in enumerate(LOAD_ORDER):
        if prefix in names:
            return wave
    return len(LOAD_ORDER)


def _ndjson_entry(resource: dict[str, Any]) -> dict[str, Any]:
    rtype = resource["resourceType"]
    rid = resource.get("id")
    if isinstance(rid, str) and rid:
        return {"resource": resource, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}
    return {"resource": resource, "request": {"method": "POST", "url": rtype}}


def _batch_body(entries: list[dict[str, Any]]) -> bytes:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --- resumable state ---------------------------------------------------------------------

class _State:
    """Files already loaded into a server, kept in a small JSON file.

    Keyed by base URL then absolute path, so one state file can serve several servers and a
    file counts as loaded only into the server it was sent to.
    """

    VERSION = 1

    def __init__(self, path: Path, base_url: str) -> None:
        self.path = path
        self.base_url = base_url
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"version": self.VERSION, "servers": {}}
        if path.exists():
            try:
                loaded = json.loads(path.read_text("utf-8"))
                if isinstance(loaded, dict) and loaded.get("version") == self.VERSION:
                    self.data = loaded
            except (OSError, ValueError):
                pass  # unreadable: start afresh, it only costs a reload
        self.done: dict[str, Any] = self.data["servers"].setdefault(base_url, {})

    @staticmethod
    def key(f: _File) -> str:
        return str(f.path.resolve())

    def is_done(self, f: _File) -> bool:
        rec = self.done.get(self.key(f))
        return bool(rec) and rec.get("size") == f.size and rec.get("mtime_ns") == f.mtime_ns

    def mark_done(self, f: _File) -> None:
        with self.lock:
            self.done[self.key(f)] = {"size": f.size, "mtime_ns": f.mtime_ns,
                                      "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, ensure_ascii=False, indent=1), "utf-8")
            os.replace(tmp, self.path)  # atomic: an interrupted run never leaves half a file


# --- progress ----------------------------------------------------------------------------

class _Progress:
    """A one-line progress bar on stderr, weighted by bytes of input.

    Self-written rather than tqdm to add no dependency. On a terminal it redraws in place
    at most ten times a second; elsewhere (CI logs) it prints a line every few seconds.
    """

    WIDTH = 28

    def __init__(self, total_bytes: int, total_files: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = max(total_bytes, 1)
        self.total_files = total_files
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else 5.0
        self.done = 0
        self.files = 0
        self.resources = 0
        self.failures = 0
        self.started = time.monotonic()
        self.last = 0.0
        self.drawn = 0
        self.lock = threading.Lock()

    def advance(self, nbytes: int = 0, *, resources: int = 0, failures: int = 0, files: int = 0) -> None:
        with self.lock:
            self.done += nbytes
            self.resources += resources
            self.failures += failures
            self.files += files
            now = time.monotonic()
            if self.enabled and now - self.last >= self.interval:
                self.last = now
                self._draw()

    def close(self) -> None:
        with self.lock:
            if self.enabled:
                self._draw()
                if self.tty:
                    self.stream.write("\n")
                self.stream.flush()

    def _draw(self) -> None:
        share = min(self.done / self.total, 1.0)
        filled = int(share * self.WIDTH)
        rate = self.resources / max(time.monotonic() - self.started, 1e-6)
        text = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {share:4.0%}  "
                f"{self.files}/{self.total_files} files  {self.resources:,} resources  "
                f"{self.failures:,} failed  {rate:,.0f}/s")
        if self.tty:
            # pad over what a longer previous line left behind
            self.stream.write("\r" + text.ljust(self.drawn))
            self.drawn = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# --- sending -----------------------------------------------------------------------------

def _outcome_reason(outcome: Any) -> tuple[str | None, int | None]:
    """(diagnostics, entry index) from an OperationOutcome, errors before warnings."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return None, None
    issues = [i for i in outcome.get("issue") or [] if isinstance(i, dict)]
    issues.sort(key=lambda i: {"fatal": 0, "error": 1, "warning": 2}.get(i.get("severity"), 3))
    reasons: list[str] = []
    entry: int | None = None
    for issue in issues:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        if text and text not in reasons:
            reasons.append(str(text))
        for expr in (issue.get("expression") or []) + (issue.get("location") or []):
            m = _ENTRY_EXPRESSION.search(str(expr))
            if m and entry is None:
                entry = int(m.group(1))
    if entry is None and reasons:
        m = _ENTRY_EXPRESSION.search(reasons[0])
        entry = int(m.group(1)) if m else None
    return ("; ".join(reasons) or None), entry


def _status_of(text: Any) -> int | None:
    m = _STATUS_CODE.match(str(text or ""))
    return int(m.group(1)) if m else None


class _Runner:
    """Sends jobs on a thread pool and folds the answers into the summary."""

    def __init__(self, client: httpx.Client, base_url: str, summary: LoadSummary, state: _State | None,
                 progress: _Progress, concurrency: int) -> None:
        self.client = client
        self.url = base_url.rstrip("/")
        self.summary = summary
        self.state = state
        self.progress = progress
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="yilian-load")
        # at most two bundles waiting per worker: big NDJSON files are streamed, not read whole
        self.slots = threading.BoundedSemaphore(concurrency * 2)

    # bookkeeping (all under self.lock or the file's lock)

    def fail(self, f: _File, reason: str, *, line: int | None = None, entry: int | None = None,
             status: int | None = None) -> None:
        f.failed = True
        with self.lock:
            self.summary.failures.append(Failure(f.name, reason, line=line, entry=entry, status=status))
        self.progress.advance(failures=1)

    def _maybe_finish(self, f: _File) -> None:
        with f.lock:
            if f.finished or not f.generated or f.pending:
                return
            f.finished = True
        with self.lock:
            self.summary.files += 1
        if self.state is not None and not f.failed:
            self.state.mark_done(f)
        self.progress.advance(files=1)

    # the pipeline

    def run_wave(self, files: list[_File]) -> None:
        futures: list[Future[None]] = []
        for f in files:
            try:
                for job in self._jobs(f):
                    self.slots.acquire()
                    with f.lock:
                        f.pending += 1
                    fut = self.pool.submit(self._send, job)
                    fut.add_done_callback(lambda _f: self.slots.release())
                    futures.append(fut)
            except OSError as exc:
                self.fail(f, f"cannot read: {exc}")
            with f.lock:
                f.generated = True
            self._maybe_finish(f)
        wait(futures)

    def close(self, *, cancel: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)

    def _jobs(self, f: _File) -> Iterator[_Job]:
        if f.path.suffix in NDJSON_SUFFIXES:
            yield from self._ndjson_jobs(f)
        else:
            yield from self._json_jobs(f)

    def _json_jobs(self, f: _File) -> Iterator[_Job]:
        raw = f.path.read_bytes().removeprefix(b"\xef\xbb\xbf")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            self.fail(f, f"not valid JSON: {exc}")
            self.progress.advance(f.size)
            return
        rtype = doc.get("resourceType") if isinstance(doc, dict) else None
        kind = doc.get("type") if rtype == "Bundle" else None
        if kind not in ("transaction", "batch"):
            what = f"a Bundle of type {kind!r}" if rtype == "Bundle" else f"resourceType {rtype!r}"
            self.fail(f, f"expected a Bundle of type transaction or batch, found {what}")
            self.progress.advance(f.size)
            return
        entries = doc.get("entry") or []
        yield _Job(f, raw, kind, len(entries), None, f.size)

    def _ndjson_jobs(self, f: _File) -> Iterator[_Job]:
        entries: list[dict[str, Any]] = []
        lines: list[int] = []
        weight = 0
        with f.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                weight += len(raw)
                text = raw.strip()
                if lineno == 1:
                    text = text.removeprefix(b"\xef\xbb\xbf")
                if not text:
                    continue
                try:
                    resource = json.loads(text)
                except ValueError as exc:
                    self.fail(f, f"not valid JSON: {exc}", line=lineno)
                    continue
                if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                    self.fail(f, "not a FHIR resource: no resourceType", line=lineno)
                    continue
                entries.append(_ndjson_entry(resource))
                lines.append(lineno)
                if len(entries) == NDJSON_BATCH_SIZE:
                    yield _Job(f, _batch_body(entries), "batch", len(entries), lines, weight)
                    entries, lines, weight = [], [], 0
        if entries:
            yield _Job(f, _batch_body(entries), "batch", len(entries), lines, weight)
        elif weight:
            self.progress.advance(weight)

    def _post(self, body: bytes) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self.client.post(self.url, content=body, headers=HEADERS)
            except RETRY_ERRORS:
                if attempt >= len(RETRY_DELAYS):
                    raise
                delay = RETRY_DELAYS[attempt]
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= len(RETRY_DELAYS):
                    return response
                delay = RETRY_DELAYS[attempt]
                try:
                    delay = max(delay, min(float(response.headers.get("Retry-After", 0)), MAX_RETRY_AFTER))
                except ValueError:
                    pass  # an HTTP-date Retry-After: keep our own delay
            attempt += 1
            with self.lock:
                self.summary.retries += 1
            time.sleep(delay)

    def _send(self, job: _Job) -> None:
        f = job.file
        ok = 0
        try:
            try:
                response = self._post(job.body)
            except httpx.HTTPError as exc:
                self._fail_job(job, f"{type(exc).__name__}: {exc or 'connection failed'}")
                return
            with self.lock:
                self.summary.bundles += 1
            ok = self._read_response(job, response)
        except Exception as exc:  # a bug or a surprise must not vanish inside a Future
            self._fail_job(job, f"{type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                self.summary.resources += ok
            self.progress.advance(job.weight, resources=ok)
            with f.lock:
                f.pending -= 1
            self._maybe_finish(f)

    def _fail_job(self, job: _Job, reason: str, *, entry: int | None = None, status: int | None = None) -> None:
        """A failure of the whole bundle, or of one entry of it when ``entry`` is given."""
        line = None
        if job.lines is not None:
            if entry is not None and 0 <= entry < len(job.lines):
                line = job.lines[entry]
            elif entry is None:
                # the whole batch of an NDJSON file: name its first line and its extent
                line = job.lines[0]
                reason = f"batch of lines {job.lines[0]}-{job.lines[-1]} ({job.entries} entries) failed: {reason}"
        self.fail(job.file, reason, line=line, entry=entry, status=status)

    def _read_response(self, job: _Job, response: httpx.Response) -> int:
        """Number of entries accepted; failures recorded on the way."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not response.is_success:
            reason, entry = _outcome_reason(body)
            if reason is None:
                reason = response.reason_phrase or "request failed"
                snippet = response.text.strip()[:200]
                if snippet:
                    reason += f": {snippet}"
            self._fail_job(job, reason, entry=entry, status=response.status_code)
            return 0
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            if job.kind == "transaction":
                return job.entries  # all or nothing, and the server said all
            self._fail_job(job, "the server's answer to a batch is not a Bundle", status=response.status_code)
            return 0
        ok = 0
        answers = body.get("entry") or []
        for index, answer in enumerate(answers):
            resp = answer.get("response") if isinstance(answer, dict) else None
            status = _status_of((resp or {}).get("status"))
            if status is not None and 200 <= status < 300:
                ok += 1
                continue
            reason, _ = _outcome_reason((resp or {}).get("outcome"))
            self._fail_job(job, reason or f"entry answered {(resp or {}).get('status')!r}", entry=index, status=status)
        if len(answers) < job.entries:
            for index in range(len(answers), job.entries):
                self._fail_job(job, "no answer for this entry in the server's response", entry=index)
        return ok


# --- entry point -------------------------------------------------------------------------

def make_client(concurrency: int = 4) -> httpx.Client:
    """An httpx client sized for ``concurrency`` parallel bundles, with long read timeouts
    because a large transaction may take a while to commit."""
    return httpx.Client(
        timeout=httpx.Timeout(300.0, connect=10.0),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        headers={"User-Agent": "yilian-load"},
    )


def load_paths(paths: list[Path], base_url: str, *, client: httpx.Client | None = None,
               state_file: Path | None = None, concurrency: int = 4, progress: bool = True) -> LoadSummary:
    """Load FHIR files and directories into the server at ``base_url`` (the FHIR base,
    which receives the transaction/batch POSTs).

    Never raises for bad data or an unreachable server: every problem is a
    :class:`Failure` in the returned summary. ``client`` lets tests or the CLI bring their
    own (auth headers, transport); otherwise one is created and closed here.
    """
    started = time.monotonic()
    concurrency = max(1, concurrency)
    summary = LoadSummary()
    state = _State(Path(state_file), base_url) if state_file else None
    found, summary.failures = collect_files(paths, exclude=Path(state_file) if state_file else None)

    todo: list[_File] = []
    for p in found:
        try:
            st = p.stat()
        except OSError as exc:
            summary.failures.append(Failure(str(p), f"cannot read: {exc}"))
            continue
        f = _File(p, st.st_size, st.st_mtime_ns)
        if state is not None and state.is_done(f):
            summary.skipped_files += 1
        else:
            todo.append(f)

    bar = _Progress(sum(f.size for f in todo), len(todo), progress)
    bar.advance(failures=len(summary.failures))
    own_client = client is None
    http = client or make_client(concurrency)
    runner = _Runner(http, base_url, summary, state, bar, concurrency)
    interrupted = False
    try:
        waves: dict[int, list[_File]] = {}
        for f in todo:
            waves.setdefault(load_wave(f.path), []).append(f)
        for wave in sorted(waves):
            runner.run_wave(waves[wave])
    except BaseException:
        interrupted = True
        raise
    finally:
        runner.close(cancel=interrupted)
        bar.close()
        if own_client:
            http.close()
        summary.elapsed = time.monotonic() - started
        # bundles finish in any order: report failures in file, line, entry order
        summary.failures.sort(key=lambda x: (x.file, x.line if x.line is not None else -1,
                                             x.entry if x.entry is not None else -1))
    return summary
