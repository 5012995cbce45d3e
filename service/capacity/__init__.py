"""Reserved capacity at lead hospitals for family doctors (R20–R24, R32).

``install(app, hooks)`` plugs the package into an app: write hooks that assign pools to
published Slots and beds and claim / free them for Appointments (on every write path), the
operations in the CapabilityStatement, and the release scheduler in the app's lifespan.
The HTTP side is ``service.api.capacity``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.fhir.hooks import WriteHooks

OPERATION_BASE = "https://yilian.example.org/fhir/OperationDefinition"
OPERATIONS = ("find", "hold", "book", "cancel")


def install(app: FastAPI, hooks: WriteHooks) -> None:
    from service.api.capability import register_operation
    from service.capacity import booking, pools
    from service.capacity.policy import default_policy

    default_policy()  # a broken mappings/capacity-policy.json stops the start, naming file and field
    hooks.before("Slot", pools.slot_before)
    hooks.before("Location", pools.location_before)
    hooks.after("Schedule", pools.schedule_after)
    hooks.before("Appointment", booking.appointment_before)
    for name in OPERATIONS:
        register_operation("Appointment", name, f"{OPERATION_BASE}/appointment-{name}")
    _run_scheduler_in_lifespan(app)


def _run_scheduler_in_lifespan(app: FastAPI) -> None:
    """Start the release scheduler with the app (every worker runs one; the lease lets one act)."""
    from service.capacity.release import Scheduler, scheduler_interval

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with inner(application) as state:
            interval = scheduler_interval()
            scheduler = Scheduler(application.state.store, interval=interval) if interval > 0 else None
            if scheduler is not None:
                scheduler.start()
            try:
                yield state
            finally:
                if scheduler is not None:
                    await scheduler.stop()

    app.router.lifespan_context = lifespan
