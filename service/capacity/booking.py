"""Finding, holding, booking and cancelling capacity (R22, R24, R32), after IHE ITI Scheduling /
Argonaut Scheduling: ``Appointment/$find`` proposes, ``$hold`` → ``pending`` (Slot
``busy-tentative``) for ``hold_ttl``, ``$book`` → ``booked`` (Slot ``busy``), ``$cancel`` (or a
PUT/PATCH to ``cancelled``) frees the slot again.

Every path that writes an Appointment — these operations, a plain POST/PUT/PATCH, a Bundle —
goes through :func:`appointment_before`, the one place where capacity is claimed and freed:

* a claim is ONE conditional ``UPDATE capacity_slot SET status=… WHERE ref=:ref AND
  status='free' AND pool=:pool RETURNING ref``; no row back means someone else got it first →
  409. Two workers, two databases connections, no in-process lock: the database decides, and
  bookings of different slots never wait for each other;
* the reserved pool is for a caller acting for a grassroots institution of the slot's alliance,
  booking for a patient with an active upward referral (R22); everyone else books the general
  pool only (403 on a reserved slot);
* lock order is always the Slot (or bed) resource row, then its capacity row.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import sqlalchemy as sa

from service.capacity import _orgs
from service.capacity._fhir import (
    GENERAL,
    KIND_SYSTEM,
    KINDS,
    REFERRAL_DIRECTION_SYSTEM,
    RESERVED,
    china_day,
    codes_of,
    fhir_instant,
    kind_concept,
    parse_instant,
    ref_of,
    set_pool_tag,
    split_ref,
    utc,
)
from service.capacity.policy import default_policy, effective_policy, scopes_for
from service.capacity.pools import (
    BUSY,
    FREE,
    HELD,
    LockedUnit,
    Row,
    freed_values,
    locked_unit,
    record,
    sync_resource,
)
from service.capacity.tables import EVENTS, SLOTS
from service.fhir.access import AccessContext
from service.fhir.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Unprocessable,
)
from service.fhir.hooks import WriteEvent
from service.fhir.statements import Prepared
from service.fhir.store import (
    CurrentState,
    ResourceStore,
    StoredResource,
    StoreTransaction,
    check_valid,
)

#: Callers identified by an operation, for the Appointment hook of the same transaction.
_CALLERS: weakref.WeakKeyDictionary[StoreTransaction, Caller] = weakref.WeakKeyDictionary()
_UNITS: weakref.WeakKeyDictionary[StoreTransaction, set[str]] = weakref.WeakKeyDictionary()
#: Units an operation read and locked in this transaction, for the claim of the same unit.
_LOCKED: weakref.WeakKeyDictionary[StoreTransaction, dict[str, LockedUnit]] = weakref.WeakKeyDictionary()

HOLDING = {"pending"}
BOOKED = {"booked", "arrived", "checked-in", "fulfilled"}
FREEING = {"cancelled", "entered-in-error"}
MAX_PROPOSALS = 100


# -- who is asking (R22) ---------------------------------------------------------------------

@dataclass
class Caller:
    ctx: AccessContext
    organization: str | None = None
    alliance: str | None = None
    grassroots: bool = False
    patient: str | None = None
    referral: str | None = None  # a verified active upward referral of the patient

    def may_use_reserved(self, alliance: str | None) -> bool:
        """R22: reserved capacity is for grassroots institutions / family doctors of the same
        alliance, booking for a patient referred up (R32)."""
        if self.ctx.system:
            return True
        return self.grassroots and self.referral is not None and alliance is not None and alliance == self.alliance

    @property
    def booked_by(self) -> str:
        if self.ctx.system:
            return "system"
        return (self.organization or "public") if self.grassroots else "public"


def identify_caller(tx: StoreTransaction, ctx: AccessContext, *, patient: str | None,
                    referrals: list[str] = (), strict: bool = False) -> Caller:  # type: ignore[assignment]
    organization = ctx.organization
    # the caller's organization with its partOf chain, and the referrals, in one round trip
    tx.prefetch([organization or ctx.practitioner, *referrals], follow="partof")
    if not organization and ctx.practitioner and ctx.practitioner.startswith("PractitionerRole/"):
        organization = ref_of((_orgs.content(tx, ctx.practitioner) or {}).get("organization"))
    chain = _orgs.org_chain(tx, organization)
    caller = Caller(ctx, organization, _orgs.alliance_in(chain), _orgs.is_grassroots(chain), patient)
    if patient and (caller.grassroots or (strict and referrals)):
        caller.referral = upward_referral(tx, patient, list(referrals), strict=strict)
    return caller


def upward_referral(tx: StoreTransaction, patient: str, candidates: list[str], *, strict: bool) -> str | None:
    """An active ServiceRequest of category ``up`` (referral-direction) for the patient: one of
    ``candidates`` (the Appointment's basedOn / the ``referral`` parameter), else any."""
    for reference in candidates:
        if not reference.startswith("ServiceRequest/"):
            continue
        request = _orgs.content(tx, reference)
        if request and request.get("status") == "active" and ref_of(request.get("subject")) == patient \
                and "up" in codes_of(request.get("category"), REFERRAL_DIRECTION_SYSTEM):
            return reference
        if strict:
            raise Unprocessable(f"{reference} is not an active upward referral (category up) of {patient} (R22)",
                                expression="referral")
    if strict and candidates:
        return None
    found = tx.find("ServiceRequest", f"subject={patient}&status=active&direction={REFERRAL_DIRECTION_SYSTEM}|up",
                    limit=1)
    return f"ServiceRequest/{found[0]}" if found else None


def _is_owner(ctx: AccessContext, row: Any) -> bool:
    return ctx.system or (ctx.organization is not None and ctx.organization in (row.organization, row.department))


# -- the Appointment hook: claims and releases -------------------------------------------------

def _unit_candidates(appointment: dict[str, Any] | None) -> list[str]:
    if not appointment:
        return []
    refs = [ref_of(s) for s in appointment.get("slot", [])]
    refs += [ref_of(p.get("actor")) for p in appointment.get("participant", []) if isinstance(p, dict)]
    return sorted({r for r in refs if r and (r.startswith("Slot/") or r.startswith("Location/"))})


def _units(tx: StoreTransaction, appointment: dict[str, Any] | None) -> set[str]:
    candidates = _unit_candidates(appointment)
    if not candidates:
        return set()
    if set(candidates) == _UNITS.get(tx):  # the operation that built the appointment looked it up
        return set(candidates)
    return set(tx.conn.execute(sa.select(SLOTS.c.ref).where(SLOTS.c.ref.in_(candidates))).scalars())


def _patient_of(appointment: dict[str, Any]) -> str | None:
    for participant in appointment.get("participant", []):
        reference = ref_of(participant.get("actor")) if isinstance(participant, dict) else None
        if reference and reference.startswith("Patient/"):
            return reference
    return None


def appointment_before(event: WriteEvent) -> None:
    """Claim or free the capacity an Appointment names, in the Appointment's own transaction."""
    new, old = event.resource, event.previous
    units_new, units_old = _units(event.tx, new), _units(event.tx, old)
    if not units_new and not units_old:
        return
    tx, appointment_id = event.tx, event.resource_id
    new_status = (new or {}).get("status")
    old_status = (old or {}).get("status")
    if new is None or new_status in FREEING:
        for ref in sorted(units_old | units_new):
            free(tx, ref, appointment_id, event="cancelled")
        return
    if old_status in FREEING:
        raise Conflict(f"Appointment/{appointment_id} is {old_status}; find and book capacity again")
    for ref in sorted(units_old - units_new):
        free(tx, ref, appointment_id, event="cancelled")
    if new_status not in HOLDING | BOOKED:
        return  # proposed, waitlist, noshow: nothing to claim (a no-show keeps its slot busy)
    want = HELD if new_status in HOLDING else BUSY
    caller: list[Caller] = []

    def who() -> Caller:
        if not caller:
            patient = _patient_of(new)
            known = _CALLERS.get(tx)  # identified by the operation in this transaction already
            if known is not None and known.ctx == event.ctx and known.patient == patient:
                caller.append(known)
            else:
                referrals = [r for r in (ref_of(b) for b in new.get("basedOn", [])) if r]
                caller.append(identify_caller(tx, event.ctx, patient=patient, referrals=referrals))
        return caller[0]

    pools = [claim(tx, ref, appointment_id, want, who) for ref in sorted(units_new)]
    set_pool_tag(new, RESERVED if RESERVED in pools else GENERAL)


def claim(tx: StoreTransaction, ref: str, appointment_id: str, want: str, who: Any) -> str:
    """Take one unit for the appointment (``held`` or ``busy``); returns the pool it came from."""
    now = tx.clock()
    unit = _LOCKED.get(tx, {}).pop(ref, None) or locked_unit(tx, ref)
    if unit is None:
        raise NotFound(f"{ref} does not exist")
    row, state = unit
    if row.appointment_id == appointment_id:
        return _promote(tx, row, appointment_id, want, now, state)
    if row.status == BUSY and row.appointment_id is None and _is_owner(tx.ctx, row):
        # the hospital records an appointment for a slot it booked at its own counter
        tx.conn.execute(SLOTS.update().where(SLOTS.c.ref == ref, SLOTS.c.status == BUSY,
                                             SLOTS.c.appointment_id.is_(None))
                        .values(appointment_id=appointment_id, version=SLOTS.c.version + 1, updated_at=now))
        return row.pool
    if row.status != FREE:
        raise Conflict(f"{ref} is no longer free: another booking got it first; find another slot")
    if row.start is not None and row.start <= now:
        raise Conflict(f"{ref} started at {fhir_instant(row.start)}; it cannot be booked any more")
    if row.opens_at is not None and now < row.opens_at:
        raise Conflict(f"{ref} opens for booking at {fhir_instant(row.opens_at)} (booking_window, R32)")
    caller: Caller = who()
    if row.pool == RESERVED and not caller.may_use_reserved(row.alliance):
        raise Forbidden(f"{ref} is reserved for family doctors and grassroots institutions of its alliance booking "
                        "for a patient with an active upward referral (R22); book a general slot instead")
    held_until = None
    if want == HELD:
        policy = effective_policy(tx.conn, scopes_for(row.alliance, row.organization, row.department))
        held_until = now + policy.hold_ttl
    event = "held" if want == HELD else "booked"
    values = {"c_ref": ref, "c_pool": row.pool, "c_status": want, "c_appointment": appointment_id,
              "c_held_until": held_until, "c_booked_by": caller.booked_by, "c_now": now}
    if tx.conn.dialect.name == "postgresql":  # the claim and its event in one round trip
        taken = _CLAIM_AND_RECORD.first(tx.conn, {**values, "e_event": event, "e_organization": row.organization,
                                                  "e_department": row.department, "e_day": row.day or china_day(now)})
    else:
        taken = _CLAIM.first(tx.conn, values)
        if taken is not None:
            record(tx, ref, event, pool=row.pool, row=row, appointment_id=appointment_id, actor=caller.booked_by,
                   day=row.day or china_day(now))
    if taken is None:
        raise Conflict(f"{ref} was just taken by another booking; find another slot")
    sync_resource(tx, ref, pool=row.pool, status=want, known=state)
    return row.pool


# The claim itself, built once and prepared (constructing and executing the statement through
# SQLAlchemy cost more than running it): the row changes only while it is still free in the
# pool the caller was allowed to book from.
_CLAIM_UPDATE = (SLOTS.update()
                 .where(SLOTS.c.ref == sa.bindparam("c_ref"), SLOTS.c.status == FREE,
                        SLOTS.c.pool == sa.bindparam("c_pool"))
                 .values(status=sa.bindparam("c_status"), appointment_id=sa.bindparam("c_appointment"),
                         held_until=sa.bindparam("c_held_until"), booked_pool=sa.bindparam("c_pool"),
                         booked_by=sa.bindparam("c_booked_by"), version=SLOTS.c.version + 1,
                         updated_at=sa.bindparam("c_now"))
                 .returning(SLOTS.c.ref))
_CLAIM = Prepared(_CLAIM_UPDATE)


def _claim_and_record() -> sa.Insert:
    """PostgreSQL: the claim as a data-modifying CTE, and the capacity event inserted from its
    result (no row claimed, no event): the same effect as ``_CLAIM`` then ``record``."""
    claimed = _CLAIM_UPDATE.cte("claimed")
    event_columns = {"event": "e_event", "at": "c_now", "pool": "c_pool", "appointment_id": "c_appointment",
                     "actor": "c_booked_by", "organization": "e_organization", "department": "e_department",
                     "day": "e_day"}
    values = [sa.bindparam(name, type_=EVENTS.c[column].type) for column, name in event_columns.items()]
    return (EVENTS.insert()
            .from_select(["ref", *event_columns], sa.select(claimed.c.ref, *values))
            .returning(EVENTS.c.ref))


_CLAIM_AND_RECORD = Prepared(_claim_and_record())


def _promote(tx: StoreTransaction, row: Row, appointment_id: str, want: str, now: datetime,
             state: CurrentState | None) -> str:
    booked_pool = row.booked_pool or row.pool
    if row.status == want or (row.status == BUSY and want == HELD):
        return booked_pool
    done = tx.conn.execute(
        SLOTS.update()
        .where(SLOTS.c.ref == row.ref, SLOTS.c.appointment_id == appointment_id, SLOTS.c.status == HELD,
               SLOTS.c.held_until > now)
        .values(status=BUSY, held_until=None, version=SLOTS.c.version + 1, updated_at=now)
        .returning(SLOTS.c.ref)
    ).first()
    if done is None:
        raise Conflict(f"the hold of Appointment/{appointment_id} on {row.ref} has expired; find another slot")
    record(tx, row.ref, "booked", pool=booked_pool, row=row, appointment_id=appointment_id,
           day=row.day or china_day(now))
    sync_resource(tx, row.ref, pool=row.pool, status=BUSY, known=state)
    return booked_pool


def free(tx: StoreTransaction, ref: str, appointment_id: str, *, event: str) -> bool:
    """Give the unit back: into the pool it came from unless its release time passed (R23)."""
    unit = locked_unit(tx, ref)
    if unit is None:
        return False
    row, state = unit
    if row.appointment_id != appointment_id or row.status not in (HELD, BUSY):
        return False
    values = freed_values(tx, row)
    done = tx.conn.execute(
        SLOTS.update()
        .where(SLOTS.c.ref == ref, SLOTS.c.appointment_id == appointment_id, SLOTS.c.status.in_((HELD, BUSY)))
        .values(**values, version=SLOTS.c.version + 1, updated_at=tx.clock())
        .returning(SLOTS.c.ref)
    ).first()
    if done is None:
        return False
    record(tx, ref, event, pool=values["pool"], row=row, appointment_id=appointment_id)
    if values["pool"] == GENERAL and row.assigned_pool == RESERVED and row.released_at is None and row.kind == "slot":
        record(tx, ref, "released", pool=GENERAL, row=row)
    sync_resource(tx, ref, pool=values["pool"], status=FREE, known=state)
    return True


# -- $find ---------------------------------------------------------------------------------------

@dataclass
class FindRequest:
    patient: str | None = None
    referral: str | None = None
    specialty: str | None = None
    service_type: str | None = None
    organization: str | None = None
    kind: str | None = None  # capacity-kind: specialist | outpatient | exam | inpatient
    start: datetime | None = None
    end: datetime | None = None
    count: int = 20

    @classmethod
    def from_parameters(cls, params: Params) -> FindRequest:
        kind = params.token("service-category")
        if kind is not None:
            kind = kind.rsplit("|", 1)[-1]
            if kind not in KINDS:
                raise BadRequest(f"service-category {kind!r} is not one of {', '.join(KINDS)} ({KIND_SYSTEM})",
                                 expression="service-category")
        count = params.string("_count")
        if count is not None and not count.isdigit():
            raise BadRequest(f"_count={count} is not a whole number", expression="_count")
        return cls(patient=params.reference("patient"), referral=params.reference("referral"),
                   specialty=params.token("specialty"), service_type=params.token("service-type"),
                   organization=params.reference("organization"), kind=kind,
                   start=params.instant("start"), end=params.instant("end"),
                   count=max(1, min(int(count or 20), MAX_PROPOSALS)))


def find(store: ResourceStore, ctx: AccessContext, request: FindRequest, *, base_url: str) -> dict[str, Any]:
    """Proposed Appointments over free capacity the caller may use, reserved first (R22, R24)."""
    with store.read_only(ctx) as tx:
        tx.authorize("search", "Slot")
        caller = identify_caller(tx, ctx, patient=request.patient,
                                 referrals=[request.referral] if request.referral else [], strict=True)
        now = tx.clock()
        beds = request.kind == "inpatient"
        if beds and request.start is None:
            raise BadRequest("$find for beds (service-category inpatient) needs start: the admission date",
                             expression="start")
        start = request.start or now
        end = request.end or (start + default_policy().booking_window)
        query = sa.select(SLOTS).where(SLOTS.c.status == FREE, SLOTS.c.kind == ("bed" if beds else "slot"))
        if not beds:
            query = query.where(SLOTS.c.start >= max(start, now), SLOTS.c.start < end,
                                sa.or_(SLOTS.c.opens_at.is_(None), SLOTS.c.opens_at <= now))
            if request.kind:
                query = query.where(SLOTS.c.service_kind == request.kind)
        if request.organization:
            org = request.organization
            query = query.where(sa.or_(SLOTS.c.organization == org, SLOTS.c.department == org,
                                       SLOTS.c.alliance == org))
        for column, wanted in ((SLOTS.c.specialty, request.specialty), (SLOTS.c.service_type, request.service_type)):
            if wanted:
                query = query.where(column == wanted if "|" in wanted else column.like(f"%|{_like(wanted)}", escape="\\"))
        if caller.ctx.system:
            reserved_ok = sa.true()
        elif caller.grassroots and caller.referral and caller.alliance:
            reserved_ok = SLOTS.c.alliance == caller.alliance
        else:
            reserved_ok = sa.false()
        query = query.where(sa.or_(SLOTS.c.pool == GENERAL, sa.and_(SLOTS.c.pool == RESERVED, reserved_ok)))
        reserved_first = sa.case((SLOTS.c.pool == RESERVED, 0), else_=1)
        query = query.order_by(reserved_first, SLOTS.c.start, SLOTS.c.ref).limit(request.count)
        rows = tx.conn.execute(query).mappings().all()
        schedules: dict[str, dict[str, Any] | None] = {}
        entries = []
        for row in rows:
            if row["kind"] == "slot" and row["group_ref"] not in schedules:
                schedules[row["group_ref"]] = _orgs.content(tx, row["group_ref"])
            unit = _orgs.content(tx, row["ref"]) or {}
            appointment = proposal(row, unit, schedules.get(row["group_ref"]), caller,
                                   start=request.start, end=request.end)
            entries.append({"fullUrl": f"urn:uuid:{uuid4()}", "resource": appointment, "search": {"mode": "match"}})
    return {"resourceType": "Bundle", "id": uuid4().hex, "type": "searchset", "total": len(entries),
            "link": [{"relation": "self", "url": f"{base_url}/Appointment/$find"}], "entry": entries}


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def proposal(row: Any, unit: dict[str, Any], schedule: dict[str, Any] | None, caller: Caller, *,
             start: datetime | None = None, end: datetime | None = None, status: str = "proposed") -> dict[str, Any]:
    """An Appointment for one unit: what $find proposes, and what $hold / $book create."""
    participants: list[dict[str, Any]] = []
    if caller.patient:
        participants.append({"actor": {"reference": caller.patient}, "required": "required", "status": "accepted"})
    appointment: dict[str, Any] = {"resourceType": "Appointment", "status": status,
                                   "serviceCategory": [kind_concept(row["service_kind"])]}
    if row["kind"] == "bed":
        if start is None:
            raise BadRequest("booking a bed needs start: the admission date", expression="start")
        begin = start
        appointment["start"] = fhir_instant(begin)
        appointment["end"] = fhir_instant(end or begin + timedelta(days=1))
        participants.append({"actor": {"reference": row["ref"], "display": unit.get("name", "")} if unit.get("name")
                             else {"reference": row["ref"]}, "required": "required", "status": "accepted"})
    else:
        for key in ("serviceType", "specialty", "appointmentType"):
            value = unit.get(key) or (schedule or {}).get(key)
            if value:
                appointment[key] = copy.deepcopy(value)
        appointment["start"] = unit.get("start") or fhir_instant(utc(row["start"]))
        appointment["end"] = unit.get("end") or fhir_instant(utc(row["end"]))
        appointment["slot"] = [{"reference": row["ref"]}]
        for actor in (schedule or {}).get("actor", []):
            participants.append({"actor": copy.deepcopy(actor), "required": "required", "status": "accepted"})
    if caller.referral:
        appointment["basedOn"] = [{"reference": caller.referral}]
    appointment["participant"] = participants or [{"actor": {"reference": row["ref"]}, "status": "needs-action"}]
    set_pool_tag(appointment, row["pool"])
    return appointment


# -- $hold, $book, $cancel -----------------------------------------------------------------------

class Params:
    """A FHIR Parameters resource (or query parameters) read by name."""

    def __init__(self, body: dict[str, Any] | None, query: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        self.values: dict[str, list[Any]] = {}
        for name, value in query:
            self.values.setdefault(name, []).append(value)
        if body is None:
            return
        if body.get("resourceType") != "Parameters":
            raise BadRequest("the operation takes a Parameters resource", expression="resourceType")
        for parameter in body.get("parameter", []):
            name = parameter.get("name") if isinstance(parameter, dict) else None
            if not name:
                raise BadRequest("every Parameters.parameter needs a name", expression="Parameters.parameter")
            value = parameter.get("resource")
            if value is None:
                value = next((v for k, v in parameter.items() if k.startswith("value")), None)
            self.values.setdefault(name, []).append(value)

    def get(self, name: str) -> Any:
        found = self.values.get(name)
        return found[0] if found else None

    def string(self, name: str) -> str | None:
        value = self.get(name)
        return None if value is None else str(value)

    def reference(self, name: str) -> str | None:
        value = self.get(name)
        if value is None:
            return None
        reference = ref_of(value)
        if reference is None:
            raise BadRequest(f"{name} must be a reference like Patient/123", expression=name)
        return reference

    def token(self, name: str) -> str | None:
        value = self.get(name)
        if isinstance(value, dict):  # valueCoding or valueCodeableConcept
            coding = (value.get("coding") or [value])[0]
            return f"{coding.get('system', '')}|{coding.get('code', '')}" if coding.get("system") else coding.get("code")
        return None if value is None else str(value)

    def instant(self, name: str) -> datetime | None:
        value = self.get(name)
        return None if value is None else parse_instant(value, name)

    def resource(self, name: str, resource_type: str) -> dict[str, Any] | None:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, dict) or value.get("resourceType") != resource_type:
            raise BadRequest(f"{name} must be a {resource_type} resource", expression=name)
        return copy.deepcopy(value)


def _new_appointment(tx: StoreTransaction, params: Params, status: str) -> dict[str, Any]:
    """The Appointment to create: the one given (e.g. from $find), or built from slot + patient."""
    given = params.resource("appointment", "Appointment")
    if given is not None:
        for key in ("id", "meta"):
            given.pop(key, None)
        given["status"] = status
        check_valid(given, expected_type="Appointment")
        return given
    unit = params.reference("slot") or params.reference("bed")
    patient = params.reference("patient")
    if unit is None or patient is None:
        raise BadRequest("give an appointment (from $find), or a slot (or bed) and a patient",
                         expression="Parameters.parameter")
    locked = locked_unit(tx, unit)  # locked now: the claim of this transaction takes it as read
    if locked is None:
        raise NotFound(f"{unit} is not published capacity")
    _LOCKED[tx] = {unit: locked}
    row = asdict(locked[0])  # proposal() reads a unit by column name, as $find's rows
    referral = params.reference("referral")
    # everything the appointment is built from, read together: the caller's organization and
    # its chain, the referral, the Schedule (or the bed and its ward)
    built_from = row["group_ref"] if row["kind"] == "slot" else unit
    tx.prefetch([tx.ctx.organization or tx.ctx.practitioner, referral, built_from], follow="partof")
    caller = identify_caller(tx, tx.ctx, patient=patient, referrals=[referral] if referral else [], strict=True)
    _CALLERS[tx] = caller  # the Appointment hook of this transaction need not identify the caller again
    _UNITS[tx] = {unit}
    schedule = _orgs.content(tx, row["group_ref"]) if row["kind"] == "slot" else None
    bed = _orgs.content(tx, unit) if row["kind"] == "bed" else None
    appointment = proposal(row, bed or {}, schedule, caller, start=params.instant("start"),
                           end=params.instant("end"), status=status)
    appointment["created"] = china_day(tx.clock()).isoformat()
    return appointment


def hold(store: ResourceStore, ctx: AccessContext, params: Params) -> StoredResource:
    """$hold: a ``pending`` Appointment; the slot is ``busy-tentative`` until hold_ttl (R32)."""
    with store.write(ctx) as tx:
        return tx.create(_new_appointment(tx, params, "pending")).resource


def book(store: ResourceStore, ctx: AccessContext, params: Params) -> StoredResource:
    """$book: book a held Appointment (``appointment-id``, or ``appointment`` with its id), or
    book directly (``appointment`` without id, or ``slot`` + ``patient`` [+ ``referral``])."""
    held = params.reference("appointment-id") if isinstance(params.get("appointment-id"), dict) else None
    if held is None and params.string("appointment-id"):
        text = params.string("appointment-id") or ""
        held = text if text.startswith("Appointment/") else f"Appointment/{text}"
    given = params.get("appointment")
    if held is None and isinstance(given, dict) and given.get("id"):
        held = f"Appointment/{given['id']}"
    with store.write(ctx) as tx:
        if held is None:
            return tx.create(_new_appointment(tx, params, "booked")).resource
        current = tx.read(*split_ref(held)).as_dict()
        if current.get("status") == "booked":
            return tx.read(*split_ref(held))
        if current.get("status") != "pending":
            raise Conflict(f"{held} is {current.get('status')}; only a pending (held) appointment can be booked")
        current["status"] = "booked"
        return tx.update("Appointment", current["id"], current, method="PUT").resource


def cancel(store: ResourceStore, ctx: AccessContext, appointment_id: str, reason: str | None) -> StoredResource:
    """$cancel: the Appointment becomes ``cancelled`` and its slot is free again."""
    with store.write(ctx) as tx:
        current = tx.read("Appointment", appointment_id).as_dict()
        if current.get("status") in FREEING:
            return tx.read("Appointment", appointment_id)
        current["status"] = "cancelled"
        current["cancelationReason"] = {"text": reason or "cancelled by the booker"}
        return tx.update("Appointment", appointment_id, current, method="PUT").resource


def unit_summary(conn: sa.Connection, ref: str) -> dict[str, Any] | None:
    row = conn.execute(sa.select(SLOTS).where(SLOTS.c.ref == ref)).mappings().first()
    if row is None:
        return None
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
