"""Every access leaves a trace (PIPL Art. 55, MLPS level 3): AuditEvent and Provenance.

Where each record is made, so that nothing is recorded twice and nothing is lost:

* **Writes** — an after-write hook (:func:`record_write`, every type but AuditEvent and
  Provenance) appends the AuditEvent and the Provenance (target ``Type/id/_history/n``,
  activity from v3-DataOperation) of each version to the ``audit_queue`` table *in the write's
  own transaction*: they exist exactly when the change does, and a failed transaction leaves
  neither. (Creating and indexing two resources inside every write would make single writes
  2–4 times and Bundles up to 10 times slower; one small INSERT costs almost nothing.)
* **Reads, searches, history, batch/transaction requests, and every refused request**
  (401/403/404/422 ..., including refused writes, whose transaction rolled back) — the
  :class:`PrivacyMiddleware` at the API boundary builds the AuditEvent once the response is
  ready and appends it to the queue *before* the response leaves (:class:`AuditQueue`, group
  commit: one short transaction for every request that finished meanwhile). Acknowledged means
  durable; a crash loses nothing that was answered.
* The queue is turned into AuditEvent and Provenance resources by :func:`drain` — in the
  background of each server process (every ``YILIAN_AUDIT_DRAIN_INTERVAL_MS``), and by
  ``yilian audit drain`` — creating the resources and deleting their rows in one transaction
  (never lost, never doubled; concurrent drainers skip each other's rows on PostgreSQL).
* **Logins** — the OAuth server calls :func:`record_login` (durable when it returns).

AuditEvents follow DICOM/IHE: type ``DCM|110110`` Patient Record (``110114`` User
Authentication for logins), subtype ``restful-interaction``, action C/R/U/D/E, outcome 0/4/8,
agents: the user or client (requestor, with the organization as ``auditevent-OnBehalfOf``)
and the organization; source: this gateway; entities: the resource reference (versioned for
writes), the query (base64, resident IDs masked) and the patient when known.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_plus

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.demo.codes import BASE
from service.fhir import tables
from service.fhir.access import AccessContext
from service.fhir.db import execute_prepared, hold, is_postgres, write_transaction
from service.fhir.errors import Forbidden, Issue, operation_outcome
from service.fhir.hooks import ANY_TYPE, WriteEvent, WriteHooks
from service.fhir.ids import new_id
from service.fhir.indexing import IndexRows, index_resource
from service.fhir.store import ResourceStore, fhir_instant
from service.security.audit_tables import AuditQueueEntry
from service.security.masking import mask_body, mask_text, may_see_resident_ids

try:
    import fcntl
except ImportError:  # Windows: SQLite drains of several processes may then overlap
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("yilian.audit")

QUEUE: sa.Table = AuditQueueEntry.__table__  # type: ignore[attr-defined]
AUDIT_TYPES = ("AuditEvent", "Provenance")

DCM = "http://dicom.nema.org/resources/ontology/DCM"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ON_BEHALF_OF = "http://hl7.org/fhir/StructureDefinition/auditevent-OnBehalfOf"
CLIENT_SID = f"{BASE}/sid/oauth-client"
USER_SID = f"{BASE}/sid/user"

PATIENT_RECORD = {"system": DCM, "code": "110110", "display": "Patient Record"}
USER_AUTHENTICATION = {"system": DCM, "code": "110114", "display": "User Authentication"}
AUDIT_LOG_USED = {"system": DCM, "code": "110101", "display": "Audit Log Used"}
LOGIN = {"system": DCM, "code": "110122", "display": "Login"}
SECURITY_ALERT = {"system": DCM, "code": "110113", "display": "Security Alert"}
SOFTWARE_CONFIGURATION = {"system": DCM, "code": "110131", "display": "Software Configuration"}
SOURCE = {"site": "yilian", "observer": {"display": "Yilian FHIR gateway"},
          "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                    "display": "Application Server"}]}

#: (subtype code, DICOM action) per REST interaction.
ACTIONS = {"read": "R", "vread": "R", "history-instance": "R", "history-type": "R", "history-system": "R",
           "search-type": "E", "search-system": "E", "create": "C", "update": "U", "patch": "U", "delete": "D",
           "transaction": "E", "batch": "E", "operation": "E"}
#: The REST handler that answered → interaction (service.api.rest.ROUTES).
HANDLERS = {"read": "read", "vread": "vread", "search_type": "search-type", "search_post": "search-type",
            "history_instance": "history-instance", "history_type": "history-type",
            "history_system": "history-system", "create": "create", "update": "update",
            "conditional_update": "update", "patch": "patch", "delete": "delete", "conditional_delete": "delete",
            "batch_or_transaction": "transaction"}
#: Handlers that touch no stored data (not audited).
UNAUDITED_HANDLERS = {"metadata", "validate_type", "validate_instance"}
#: Outside HANDLERS, only FHIR operations (``/$name``) are audited here.
_ACTIVITY = {"POST": "CREATE", "PUT": "UPDATE", "PATCH": "UPDATE", "DELETE": "DELETE"}
_WRITE_SUBTYPE = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_PATIENT_KEYS = ("subject", "patient", "beneficiary", "for")


# -- what one request did (shared by the middleware, the context dependency and write hooks) ----

@dataclass
class RequestAudit:
    """Filled while a request runs (the caller from ``request.state``, the write flag by
    :func:`record_write` in whatever thread the write runs); read when the response is ready."""

    method: str
    path: str
    query: str
    address: str | None
    ctx: AccessContext | None = None
    written_in_transaction: bool = False  # a write hook recorded AuditEvents in the write's transaction
    request_body: bytearray = field(default_factory=bytearray)


_CURRENT: ContextVar[RequestAudit | None] = ContextVar("yilian_request_audit", default=None)


# -- building AuditEvent and Provenance ------------------------------------------------------------

def _who(ctx: AccessContext | None) -> dict[str, Any]:
    if ctx is None:
        return {"display": "unauthenticated"}
    if ctx.practitioner:
        return {"reference": ctx.practitioner}
    if ctx.user:
        return {"identifier": {"system": USER_SID, "value": ctx.user}, "display": ctx.user}
    if ctx.patient and not ctx.client_id:
        return {"reference": ctx.patient}
    client = ctx.client_id or "anonymous"
    return {"identifier": {"system": CLIENT_SID, "value": client}, "display": client}


def _agents(ctx: AccessContext | None, address: str | None) -> list[dict[str, Any]]:
    person = bool(ctx and (ctx.practitioner or ctx.user))
    requestor: dict[str, Any] = {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                             "code": "humanuser", "display": "human user"} if person else
                            {"system": DCM, "code": "110150", "display": "Application"}]},
        "who": _who(ctx),
        "requestor": True,
    }
    if ctx is not None and ctx.client_id:
        requestor["altId"] = ctx.client_id
    if address:
        requestor["network"] = {"address": address, "type": "2"}
    if ctx is not None and ctx.organization:
        requestor["extension"] = [{"url": ON_BEHALF_OF, "valueReference": {"reference": ctx.organization}}]
    agents = [requestor]
    if ctx is not None and ctx.organization:
        agents.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                                            "code": "PROV", "display": "healthcare provider"}]},
                       "who": {"reference": ctx.organization}, "requestor": False})
    if ctx is not None and ctx.patient and _who(ctx).get("reference") != ctx.patient:
        agents.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                            "code": "PAT", "display": "patient"}]},
                       "who": {"reference": ctx.patient}, "requestor": False})
    return agents


def _outcome(status: int) -> tuple[str, str]:
    code = "0" if status < 400 else ("4" if status < 500 else "8")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return code, f"{status} {phrase}".strip()


def resource_entity(reference: str) -> dict[str, Any]:
    entity: dict[str, Any] = {"what": {"reference": reference},
                              "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                              "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}}
    if reference.startswith("Patient/"):
        entity["type"] = {"system": ENTITY_TYPE, "code": "1", "display": "Person"}
        entity["role"] = {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}
    return entity


def patient_entity(reference: str) -> dict[str, Any]:
    return {"what": {"reference": reference}, "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}}


def query_entity(description: str) -> dict[str, Any]:
    masked = mask_text(description)
    return {"type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
            "description": masked, "query": base64.b64encode(masked.encode()).decode()}


def audit_event(*, subtype: str | None, action: str, status: int, ctx: AccessContext | None,
                entities: list[dict[str, Any]], recorded: datetime, address: str | None = None,
                event_type: dict[str, str] = PATIENT_RECORD, description: str | None = None) -> dict[str, Any]:
    """An R4 AuditEvent (DICOM/IHE codes) ready to store."""
    outcome, outcome_desc = _outcome(status)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": dict(event_type),
        "action": action,
        "recorded": fhir_instant(recorded),
        "outcome": outcome,
        "outcomeDesc": description or outcome_desc,
        "agent": _agents(ctx, address),
        "source": SOURCE,
    }
    if subtype is not None:
        event["subtype"] = [LOGIN if subtype == "login" else {"system": RESTFUL, "code": subtype}]
    if entities:
        event["entity"] = entities
    return event


def provenance(*, targets: list[str], activity: str, ctx: AccessContext, recorded: datetime) -> dict[str, Any]:
    """Who made these versions (R4 Provenance): the organization is the author, the user or
    client entered them on the organization's behalf."""
    agents: list[dict[str, Any]] = []
    participant = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
    if ctx.organization:
        agents.append({"type": {"coding": [{"system": participant, "code": "author", "display": "Author"}]},
                       "who": {"reference": ctx.organization}})
    enterer: dict[str, Any] = {"type": {"coding": [{"system": participant, "code": "enterer", "display": "Enterer"}]},
                               "who": _who(ctx)}
    if ctx.organization:
        enterer["onBehalfOf"] = {"reference": ctx.organization}
    agents.append(enterer)
    return {
        "resourceType": "Provenance",
        "target": [{"reference": target} for target in targets],
        "recorded": fhir_instant(recorded),
        "activity": {"coding": [{"system": DATA_OPERATION, "code": activity}]},
        "agent": agents,
    }


def _patients_of(resource: dict[str, Any] | None) -> list[str]:
    if not resource:
        return []
    if resource.get("resourceType") == "Patient" and resource.get("id"):
        return [f"Patient/{resource['id']}"]
    found = []
    for key in _PATIENT_KEYS:
        value = resource.get(key)
        if isinstance(value, dict) and str(value.get("reference", "")).startswith("Patient/"):
            found.append(value["reference"])
    return found


# -- writes: in the write's own transaction -------------------------------------------------------

def record_write(event: WriteEvent) -> None:
    """After-write hook (every type but the audit trail's own): note the write on the
    transaction; just before COMMIT its AuditEvents and Provenances are queued in one INSERT.
    They commit with the write and roll back with it."""
    if event.resource_type in AUDIT_TYPES:
        return  # the audit trail does not audit itself
    tx = event.tx
    content = event.resource if event.resource is not None else event.previous
    reference = f"{event.resource_type}/{event.resource_id}"
    target = f"{reference}/_history/{_version_after(event)}"
    patients = [p for p in _patients_of(content) if p != reference]
    records = tx.before_commit("yilian.audit", _TransactionRecords(tx.conn, tx.clock()))
    assert isinstance(records, _TransactionRecords)
    records.add(event.ctx, event.method, target, patients, initiator=tx.initiator)
    current = _CURRENT.get()
    if current is not None:
        current.written_in_transaction = True
        records.address = current.address


class _TransactionRecords:
    """The audit records of one transaction, queued in one INSERT just before its COMMIT.

    Writes by the same caller with the same interaction share one AuditEvent (an entity per
    version written) and one Provenance (a target per version): a 500-entry transaction Bundle
    leaves two records per kind of write, not a thousand, and every version is still found by
    ``Provenance?target=`` and ``AuditEvent?entity=``.

    A follow-up the service writes on a caller's behalf in the same transaction (the Slot a
    ``$book`` takes, the Task a referral opens: ``StoreTransaction.as_system``) keeps its own
    Provenance — the service made that version — but is an entity of the caller's AuditEvent,
    described as the service's follow-up: the audit trail shows one interaction with everything
    it changed, and a booking stores three records instead of four."""

    def __init__(self, conn: sa.Connection, recorded: datetime) -> None:
        self.conn = conn
        self.recorded = recorded
        self.address: str | None = None
        self.groups: dict[tuple[AccessContext, str], _WriteGroup] = {}

    def add(self, ctx: AccessContext, method: str, target: str, patients: list[str], *,
            initiator: AccessContext | None = None) -> None:
        group = self.groups.setdefault((ctx, method), _WriteGroup(initiator=initiator or ctx))
        group.targets.append(target)
        group.patients.update(dict.fromkeys(patients))

    def __call__(self) -> None:
        records: list[dict[str, Any]] = []
        audits: dict[AccessContext, dict[str, Any]] = {}  # the first AuditEvent of each caller
        follow_ups: list[tuple[AccessContext, str, _WriteGroup]] = []
        for (ctx, method), group in self.groups.items():
            if group.initiator != ctx:
                follow_ups.append((ctx, method, group))
            else:
                audit = self._audit(ctx, method, group)
                audits.setdefault(ctx, audit)
                records.append(audit)
            records.append(provenance(targets=group.targets, activity=_ACTIVITY[method], ctx=ctx,
                                      recorded=self.recorded))
        for ctx, method, group in follow_ups:
            audit = audits.get(group.initiator)
            if audit is None:  # the caller wrote nothing itself: the follow-up has its own record
                records.append(self._audit(ctx, method, group))
                continue
            by = ctx.client_id or "yilian"
            entities = audit.setdefault("entity", [])
            entities += [dict(resource_entity(t), description=f"{_WRITE_SUBTYPE[method]} by {by}, following this request")
                         for t in group.targets]
            known = {e["what"]["reference"] for e in entities if "what" in e}
            entities += [patient_entity(p) for p in group.patients if p not in known]
        queue_records(self.conn, self.recorded, records)

    def _audit(self, ctx: AccessContext, method: str, group: _WriteGroup) -> dict[str, Any]:
        subtype = _WRITE_SUBTYPE[method]
        entities = [resource_entity(t) for t in group.targets] + [patient_entity(p) for p in group.patients]
        return audit_event(subtype=subtype, action=ACTIONS[subtype], status=200, ctx=ctx, entities=entities,
                           recorded=self.recorded, address=self.address)


@dataclass
class _WriteGroup:
    initiator: AccessContext
    targets: list[str] = field(default_factory=list)
    patients: dict[str, None] = field(default_factory=dict)  # ordered set


def record_configuration_change(conn: sa.Connection, ctx: AccessContext, *, what: str, action: str,
                                description: str, address: str | None = None) -> None:
    """Queue the AuditEvent of a change to the service's own configuration (a capacity policy
    ...) in the change's transaction: DICOM Security Alert / Software Configuration, the
    configured thing as entity, ``action`` C, U or D."""
    now = datetime.now(UTC)
    event = audit_event(subtype=None, action=action, status=200, ctx=ctx, entities=[resource_entity(what)],
                        recorded=now, address=address, event_type=SECURITY_ALERT, description=mask_text(description))
    event["subtype"] = [SOFTWARE_CONFIGURATION]
    queue_records(conn, now, [event])


def _queue_insert(first: int) -> str:
    """PostgreSQL: queue records in one statement (${first}: queued_at, ${first + 1}: a JSON
    array of resources)."""
    return (f"INSERT INTO {QUEUE.name} (queued_at, resource) "
            f"SELECT ${first}, r FROM jsonb_array_elements(${first + 1}::jsonb) AS r")


#: The queue INSERT as a prepared statement of its own ...
_QUEUE_SQL = _queue_insert(1)
#: ... and remove a drained batch with one array parameter.
_DELETE_QUEUED_SQL = f"DELETE FROM {QUEUE.name} WHERE seq = ANY($1::bigint[])"


@functools.cache
def _queue_ctes(prefix: str, first: int) -> tuple[str, ...]:
    """The queue INSERT as a CTE, to travel with the transaction's held writes (``db.hold``)."""
    return (f"{prefix}q AS ({_queue_insert(first)})",)


def queue_records(conn: sa.Connection, queued_at: datetime, records: list[dict[str, Any]]) -> None:
    """Append AuditEvents / Provenances to the queue in ``conn``'s transaction, in order."""
    if not records:
        return
    if is_postgres(conn):
        params = (queued_at, orjson.dumps(records).decode())
        if not hold(conn, _queue_ctes, params):
            execute_prepared(conn, _QUEUE_SQL, params)
    else:
        conn.execute(QUEUE.insert(), [{"queued_at": queued_at, "resource": record} for record in records])


def _version_after(event: WriteEvent) -> int:
    meta = (event.resource or {}).get("meta") or {}
    if event.resource is not None and str(meta.get("versionId", "")).isdigit():
        return int(meta["versionId"])
    found = event.tx.current_version(event.resource_type, event.resource_id)
    return found[0] if found else 1


def refuse_changes(event: WriteEvent) -> None:
    """Before-write hook on AuditEvent and Provenance: nobody updates or deletes them, not even
    internal callers (retention purges old AuditEvents outside the store, see :func:`purge`)."""
    if event.method != "POST":
        raise Forbidden(f"{event.resource_type} records cannot be changed or deleted")


# -- the durable queue ----------------------------------------------------------------------------

class AuditQueue:
    """Appends audit records durably (group commit) and drains them into resources."""

    def __init__(self, engine: Engine, store: ResourceStore, *, drain_interval_ms: int = 1000,
                 batch_size: int = 200) -> None:
        self.engine = engine
        self.store = store
        self.drain_interval = drain_interval_ms / 1000 if drain_interval_ms > 0 else None
        self.batch_size = batch_size
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yilian-audit-append")
        self._drainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yilian-audit-drain")
        self._loops: MutableMapping[asyncio.AbstractEventLoop, _LoopState] = {}
        self._lock = threading.Lock()

    # appending
    def append_now(self, events: list[dict[str, Any]]) -> None:
        """Write the events to the queue in one short transaction; durable when this returns."""
        if not events:
            return
        with write_transaction(self.engine) as conn:
            queue_records(conn, datetime.now(UTC), events)

    async def append(self, event: dict[str, Any]) -> None:
        """Durable when this returns. Requests that finish while a flush is running share the
        next one (group commit), so the cost per request falls as the load rises."""
        loop = asyncio.get_running_loop()
        state = self._state(loop)
        done = loop.create_future()
        state.pending.append((event, done))
        if state.flusher is None or state.flusher.done():
            state.flusher = loop.create_task(self._flush(loop, state))
        await done

    def _state(self, loop: asyncio.AbstractEventLoop) -> "_LoopState":
        with self._lock:
            state = self._loops.get(loop)
            if state is None:
                for old in [key for key in self._loops if key.is_closed()]:
                    del self._loops[old]
                state = self._loops[loop] = _LoopState()
            return state

    async def _flush(self, loop: asyncio.AbstractEventLoop, state: "_LoopState") -> None:
        while state.pending:
            batch, state.pending = state.pending, []
            try:
                await loop.run_in_executor(self._writer, self.append_now, [e for e, _ in batch])
            except Exception as exc:  # the requests fail closed: nothing unaudited leaves
                log.exception("audit queue append failed for %d events", len(batch))
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
        self._schedule_drain(loop, state)

    # draining
    def queued_elsewhere(self) -> None:
        """Records were queued by a write's own transaction: make sure a drain follows."""
        loop = asyncio.get_running_loop()
        self._schedule_drain(loop, self._state(loop))

    def _schedule_drain(self, loop: asyncio.AbstractEventLoop, state: "_LoopState") -> None:
        if self.drain_interval is None or state.drain_scheduled:
            return
        state.drain_scheduled = True

        def start() -> None:
            state.drain_scheduled = False
            self._drainer.submit(self._drain_logged)

        loop.call_later(self.drain_interval, start)

    def _drain_logged(self) -> None:
        try:
            self.drain()
        except Exception:  # retried at the next schedule; the rows stay queued
            log.exception("audit queue drain failed")

    def drain(self, *, max_batches: int | None = None) -> int:
        """Turn queued records into resources; returns how many (see :func:`drain`). Rows another
        worker's drain holds are left to it: background drains never wait for each other."""
        return drain(self.store, batch_size=self.batch_size, max_batches=max_batches, skip_locked=True)

    async def settled(self) -> None:
        """Wait until every drain scheduled so far has run (shutdown, tests)."""
        loop = asyncio.get_running_loop()
        state = self._state(loop)
        while state.drain_scheduled or (state.flusher is not None and not state.flusher.done()):
            await asyncio.sleep(0.01)
        await loop.run_in_executor(self._drainer, lambda: None)  # after the drains submitted before it

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._drainer.shutdown(wait=True)


@dataclass
class _LoopState:
    pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    drain_scheduled: bool = False


@functools.cache
def _next_batch(postgres: bool, skip_locked: bool) -> sa.Select:
    """The oldest queued records, their JSON as text: parsed by orjson, a queued record costs a
    third of what the driver's JSONB decoding through SQLAlchemy's result processing cost."""
    query = (sa.select(QUEUE.c.seq, sa.cast(QUEUE.c.resource, sa.Text))
             .order_by(QUEUE.c.seq).limit(sa.bindparam("n")))
    return query.with_for_update(skip_locked=skip_locked) if postgres else query


def drain(store: ResourceStore, *, batch_size: int = 200, max_batches: int | None = None,
          skip_locked: bool = False) -> int:
    """Store queued AuditEvents and Provenances as resources, oldest first; returns how many.

    By default this waits for drains running elsewhere, so that when it returns everything
    queued before the call is stored (``yilian audit drain``, shutdown, tests). With
    ``skip_locked`` (PostgreSQL) it passes over rows another drain is storing instead; on
    SQLite a drain always waits for one running elsewhere (:func:`_sole_drainer`)."""
    total = 0
    batches = 0
    postgres = is_postgres(store.engine)
    with _sole_drainer(store.engine):
        while max_batches is None or batches < max_batches:
            if postgres:
                stored = _drain_postgres_batch(store, batch_size, skip_locked)
            else:
                stored = _drain_sqlite_batch(store, batch_size)
            if stored is None:
                break
            total += stored
            batches += 1
    return total


@contextmanager
def _sole_drainer(engine: Engine) -> Iterator[None]:
    """SQLite: one drain at a time, across processes (a file lock beside the database). A
    drain there indexes its batch before it takes the write lock (:func:`prepare_sqlite_batch`),
    and the workers' drains, scheduled alike, would index the same records and all but one
    throw the work away. A drain waits for the one running (in its own thread) and then
    stores what is left, so nothing queued meanwhile waits for the next request's drain.
    PostgreSQL drains lock their rows instead."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if fcntl is None or not path or path == ":memory:":
        yield
        return
    with open(f"{path}.drain-lock", "ab") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


_DRAINER = AccessContext.internal("audit-drain")


def _drain_postgres_batch(store: ResourceStore, batch_size: int, skip_locked: bool) -> int | None:
    """One batch in one transaction: the rows locked, stored, deleted. None: the queue is empty."""
    with store.write(_DRAINER) as tx:
        # A pooled connection plans a prepared statement five times before it settles on a
        # generic plan, and the drain rarely gets the same connection five times: each
        # batch's create was planned anew (~6 ms, with 200 records as constants).
        tx.conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        rows = tx.conn.execute(_next_batch(True, skip_locked), {"n": batch_size}).all()
        if not rows:
            return None
        tx.create_many([(orjson.loads(record), new_id()) for _, record in rows])
        # one array parameter, not 200 placeholders to convert
        execute_prepared(tx.conn, _DELETE_QUEUED_SQL, ([seq for seq, _ in rows],))
    return len(rows)


@dataclass
class PreparedBatch:
    """Queued records read and indexed outside any write transaction (SQLite)."""

    seqs: list[int]
    items: list[tuple[dict[str, Any], str]]  # (resource, id)
    indexed: list[IndexRows]


def prepare_sqlite_batch(store: ResourceStore, batch_size: int) -> PreparedBatch | None:
    """SQLite has one write lock for the whole database, and every request's audit record
    waits for it before the response leaves: the oldest queued records are read and indexed
    (the Python work of a drain) before the lock is taken. None: the queue is empty."""
    with store.read_only(_DRAINER) as tx:
        rows = tx.conn.execute(_next_batch(False, False), {"n": batch_size}).all()
    if not rows:
        return None
    resources = [orjson.loads(record) for _, record in rows]
    return PreparedBatch([seq for seq, _ in rows], [(resource, new_id()) for resource in resources],
                         [index_resource(resource) for resource in resources])


def store_sqlite_batch(store: ResourceStore, batch: PreparedBatch) -> int:
    """Store what is still queued of a prepared batch (another process's drain may have
    stored some of it meanwhile) and delete it from the queue, in one write transaction."""
    with store.write(_DRAINER) as tx:
        queued = set(tx.conn.execute(sa.select(QUEUE.c.seq).where(QUEUE.c.seq.in_(batch.seqs))).scalars())
        if not queued:
            return 0
        keep = [n for n, seq in enumerate(batch.seqs) if seq in queued]
        tx.create_many([batch.items[n] for n in keep], indexed=[batch.indexed[n] for n in keep])
        tx.conn.execute(QUEUE.delete().where(QUEUE.c.seq.in_(sorted(queued))))
    return len(keep)


def _drain_sqlite_batch(store: ResourceStore, batch_size: int) -> int | None:
    batch = prepare_sqlite_batch(store, batch_size)
    return None if batch is None else store_sqlite_batch(store, batch)


def record_login(queue: AuditQueue, ctx_or_user: AccessContext | str | None, outcome: bool | int | str, *,
                 client_id: str | None = None, address: str | None = None, detail: str | None = None) -> None:
    """Record a login or token grant attempt in ``queue`` (the app's ``state.audit_queue``):
    ``outcome`` True / "success" / 0 for a successful authentication, anything else a failure.
    Durable when it returns (a short transaction of its own: call it from a worker thread)."""
    if isinstance(ctx_or_user, AccessContext):
        ctx: AccessContext | None = ctx_or_user
    else:
        ctx = AccessContext(client_id=client_id, user=ctx_or_user) if (ctx_or_user or client_id) else None
    # bool first: False == 0 would otherwise count a refused login as a success
    succeeded = outcome if isinstance(outcome, bool) else outcome in (0, "0", "success", "ok")
    event = audit_event(subtype="login", action="E", status=200 if succeeded else 401, ctx=ctx, entities=[],
                        recorded=datetime.now(UTC), address=address, event_type=USER_AUTHENTICATION,
                        description=mask_text(detail) if detail else None)
    queue.append_now([event])


# -- retention --------------------------------------------------------------------------------------

def purge(engine: Engine, *, days: int, now: datetime | None = None, chunk: int = 1000) -> int:
    """Delete AuditEvents recorded more than ``days`` days ago (retention, MLPS level 3: at
    least 180). Rows go directly — versions, pointer and index rows — since the store refuses
    to change audit records. Records its own AuditEvent (Audit Log Used). Returns how many."""
    if days < 1:
        raise ValueError("the retention must be at least one day")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    resource = tables.ResourceRow.__table__
    version = tables.ResourceVersion.__table__
    removed = 0
    while True:
        with write_transaction(engine) as conn:
            ids = list(conn.execute(sa.select(resource.c.id).where(
                resource.c.resource_type == "AuditEvent", resource.c.last_updated < cutoff).limit(chunk)).scalars())
            if not ids:
                break
            for index in tables.INDEX_TABLES:
                table = index.__table__  # type: ignore[attr-defined]
                conn.execute(table.delete().where(table.c.resource_type == "AuditEvent",
                                                  table.c.resource_id.in_(ids)))
            conn.execute(version.delete().where(version.c.resource_type == "AuditEvent", version.c.id.in_(ids)))
            conn.execute(resource.delete().where(resource.c.resource_type == "AuditEvent", resource.c.id.in_(ids)))
        removed += len(ids)
    note = audit_event(subtype=None, action="D", status=200, ctx=AccessContext.internal("audit-purge"),
                       entities=[query_entity(f"AuditEvent?_lastUpdated=lt{fhir_instant(cutoff)}")],
                       recorded=now or datetime.now(UTC), event_type=AUDIT_LOG_USED,
                       description=f"retention purge: {removed} AuditEvents older than {days} days removed")
    with write_transaction(engine) as conn:
        queue_records(conn, datetime.now(UTC), [note])
    return removed


# -- the API boundary: masking and audit of what leaves ---------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class PrivacyMiddleware:
    """For every FHIR request: mask resident IDs in the response unless the caller may see
    them, and make sure the request is audited before the response leaves (durably queued,
    unless a write hook already recorded it inside the write's transaction)."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, queue: AuditQueue, policy: Any,
                 prefix: str = "/fhir") -> None:
        self.app = app
        self.queue = queue
        self.policy = policy
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        record = RequestAudit(method=scope["method"], path=scope["path"],
                              query=(scope.get("query_string") or b"").decode("latin-1"),
                              address=client[0] if client else None)
        state = scope.setdefault("state", {})  # request.state: access_context() leaves the caller there
        token = _CURRENT.set(record)
        keep_body = record.method == "POST" and scope["path"].rstrip("/") == self.prefix

        async def receive_and_keep() -> MutableMapping[str, Any]:
            message = await receive()
            if keep_body and message.get("type") == "http.request":
                record.request_body.extend(message.get("body", b""))
            return message

        start: MutableMapping[str, Any] | None = None
        chunks: list[bytes] = []

        async def hold(message: MutableMapping[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            assert start is not None
            body = b"".join(chunks)
            body = self._mask(record, body)
            try:
                await self._audit(scope, record, start["status"], body)
            except Exception:  # fail closed: nothing leaves that is not on record
                log.exception("the audit record of %s %s could not be queued", record.method, record.path)
                start = {"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/fhir+json; charset=utf-8"), (b"retry-after", b"1")]}
                body = orjson.dumps(operation_outcome([Issue(
                    "error", "transient", "the access could not be recorded in the audit trail; try again")]))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        async def hold_with_context(message: MutableMapping[str, Any]) -> None:
            if record.ctx is None and isinstance(state.get("access_context"), AccessContext):
                record.ctx = state["access_context"]
            await hold(message)

        try:
            await self.app(scope, receive_and_keep, hold_with_context)
        except Exception:
            if isinstance(state.get("access_context"), AccessContext):
                record.ctx = state["access_context"]
            try:
                await self._audit(scope, record, 500, b"")
            except Exception:
                log.exception("the audit record of a failed %s %s could not be queued", record.method, record.path)
            raise
        finally:
            _CURRENT.reset(token)

    def _mask(self, record: RequestAudit, body: bytes) -> bytes:
        ctx = record.ctx
        unrestricted = ctx is not None and self.policy.rules_for(ctx) is None
        if may_see_resident_ids(ctx, unrestricted=unrestricted):
            return body
        return mask_body(body)

    async def _audit(self, scope: Scope, record: RequestAudit, status: int, body: bytes) -> None:
        route = scope.get("route")
        handler = getattr(getattr(route, "endpoint", None), "__name__", None)
        if handler is None or handler in UNAUDITED_HANDLERS:
            return
        if handler not in HANDLERS and "/$" not in scope["path"]:
            return  # not a FHIR interaction (SMART discovery ...)
        if status < 400 and record.written_in_transaction and handler != "batch_or_transaction":
            self.queue.queued_elsewhere()  # the write's own transaction queued its AuditEvent
            return
        event = build_request_event(scope, record, handler, status, body)
        await self.queue.append(event)


def build_request_event(scope: Scope, record: RequestAudit, handler: str, status: int, body: bytes) -> dict[str, Any]:
    params = scope.get("path_params") or {}
    resource_type, resource_id = params.get("resource_type"), params.get("resource_id")
    interaction = HANDLERS.get(handler, "operation")
    entities: list[dict[str, Any]] = []
    query = mask_text(unquote_plus(record.query))
    if interaction == "transaction":
        kind, entities = _bundle_entities(bytes(record.request_body))
        interaction = kind
    elif resource_type and resource_id:
        reference = f"{resource_type}/{resource_id}"
        if params.get("version_id"):
            reference += f"/_history/{params['version_id']}"
        entities.append(resource_entity(reference))
        if interaction in ("read", "vread") and status < 300 and resource_type != "Patient":
            entities += [patient_entity(p) for p in _patients_in(body)]
    elif resource_type:
        if interaction == "create" and status < 300:
            location = _created_reference(body)
            entities.append(resource_entity(location) if location else query_entity(resource_type))
        else:
            entities.append(query_entity(f"{resource_type}?{query}" if query else resource_type))
    elif query:
        entities.append(query_entity(f"?{query}"))
    return audit_event(subtype=interaction, action=ACTIONS.get(interaction, "E"), status=status, ctx=record.ctx,
                       entities=entities, recorded=datetime.now(UTC), address=record.address)


def _created_reference(body: bytes) -> str | None:
    try:
        resource = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    if isinstance(resource, dict) and resource.get("id") and resource.get("resourceType"):
        return f"{resource['resourceType']}/{resource['id']}"
    return None


def _patients_in(body: bytes) -> list[str]:
    try:
        resource = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    return _patients_of(resource) if isinstance(resource, dict) else []


def _bundle_entities(body: bytes, limit: int = 1000) -> tuple[str, list[dict[str, Any]]]:
    try:
        bundle = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return "transaction", []
    kind = "batch" if isinstance(bundle, dict) and bundle.get("type") == "batch" else "transaction"
    entities = []
    for entry in (bundle.get("entry") or [])[:limit] if isinstance(bundle, dict) else []:
        request = entry.get("request") if isinstance(entry, dict) else None
        if isinstance(request, dict) and request.get("url"):
            entities.append(query_entity(f"{request.get('method', '')} {request['url']}"))
    return kind, entities


def install(app: Any, hooks: WriteHooks, *, policy: Any, settings: Any) -> AuditQueue:
    """Register the write hooks, the queue, the context dependency and the middleware."""
    hooks.before("AuditEvent", refuse_changes, pure=True)
    hooks.before("Provenance", refuse_changes, pure=True)
    hooks.after(ANY_TYPE, record_write)
    queue = AuditQueue(app.state.engine, app.state.store, drain_interval_ms=settings.audit_drain_interval_ms)
    app.state.audit_queue = queue
    app.add_middleware(PrivacyMiddleware, queue=queue, policy=policy)
    return queue


__all__ = ["AuditQueue", "PrivacyMiddleware", "audit_event", "drain", "provenance", "purge", "record_login",
           "record_write"]
