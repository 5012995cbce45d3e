"""Pool assignment: which published slots and beds are reserved for family doctors (R20, R21).

A HIS publishes Schedule + Slot resources (usually one transaction Bundle per day) and beds as
Location (``physicalType`` ``bd``, ``partOf`` the ward). The write hooks here keep one
``capacity_slot`` row per Slot / bed, in the same transaction as the resource, and decide
its pool so that **the reserved share holds per schedule per day** (beds: per ward):

* target = ``ceil(n × share)`` reserved out of the ``n`` open slots of the schedule-day, at
  least 1 whenever the share is above 0 (10 slots at 25 % → 3; 20 at 25 % → 5; 9 at 1/3 → 3);
* spread over the day: with the slots in time order, slot ``i`` (0-based) is reserved when
  ``ceil((i+1)·share) > ceil(i·share)`` — for 10 slots at 25 % the 1st, 5th and 9th. This rule
  depends only on ``i``: publishing a day in time order (one Bundle or several) never moves
  a slot already published; a slot inserted in between re-balances the free slots of the day
  (their Slot resources get a new version with the new tag);
* held, booked and released slots keep their pool; they count toward the target with the
  pool they were assigned.

The pool is visible as ``meta.tag`` (CodeSystem ``capacity-pool``: ``reserved`` / ``general``)
and searchable (``Slot?pool=reserved``, ``fhir_profiles/SearchParameter-capacity-pool.json``).
A HIS cannot set it: the tag is always rewritten to the row's pool.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime
from fractions import Fraction
from typing import Any

import orjson
import sqlalchemy as sa

from service.capacity import _orgs
from service.capacity._fhir import (
    BED_STATUS_SYSTEM,
    GENERAL,
    RESERVED,
    china_day,
    first_token,
    is_bed,
    parse_instant,
    pool_of,
    ref_of,
    set_pool_tag,
    split_ref,
    utc,
)
from service.capacity.policy import Policy, default_policy, effective_policy, scopes_for
from service.capacity.tables import EVENTS, SLOTS
from service.fhir.errors import Conflict, Unprocessable
from service.fhir.hooks import WriteEvent
from service.fhir.statements import Prepared
from service.fhir.store import CurrentState, StoreTransaction
from service.fhir.tables import ResourceRow, ResourceVersion

RESOURCES = ResourceRow.__table__
VERSIONS = ResourceVersion.__table__
FREE, HELD, BUSY, CLOSED = "free", "held", "busy", "closed"
#: Slot.status written by a HIS → our row status (tentative or unavailable: not bookable here)
SLOT_STATUS_IN = {"free": FREE, "busy": BUSY, "busy-tentative": BUSY, "busy-unavailable": CLOSED,
                  "entered-in-error": CLOSED}
#: our row status → Slot.status we write
SLOT_STATUS_OUT = {FREE: "free", HELD: "busy-tentative", BUSY: "busy"}
#: bed Location.operationalStatus (v2-0116) → row status: U unoccupied, O occupied, others closed
BED_STATUS_IN = {"U": FREE, "O": BUSY, "C": CLOSED, "H": CLOSED, "I": CLOSED, "K": CLOSED}


# -- the arithmetic (pure) ------------------------------------------------------------------

def _fraction(share: float) -> Fraction:
    return Fraction(share).limit_denominator(10_000)  # 0.25 → 1/4, 0.3333… → 1/3


def reserved_count(n: int, share: float) -> int:
    """ceil(n × share), at least 1 when share > 0 and n > 0, never more than n (R20/R21)."""
    if n <= 0 or share <= 0:
        return 0
    return min(n, max(1, math.ceil(n * _fraction(share))))


def spread(n: int, share: float) -> list[bool]:
    """Which of n slots in time order are reserved: slot i when the running target
    ceil((i+1)·share) steps up. Exactly reserved_count(n, share) are, evenly spaced."""
    s = _fraction(share)
    if n <= 0 or s <= 0:
        return [False] * max(n, 0)
    return [math.ceil((i + 1) * s) > math.ceil(i * s) for i in range(n)]


# -- rows -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    ref: str
    kind: str
    group_ref: str
    day: date | None
    start: datetime | None
    end: datetime | None
    service_kind: str
    status: str
    assigned_pool: str
    pool: str
    share: float
    resolved: bool
    opens_at: datetime | None
    release_at: datetime | None
    released_at: datetime | None
    appointment_id: str | None
    booked_pool: str | None
    alliance: str | None
    organization: str | None
    department: str | None


_ROW_COLUMNS = [SLOTS.c[name] for name in Row.__dataclass_fields__]


def _row(values: Mapping[str, Any]) -> Row:
    data = dict(values)
    for key in ("start", "end", "opens_at", "release_at", "released_at"):
        if data[key] is not None:
            data[key] = utc(data[key])
    return Row(**data)


def get_row(conn: sa.Connection, ref: str) -> Row | None:
    found = conn.execute(sa.select(*_ROW_COLUMNS).where(SLOTS.c.ref == ref)).first()
    return None if found is None else _row(found._mapping)


_INSERT_EVENT = Prepared(EVENTS.insert().values({c.name: sa.bindparam(c.name) for c in EVENTS.columns
                                                 if c.name != "seq"}))


def record(tx: StoreTransaction, ref: str, event: str, *, pool: str | None, row: Row | None = None,
           appointment_id: str | None = None, actor: str | None = None, day: date | None = None) -> None:
    _INSERT_EVENT.rows(tx.conn, dict(
        ref=ref, event=event, at=tx.clock(), pool=pool, appointment_id=appointment_id, actor=actor,
        organization=row.organization if row else None, department=row.department if row else None,
        day=day or (row.day if row else None) or china_day(tx.clock())))


def sync_resource(tx: StoreTransaction, ref: str, *, pool: str, status: str, known: CurrentState | None = None) -> None:
    """Make the Slot / bed resource say what the row says (pool tag, Slot.status): a new
    version, so that the change is in the resource's history. The row is always changed
    first; the hooks then see a resource that agrees with its row and do nothing. ``known``:
    the resource's current state as :func:`locked_unit` read it (else it is read here)."""
    resource_type, resource_id = split_ref(ref)
    state = known if known is not None else tx.locked_state(resource_type, resource_id)
    current = state.content if state is not None else None
    if current is None:
        return
    wanted_status = SLOT_STATUS_OUT.get(status) if resource_type == "Slot" else None
    if pool_of(current) == pool and (wanted_status is None or current.get("status") == wanted_status):
        return
    resource = copy.deepcopy(current)
    set_pool_tag(resource, pool)
    if wanted_status is not None:
        resource["status"] = wanted_status
    token = _syncing.set(ref)
    try:
        tx.as_system("capacity").update(resource_type, resource_id, resource, known=state)
    finally:
        _syncing.reset(token)


#: the unit whose resource sync_resource is writing right now (its hooks have nothing to do)
_syncing: ContextVar[str | None] = ContextVar("capacity_syncing", default=None)


def lock_resource(tx: StoreTransaction, ref: str) -> bool:
    """Lock order everywhere: the resource row first, then its capacity row (no deadlocks
    between a booking and a HIS update of the same slot)."""
    return tx.current_version(*split_ref(ref), lock=True) is not None


#: A unit's row and its resource's state (None: read it again), as :func:`locked_unit` found them.
LockedUnit = tuple[Row, CurrentState | None]


def locked_unit(tx: StoreTransaction, ref: str) -> LockedUnit | None:
    """The unit's row and its resource's current state, the resource row locked first (one
    statement: ``FOR UPDATE OF resource``; SQLite write transactions are serial anyway): what
    a claim decides on, and what :func:`sync_resource` then writes the next version of. The
    state is None when another transaction changed the resource while this one waited for
    the lock (its new content is not in this statement's snapshot): read it again then."""
    resource_type, resource_id = split_ref(ref)
    query = _LOCKED_ROW_PG if tx.conn.dialect.name == "postgresql" else _LOCKED_ROW
    found = query.first(tx.conn, {"t": resource_type, "i": resource_id, "ref": ref})
    if found is None:
        return None
    *row, version_id, deleted, content = found
    state = None
    if deleted or content is not None:
        state = CurrentState(version_id, deleted, None if deleted else orjson.loads(content))
    return _row(dict(zip(_ROW_KEYS, row, strict=True))), state


# Built once and prepared: constructing and executing a statement through SQLAlchemy costs
# more than running it. The content is a sub-select, not a join: after waiting for the lock,
# PostgreSQL re-checks the locked row as it now is, and a join to the version it pointed at
# before would drop the row altogether.
_ROW_KEYS = tuple(Row.__dataclass_fields__)
_CONTENT_OF_LOCKED = (sa.select(sa.cast(VERSIONS.c.content, sa.Text)).where(VERSIONS.c.seq == RESOURCES.c.seq)
                      .scalar_subquery())
_LOCKED_ROW_SELECT = (sa.select(*_ROW_COLUMNS, RESOURCES.c.version_id, RESOURCES.c.deleted, _CONTENT_OF_LOCKED)
                      .select_from(SLOTS.join(RESOURCES, sa.and_(RESOURCES.c.resource_type == sa.bindparam("t"),
                                                                 RESOURCES.c.id == sa.bindparam("i"))))
                      .where(SLOTS.c.ref == sa.bindparam("ref")))
_LOCKED_ROW = Prepared(_LOCKED_ROW_SELECT)
_LOCKED_ROW_PG = Prepared(_LOCKED_ROW_SELECT.with_for_update(of=RESOURCES))


# -- re-balancing a schedule-day (or a ward) ------------------------------------------------

def rebalance(tx: StoreTransaction, group_ref: str, day: date | None, *, writing: str | None = None,
              share: float | None = None) -> dict[str, str]:
    """Decide the pool of every open unit of ``group_ref`` on ``day`` so that the reserved
    share holds; returns {ref: pool}. ``writing`` is the unit whose resource is being written
    right now (its tag is set by the caller, not re-written here)."""
    tx.lock_match_key("capacity-pool", f"group={group_ref}&day={day}")  # serialise per schedule-day
    now = tx.clock()
    query = sa.select(*_ROW_COLUMNS).where(SLOTS.c.group_ref == group_ref, SLOTS.c.status != CLOSED)
    query = query.where(SLOTS.c.day == day) if day is not None else query.where(SLOTS.c.day.is_(None))
    rows = [_row(r._mapping) for r in tx.conn.execute(query)]
    if not rows:
        return {}
    rows.sort(key=lambda r: (r.start or datetime.min.replace(tzinfo=now.tzinfo), r.ref))
    if share is None:
        share = next((r.share for r in rows if r.resolved), rows[0].share)
    ideal = spread(len(rows), share)
    fixed_reserved = 0
    movable: list[tuple[bool, int, Row]] = []
    for i, row in enumerate(rows):
        released = row.released_at is not None or (row.release_at is not None and row.release_at <= now)
        if row.status in (HELD, BUSY) or released:
            fixed_reserved += row.assigned_pool == RESERVED
        else:
            movable.append((not ideal[i], i, row))
    movable.sort(key=lambda m: (m[0], m[1]))
    need = max(0, reserved_count(len(rows), share) - fixed_reserved)
    result = {row.ref: row.pool for row in rows}
    changes = [(row, RESERVED if k < need else GENERAL) for k, (_, _, row) in enumerate(movable)]
    changes = [(row, want) for row, want in changes if row.assigned_pool != want or row.pool != want]
    for row, _ in sorted(changes, key=lambda c: c[0].ref):
        if row.ref != writing:
            lock_resource(tx, row.ref)
    for row, want in changes:
        done = tx.conn.execute(
            SLOTS.update()
            .where(SLOTS.c.ref == row.ref, SLOTS.c.status == row.status, SLOTS.c.released_at.is_(None))
            .values(assigned_pool=want, pool=want, version=SLOTS.c.version + 1, updated_at=now)
            .returning(SLOTS.c.ref)
        ).first()
        if done is None:  # booked meanwhile: it keeps its pool
            continue
        result[row.ref] = want
        if row.ref != writing:
            sync_resource(tx, row.ref, pool=want, status=row.status)
    return result


# -- publishing: the hooks --------------------------------------------------------------------

def _context(tx: StoreTransaction, group_ref: str) -> tuple[_orgs.Placement | None, Policy]:
    schedule = _orgs.content(tx, group_ref) if group_ref.startswith("Schedule/") else None
    if schedule is None:
        return None, default_policy()
    placement = _orgs.schedule_placement(tx, schedule)
    return placement, effective_policy(tx.conn, scopes_for(placement.alliance, placement.organization,
                                                           placement.department))


def _day_share(tx: StoreTransaction, group_ref: str, day: date | None) -> float | None:
    """A schedule-day keeps the share in force when it was first published."""
    return tx.conn.execute(sa.select(SLOTS.c.share).where(
        SLOTS.c.group_ref == group_ref, SLOTS.c.day == day, SLOTS.c.resolved.is_(True)).limit(1)).scalar()


def slot_before(event: WriteEvent) -> None:
    """Slot create/update/delete: keep the capacity row and the pool tag (R20, R21)."""
    tx, ref = event.tx, f"Slot/{event.resource_id}"
    if _syncing.get() == ref and event.resource is not None:
        return  # our own sync_resource: the resource already says what the row says
    row = get_row(tx.conn, ref)
    if event.resource is None:
        _close(tx, row)
        return
    slot = event.resource
    group_ref = ref_of(slot.get("schedule"))
    if group_ref is None or not group_ref.startswith("Schedule/"):
        raise Unprocessable("a Slot needs a schedule reference to a Schedule", expression="Slot.schedule")
    start = parse_instant(slot.get("start"), "Slot.start")
    end = parse_instant(slot.get("end"), "Slot.end")
    day = china_day(start)
    wanted = SLOT_STATUS_IN.get(slot.get("status", "free"), FREE)
    if row is None:
        placement, policy = _context(tx, group_ref)
        kind = placement.kind if placement else "specialist"
        share = _day_share(tx, group_ref, day) if placement else None
        share = policy.share_for(kind) if share is None else share
        _insert(tx, ref, "slot", group_ref, day, placement, kind, share=share, status=wanted,
                start=start, end=end, opens_at=start - policy.booking_window, release_at=start - policy.release_before,
                specialty=first_token(slot.get("specialty")) or (placement.specialty if placement else None),
                service_type=first_token(slot.get("serviceType")) or (placement.service_type if placement else None))
        pools = rebalance(tx, group_ref, day, writing=ref)
        set_pool_tag(slot, pools.get(ref, GENERAL))
        return
    moved = (row.group_ref, row.day) != (group_ref, day)
    values: dict[str, Any] = {}
    if moved or row.start != start:
        # a moved slot keeps the release and booking-window offsets it was published with
        release_before = row.start - row.release_at if row.start and row.release_at else None
        booking_window = row.start - row.opens_at if row.start and row.opens_at else None
        values.update(group_ref=group_ref, day=day, start=start, end=end,
                      release_at=start - (release_before or default_policy().release_before),
                      opens_at=start - (booking_window or default_policy().booking_window))
    status_values = _reconcile(tx, row, wanted, slot)
    values.update(status_values)
    if values:
        tx.conn.execute(SLOTS.update().where(SLOTS.c.ref == ref)
                        .values(**values, version=SLOTS.c.version + 1, updated_at=tx.clock()))
    reopened_or_closed = "status" in status_values and CLOSED in (row.status, status_values["status"])
    if moved or reopened_or_closed:
        if moved:
            rebalance(tx, row.group_ref, row.day)
        pools = rebalance(tx, group_ref, day, writing=ref)
        set_pool_tag(slot, pools.get(ref, values.get("pool", row.pool)))
    else:
        set_pool_tag(slot, values.get("pool", row.pool))
    if row.appointment_id and row.status in SLOT_STATUS_OUT and values.get("status", row.status) == row.status:
        slot["status"] = SLOT_STATUS_OUT[row.status]  # booked through Yilian: Yilian keeps its status


def _reconcile(tx: StoreTransaction, row: Row, wanted: str, resource: dict[str, Any]) -> dict[str, Any]:
    """A HIS changed the status of a unit: the values to store, or {} to keep ours."""
    if wanted == row.status:
        return {}
    if row.appointment_id:
        if wanted == CLOSED:
            raise Conflict(f"{row.ref} is booked by Appointment/{row.appointment_id}; cancel that appointment "
                           "before withdrawing the capacity")
        return {}  # Yilian booked it: a HIS re-publishing "free" or "busy" does not unbook it
    if wanted == FREE:
        return freed_values(tx, row)
    return {"status": wanted, "booked_by": "his" if wanted == BUSY else None,
            "booked_pool": row.pool if wanted == BUSY else None}


def freed_values(tx: StoreTransaction, row: Row) -> dict[str, Any]:
    """Back into the pool it came from, unless its release time has passed (R23)."""
    now = tx.clock()
    values: dict[str, Any] = {"status": FREE, "appointment_id": None, "held_until": None, "booked_pool": None,
                              "booked_by": None, "pool": row.assigned_pool, "released_at": row.released_at}
    if row.kind == "bed":
        # a bed that becomes free again is the ward's reserved bed again; its release clock restarts
        policy = effective_policy(tx.conn, scopes_for(row.alliance, row.organization, row.department))
        values.update(pool=row.assigned_pool, released_at=None, release_at=now + policy.bed_release_after)
    elif row.assigned_pool == RESERVED and row.release_at is not None and row.release_at <= now:
        values.update(pool=GENERAL, released_at=row.released_at or now)
    return values


def _insert(tx: StoreTransaction, ref: str, kind: str, group_ref: str, day: date | None,
            placement: _orgs.Placement | None, service_kind: str, *, share: float, status: str,
            start: datetime | None = None, end: datetime | None = None, opens_at: datetime | None = None,
            release_at: datetime | None = None, specialty: str | None = None,
            service_type: str | None = None) -> None:
    now = tx.clock()
    tx.conn.execute(SLOTS.insert().values(
        ref=ref, kind=kind, group_ref=group_ref, day=day, service_kind=service_kind,
        alliance=placement.alliance if placement else None,
        organization=placement.organization if placement else None,
        department=placement.department if placement else None,
        specialty=specialty, service_type=service_type, start=start, end=end, resolved=placement is not None,
        share=share, assigned_pool=GENERAL, pool=GENERAL, status=status, opens_at=opens_at, release_at=release_at,
        booked_by="his" if status == BUSY else None, version=1, updated_at=now))
    record(tx, ref, "published", pool=None, row=get_row(tx.conn, ref))


def _close(tx: StoreTransaction, row: Row | None) -> None:
    """The unit was deleted or withdrawn: it leaves the count of its day."""
    if row is None or row.status == CLOSED:
        return
    if row.appointment_id:
        raise Conflict(f"{row.ref} is booked by Appointment/{row.appointment_id}; cancel that appointment first")
    tx.conn.execute(SLOTS.update().where(SLOTS.c.ref == row.ref)
                    .values(status=CLOSED, version=SLOTS.c.version + 1, updated_at=tx.clock()))
    record(tx, row.ref, "closed", pool=row.pool, row=row)
    rebalance(tx, row.group_ref, row.day)


def schedule_after(event: WriteEvent) -> None:
    """A Schedule written after its slots (e.g. PUT Schedule + POST Slots in one Bundle, where
    FHIR processes the POSTs first): place the slots and apply the policy now."""
    if event.resource is None:
        return
    tx, group_ref = event.tx, f"Schedule/{event.resource_id}"
    now = tx.clock()
    pending = tx.conn.execute(
        sa.select(SLOTS.c.day, SLOTS.c.resolved).distinct()
        .where(SLOTS.c.group_ref == group_ref, SLOTS.c.status != CLOSED,
               sa.or_(SLOTS.c.resolved.is_(False), SLOTS.c.start > now))
    ).all()
    if not pending:
        return
    placement = _orgs.schedule_placement(tx, event.resource)
    policy = effective_policy(tx.conn, scopes_for(placement.alliance, placement.organization, placement.department))
    where = (SLOTS.c.group_ref == group_ref, SLOTS.c.status != CLOSED)
    tx.conn.execute(SLOTS.update().where(*where).values(
        alliance=placement.alliance, organization=placement.organization, department=placement.department,
        service_kind=placement.kind,
        specialty=sa.func.coalesce(SLOTS.c.specialty, placement.specialty),
        service_type=sa.func.coalesce(SLOTS.c.service_type, placement.service_type)))
    unresolved = {day for day, resolved in pending if not resolved}
    for day in sorted(unresolved):
        share = _day_share(tx, group_ref, day)
        share = policy.share_for(placement.kind) if share is None else share
        unplaced = tx.conn.execute(sa.select(SLOTS.c.ref, SLOTS.c.start).where(
            *where, SLOTS.c.day == day, SLOTS.c.resolved.is_(False))).all()
        for ref, start in unplaced:  # (interval arithmetic in SQL differs between SQLite and PostgreSQL)
            tx.conn.execute(SLOTS.update().where(SLOTS.c.ref == ref).values(
                resolved=True, share=share, opens_at=utc(start) - policy.booking_window,
                release_at=utc(start) - policy.release_before))
    for day in sorted({day for day, _ in pending}):
        rebalance(tx, group_ref, day)


def location_before(event: WriteEvent) -> None:
    """Beds: a Location with physicalType ``bd`` is one unit of its ward's capacity (R21)."""
    tx, ref = event.tx, f"Location/{event.resource_id}"
    location = event.resource
    if _syncing.get() == ref and location is not None:
        return
    if not is_bed(location) and not is_bed(event.previous):
        return
    row = get_row(tx.conn, ref)
    if location is None or not is_bed(location):
        _close(tx, row)
        return
    ward = ref_of(location.get("partOf")) or ref
    wanted = BED_STATUS_IN.get(_bed_status(location), FREE)
    if location.get("status") in ("inactive", "suspended"):
        wanted = CLOSED
    if row is None:
        placement = _orgs.bed_placement(tx, location)
        policy = effective_policy(tx.conn, scopes_for(placement.alliance, placement.organization,
                                                      placement.department))
        _insert(tx, ref, "bed", ward, None, placement, "inpatient", share=policy.bed_reserved_share, status=wanted,
                release_at=tx.clock() + policy.bed_release_after, service_type=placement.service_type)
        pools = rebalance(tx, ward, None, writing=ref, share=policy.bed_reserved_share)
        set_pool_tag(location, pools.get(ref, GENERAL))
        return
    values: dict[str, Any] = {}
    if row.group_ref != ward:
        values["group_ref"] = ward
    previous_status = BED_STATUS_IN.get(_bed_status(event.previous), FREE)
    if row.appointment_id and wanted == FREE and previous_status == BUSY:
        values.update(freed_values(tx, row))  # discharged: the admission is over, the bed is free again
        record(tx, ref, "discharged", pool=row.assigned_pool, row=row, appointment_id=row.appointment_id)
    else:
        values.update(_reconcile(tx, row, wanted, location))
    if values:
        tx.conn.execute(SLOTS.update().where(SLOTS.c.ref == ref)
                        .values(**values, version=SLOTS.c.version + 1, updated_at=tx.clock()))
    if "group_ref" in values or ("status" in values and CLOSED in (row.status, values["status"])):
        if "group_ref" in values:
            rebalance(tx, row.group_ref, None)
        policy = effective_policy(tx.conn, scopes_for(row.alliance, row.organization, row.department))
        pools = rebalance(tx, ward, None, writing=ref, share=policy.bed_reserved_share)
        set_pool_tag(location, pools.get(ref, values.get("pool", row.pool)))
    else:
        set_pool_tag(location, values.get("pool", row.pool))


def _bed_status(location: dict[str, Any] | None) -> str | None:
    """Location.operationalStatus is a Coding of v2-0116 (U unoccupied, O occupied, C closed...)."""
    coding = (location or {}).get("operationalStatus") or {}
    if coding.get("system") not in (None, BED_STATUS_SYSTEM):
        return None
    return coding.get("code")
