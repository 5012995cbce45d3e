"""The reserved-capacity report per hospital, department and day (R20, R21, R23, R35).

Counted from ``capacity_slot`` (what is published and booked now) and ``capacity_event`` (what
happened: holds that expired). For each department (HealthcareService, else department
Organization) and capacity kind:

* ``published``: open units of the day (withdrawn ones not counted);
* ``reserved``: units assigned to the reserved pool (R20/R21), released ones included;
* ``booked_from_reserved`` / ``booked_from_general``: booked now, by the pool they were booked from;
* ``booked_by_public``: booked now by callers that are not grassroots institutions;
* ``released``: reserved units that went to the general pool unbooked (R23);
* ``expired_holds``: holds that ran out on units of the day;
* ``reserved_utilisation``: booked_from_reserved / reserved (None when nothing was reserved).

Beds have no day: they are reported as they are now, under ``beds``.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import sqlalchemy as sa

from service.capacity._fhir import RESERVED
from service.capacity.pools import BUSY, CLOSED
from service.capacity.tables import EVENTS, SLOTS

COUNTS = ("published", "reserved", "booked_from_reserved", "booked_from_general", "booked_by_public", "released",
          "expired_holds")


def _counts(conn: sa.Connection, where: list[sa.ColumnElement], expired_where: list[sa.ColumnElement]) -> dict:
    is_open = SLOTS.c.status != CLOSED
    booked = sa.and_(is_open, SLOTS.c.status == BUSY)

    def count(condition: sa.ColumnElement) -> sa.ColumnElement:
        return sa.func.sum(sa.case((condition, 1), else_=0))

    query = (
        sa.select(
            SLOTS.c.department, SLOTS.c.service_kind,
            count(is_open).label("published"),
            count(sa.and_(is_open, SLOTS.c.assigned_pool == RESERVED)).label("reserved"),
            count(sa.and_(booked, SLOTS.c.booked_pool == RESERVED)).label("booked_from_reserved"),
            count(sa.and_(booked, SLOTS.c.booked_pool != RESERVED)).label("booked_from_general"),
            count(sa.and_(booked, SLOTS.c.booked_by == "public")).label("booked_by_public"),
            count(sa.and_(is_open, SLOTS.c.released_at.is_not(None))).label("released"),
        )
        .where(*where)
        .group_by(SLOTS.c.department, SLOTS.c.service_kind)
        .order_by(SLOTS.c.department, SLOTS.c.service_kind)
    )
    groups: dict[tuple[str | None, str], dict[str, Any]] = {}
    for row in conn.execute(query).mappings():
        groups[(row["department"], row["service_kind"])] = {
            "department": row["department"], "kind": row["service_kind"],
            **{k: int(row[k] or 0) for k in COUNTS if k != "expired_holds"}, "expired_holds": 0}
    expired = (
        sa.select(SLOTS.c.department, SLOTS.c.service_kind, sa.func.count())
        .select_from(EVENTS.join(SLOTS, SLOTS.c.ref == EVENTS.c.ref))
        .where(EVENTS.c.event == "hold-expired", *expired_where)
        .group_by(SLOTS.c.department, SLOTS.c.service_kind)
    )
    for department, kind, n in conn.execute(expired):
        group = groups.setdefault((department, kind), {"department": department, "kind": kind,
                                                       **{k: 0 for k in COUNTS}})
        group["expired_holds"] = int(n)
    out = list(groups.values())
    for group in out:
        group["reserved_utilisation"] = _ratio(group["booked_from_reserved"], group["reserved"])
    return {"departments": out, "total": _total(out)}


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _total(groups: list[dict[str, Any]]) -> dict[str, Any]:
    total = {k: sum(g[k] for g in groups) for k in COUNTS}
    total["reserved_utilisation"] = _ratio(total["booked_from_reserved"], total["reserved"])
    return total


def capacity_report(conn: sa.Connection, organization: str, day: date) -> dict[str, Any]:
    """The report of ``organization`` (a hospital, a department or an alliance) for ``day``."""
    scope = sa.or_(SLOTS.c.organization == organization, SLOTS.c.department == organization,
                   SLOTS.c.alliance == organization)
    slots = _counts(conn, [scope, SLOTS.c.kind == "slot", SLOTS.c.day == day],
                    [scope, SLOTS.c.kind == "slot", SLOTS.c.day == day])
    beds = _counts(conn, [scope, SLOTS.c.kind == "bed"], [scope, SLOTS.c.kind == "bed", EVENTS.c.day == day])
    return {"organization": organization, "date": day.isoformat(), "slots": slots, "beds": beds}
