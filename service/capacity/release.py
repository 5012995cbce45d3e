"""Release (R23) and hold expiry, run by exactly one worker at a time.

* :func:`release_due` moves unbooked reserved capacity to the general pool once its release
  time has come (slot: ``start − release_before``; bed: ``bed_release_after`` after it became
  free). The Slot / bed resource gets a new version with the ``general`` tag, so the release is
  in its history, and a ``released`` event is counted by the report.
* :func:`expire_holds` frees slots whose hold passed ``held_until``: the slot goes back to its
  pool (general if its release time passed meanwhile), the Appointment becomes ``cancelled``
  with the reason "hold expired".

Both are idempotent: every change is a conditional UPDATE that only matches rows still due,
so two runs (or two workers that both think they hold the lease) cannot release twice.
:class:`Scheduler` runs them in the app every ``YILIAN_CAPACITY_SCHEDULER_SECONDS`` (default
30; 0 disables) under the database lease ``capacity-release`` (a row of ``lease`` taken with
an atomic ``UPDATE … WHERE expires_at < now``), with the same clock as the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import uuid4

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from service.capacity._fhir import GENERAL, RESERVED
from service.capacity.pools import (
    FREE,
    HELD,
    freed_values,
    get_row,
    lock_resource,
    record,
    sync_resource,
)
from service.capacity.tables import LEASES, SLOTS
from service.fhir.access import AccessContext
from service.fhir.db import is_postgres, write_transaction
from service.fhir.store import ResourceStore

log = logging.getLogger("yilian.capacity")

LEASE_NAME = "capacity-release"
BATCH = 200


@dataclass
class RunSummary:
    released: int = 0
    expired_holds: int = 0

    def __str__(self) -> str:
        return f"released {self.released} reserved unit(s), expired {self.expired_holds} hold(s)"


def release_due(store: ResourceStore, now: datetime | None = None) -> int:
    """Reserved, free units whose release time has come → general pool (R23)."""
    now = now or store.clock()
    total = 0
    while True:
        with store.write(AccessContext.internal("capacity-release")) as tx:
            refs = tx.conn.execute(
                sa.select(SLOTS.c.ref).where(SLOTS.c.pool == RESERVED, SLOTS.c.status == FREE,
                                             SLOTS.c.release_at <= now)
                .order_by(SLOTS.c.release_at, SLOTS.c.ref).limit(BATCH)
            ).scalars().all()
            done = 0
            for ref in refs:
                lock_resource(tx, ref)
                row = tx.conn.execute(
                    SLOTS.update()
                    .where(SLOTS.c.ref == ref, SLOTS.c.pool == RESERVED, SLOTS.c.status == FREE,
                           SLOTS.c.release_at <= now)
                    .values(pool=GENERAL, released_at=now, version=SLOTS.c.version + 1, updated_at=now)
                    .returning(SLOTS.c.ref)
                ).first()
                if row is None:
                    continue
                record(tx, ref, "released", pool=GENERAL, row=get_row(tx.conn, ref))
                sync_resource(tx, ref, pool=GENERAL, status=FREE)
                done += 1
        total += done
        if len(refs) < BATCH:
            return total


def expire_holds(store: ResourceStore, now: datetime | None = None) -> int:
    """Holds past ``held_until``: free the slot, cancel the pending Appointment."""
    now = now or store.clock()
    total = 0
    while True:
        with store.write(AccessContext.internal("capacity-hold-expiry")) as tx:
            due = tx.conn.execute(
                sa.select(SLOTS.c.ref, SLOTS.c.appointment_id)
                .where(SLOTS.c.status == HELD, SLOTS.c.held_until <= now)
                .order_by(SLOTS.c.held_until, SLOTS.c.ref).limit(BATCH)
            ).all()
            for ref, appointment_id in due:
                lock_resource(tx, ref)
                row = get_row(tx.conn, ref)
                if row is None or row.status != HELD or row.appointment_id != appointment_id:
                    continue
                values = freed_values(tx, row)
                freed = tx.conn.execute(
                    SLOTS.update()
                    .where(SLOTS.c.ref == ref, SLOTS.c.status == HELD, SLOTS.c.appointment_id == appointment_id,
                           SLOTS.c.held_until <= now)
                    .values(**values, version=SLOTS.c.version + 1, updated_at=now)
                    .returning(SLOTS.c.ref)
                ).first()
                if freed is None:
                    continue
                record(tx, ref, "hold-expired", pool=values["pool"], row=row, appointment_id=appointment_id)
                if values["pool"] == GENERAL and row.assigned_pool == RESERVED and row.released_at is None:
                    record(tx, ref, "released", pool=GENERAL, row=row)
                sync_resource(tx, ref, pool=values["pool"], status=FREE)
                _cancel_expired(tx, appointment_id)
                total += 1
        if len(due) < BATCH:
            return total


def _cancel_expired(tx, appointment_id: str | None) -> None:  # type: ignore[no-untyped-def]
    if not appointment_id:
        return
    appointment = tx.current_content("Appointment", appointment_id)
    if appointment is None or appointment.get("status") != "pending":
        return
    appointment["status"] = "cancelled"
    appointment["cancelationReason"] = {"text": "hold expired (hold_ttl) before the booking was completed"}
    tx.update("Appointment", appointment_id, appointment)


def run_once(store: ResourceStore, now: datetime | None = None) -> RunSummary:
    now = now or store.clock()
    return RunSummary(expired_holds=expire_holds(store, now), released=release_due(store, now))


# -- the lease ---------------------------------------------------------------------------------

def acquire_lease(engine: Engine, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
    """Take or renew the lease: one atomic UPDATE that only matches an expired lease (or our
    own); an INSERT … ON CONFLICT DO NOTHING the first time. RETURNING tells who won."""
    with write_transaction(engine) as conn:
        taken = conn.execute(
            LEASES.update()
            .where(LEASES.c.name == name, sa.or_(LEASES.c.expires_at < now, LEASES.c.holder == holder))
            .values(holder=holder, expires_at=now + ttl)
            .returning(LEASES.c.name)
        ).first()
        if taken is not None:
            return True
        insert = (postgresql.insert if is_postgres(conn) else sqlite.insert)(LEASES)
        created = conn.execute(
            insert.values(name=name, holder=holder, expires_at=now + ttl).on_conflict_do_nothing()
            .returning(LEASES.c.name)
        ).first()
        return created is not None


def release_lease(engine: Engine, name: str, holder: str, now: datetime) -> None:
    with write_transaction(engine) as conn:
        conn.execute(LEASES.update().where(LEASES.c.name == name, LEASES.c.holder == holder)
                     .values(expires_at=now))


class Scheduler:
    """Runs :func:`run_once` every ``interval`` seconds in whichever worker holds the lease."""

    def __init__(self, store: ResourceStore, *, interval: float, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.interval = interval
        self.clock = clock or store.clock
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:8]}"
        self._task: asyncio.Task | None = None

    def tick(self) -> RunSummary | None:
        now = self.clock()
        if not acquire_lease(self.store.engine, LEASE_NAME, self.holder, now,
                             timedelta(seconds=max(3 * self.interval, 10))):
            return None
        summary = run_once(self.store, now)
        if summary.released or summary.expired_holds:
            log.info("capacity: %s (lease holder %s)", summary, self.holder)
        return summary

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:  # keep the scheduler alive; the next tick retries
                log.exception("capacity release run failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="capacity-release")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await asyncio.to_thread(release_lease, self.store.engine, LEASE_NAME, self.holder, self.clock())
        except Exception:
            log.exception("capacity: could not give the lease back")


def scheduler_interval() -> float:
    return float(os.environ.get("YILIAN_CAPACITY_SCHEDULER_SECONDS", "30"))


__all__ = ["RunSummary", "Scheduler", "acquire_lease", "expire_holds", "release_due", "run_once"]
