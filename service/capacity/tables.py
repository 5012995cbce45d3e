"""Tables of the reserved-capacity package (R20–R24, R32).

``capacity_slot`` mirrors every published Slot and bed (Location, physicalType ``bd``) as one
row, kept by the write hooks in the same transaction as the resource itself, so that finding
and booking never scan resource JSON and a booking is one conditional ``UPDATE`` of one row.

``capacity_event`` is the append-only trail the report counts (holds, bookings, releases,
expired holds). ``capacity_policy`` holds the per-alliance / hospital / department overrides of
``mappings/capacity-policy.json``, ``capacity_policy_history`` every change to them (who, when,
old, new). ``lease`` is a named, expiring lock that lets exactly one worker run a scheduler.
"""

from __future__ import annotations

from datetime import date, datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from service.fhir.tables import BigId, Json, UtcDateTime


class CapacitySlot(SQLModel, table=True):
    """One bookable unit: a Slot (kind ``slot``) or a bed Location (kind ``bed``).

    ``assigned_pool`` is where the unit belongs (decided when it is published, R20/R21);
    ``pool`` is where it is bookable now: ``general`` once released (R23) although it was
    assigned ``reserved``. Every state change bumps ``version``.
    """

    __tablename__ = "capacity_slot"
    __table_args__ = (
        sa.Index("ix_capacity_slot_group_day", "group_ref", "day"),
        sa.Index("ix_capacity_slot_find", "kind", "status", "pool", "start"),
        sa.Index("ix_capacity_slot_release", "pool", "status", "release_at"),
        sa.Index("ix_capacity_slot_hold", "status", "held_until"),
        sa.Index("ix_capacity_slot_report", "organization", "day"),
        sa.Index("ix_capacity_slot_appointment", "appointment_id"),
    )

    ref: str = Field(primary_key=True, max_length=140)  # "Slot/<id>" or "Location/<id>"
    kind: str = Field(max_length=8)  # slot | bed
    group_ref: str = Field(max_length=140)  # "Schedule/<id>" for a slot, the ward "Location/<id>" for a bed
    day: date | None = Field(default=None, sa_type=sa.Date)  # Asia/Shanghai day of start (slots)
    service_kind: str = Field(max_length=16)  # specialist | outpatient | exam | inpatient
    alliance: str | None = Field(default=None, max_length=140)  # "Organization/<id>"
    organization: str | None = Field(default=None, max_length=140)  # the hospital
    department: str | None = Field(default=None, max_length=140)  # HealthcareService or department Organization
    specialty: str | None = Field(default=None, max_length=300)  # "system|code" of the first specialty
    service_type: str | None = Field(default=None, max_length=300)  # "system|code" of the first serviceType
    start: datetime | None = Field(default=None, sa_type=UtcDateTime)
    end: datetime | None = Field(default=None, sa_type=UtcDateTime)
    resolved: bool = True  # False while the Schedule (and so the policy) is not known yet
    share: float = 0.0  # the reserved share applied to its schedule-day / ward when published
    assigned_pool: str = Field(max_length=8)  # reserved | general
    pool: str = Field(max_length=8)  # reserved | general
    status: str = Field(max_length=8)  # free | held | busy | closed
    opens_at: datetime | None = Field(default=None, sa_type=UtcDateTime)  # start - booking_window
    release_at: datetime | None = Field(default=None, sa_type=UtcDateTime)  # when reserved turns general (R23)
    released_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    held_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    appointment_id: str | None = Field(default=None, max_length=64)
    booked_pool: str | None = Field(default=None, max_length=8)  # pool it was held/booked from
    booked_by: str | None = Field(default=None, max_length=140)  # caller organization, "public" or "his"
    version: int = 1
    updated_at: datetime = Field(sa_type=UtcDateTime)


class CapacityEvent(SQLModel, table=True):
    """What happened to a unit, for the report and for people asking "why is it general?"."""

    __tablename__ = "capacity_event"
    __table_args__ = (sa.Index("ix_capacity_event_org_day", "organization", "day", "event"),
                      sa.Index("ix_capacity_event_ref", "ref"))

    seq: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))
    ref: str = Field(max_length=140)
    event: str = Field(max_length=16)  # published | held | booked | cancelled | released | hold-expired | closed
    at: datetime = Field(sa_type=UtcDateTime)
    pool: str | None = Field(default=None, max_length=8)
    appointment_id: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=140)
    organization: str | None = Field(default=None, max_length=140)
    department: str | None = Field(default=None, max_length=140)
    day: date | None = Field(default=None, sa_type=sa.Date)


class CapacityPolicy(SQLModel, table=True):
    """Overrides of the file defaults for one scope: ``Organization/<alliance or hospital>`` or
    ``HealthcareService/<department>``. Only the fields set here override."""

    __tablename__ = "capacity_policy"

    scope: str = Field(primary_key=True, max_length=140)
    settings: dict = Field(sa_column=sa.Column(Json, nullable=False))
    version: int = 1
    updated_at: datetime = Field(sa_type=UtcDateTime)
    updated_by: str | None = Field(default=None, max_length=200)


class CapacityPolicyHistory(SQLModel, table=True):
    """Every policy change: who, when, the old and the new overrides of the scope."""

    __tablename__ = "capacity_policy_history"
    __table_args__ = (sa.Index("ix_capacity_policy_history_scope", "scope", "seq"),)

    seq: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))
    scope: str = Field(max_length=140)
    changed_at: datetime = Field(sa_type=UtcDateTime)
    changed_by: str | None = Field(default=None, max_length=200)
    old: dict | None = Field(default=None, sa_column=sa.Column(Json, nullable=True))
    new: dict | None = Field(default=None, sa_column=sa.Column(Json, nullable=True))


class Lease(SQLModel, table=True):
    """A named lock with an expiry: the holder renews it, anyone may take it once expired."""

    __tablename__ = "lease"

    name: str = Field(primary_key=True, max_length=100)
    holder: str = Field(max_length=200)
    expires_at: datetime = Field(sa_type=UtcDateTime)


SLOTS = CapacitySlot.__table__
EVENTS = CapacityEvent.__table__
POLICIES = CapacityPolicy.__table__
POLICY_HISTORY = CapacityPolicyHistory.__table__
LEASES = Lease.__table__
