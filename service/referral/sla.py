"""Deadlines and escalation (R31, R34, R24): nobody's referral waits unseen.

Every step of a referral Task that the policy times (``sla.deadlines`` in
``mappings/referral-policy.json``: e.g. an urgent referral must be accepted within 2 h, a
routine one within 48 h) gets its due time as the extension ``referral-sla-deadline`` when the
Task enters it (workflow.apply_transition). :func:`sweep` finds the Tasks past it
(``Task?sla-deadline=lt<now>&overdue=false``: an index seek), flags them
(``referral-overdue`` = true, tag ``referral-flag|overdue``; ``Task?overdue=true``) and tells
the alliance referral desk (outbox ``referral.escalated``).

Safe with several workers and re-runs: each Task is escalated in its own transaction that
locks the Task row and re-reads it, and a flagged Task no longer matches, so a Task is escalated
once per step whoever sweeps. It runs as ``yilian referral sweep`` and periodically in the app
(:func:`run_in_lifespan`); time comes from the store's clock, so tests inject it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from service.fhir.access import AccessContext
from service.fhir.errors import FhirError
from service.fhir.store import ResourceStore, StoreTransaction, fhir_instant
from service.referral import _directory as directory
from service.referral.codes import EXT_OVERDUE, EXT_SLA_DEADLINE, FLAG, extension_value, ref_of, set_extension, set_tag
from service.referral.policy import Policy

log = logging.getLogger("yilian.referral.sla")
SWEEPER = "referral-sweep"


@dataclass
class SweepReport:
    now: datetime
    escalated: list[str] = field(default_factory=list)  # Task/<id>
    skipped: list[str] = field(default_factory=list)  # changed meanwhile, or escalated by another worker

    def summary(self) -> str:
        return (f"referral sweep at {fhir_instant(self.now)}: {len(self.escalated)} overdue referral Task(s) "
                f"escalated, {len(self.skipped)} skipped")


def sweep(store: ResourceStore, policy: Policy, *, now: datetime | None = None, batch: int = 200) -> SweepReport:
    """Flag and escalate every referral Task past its deadline; returns what it did."""
    moment = now or store.clock()
    report = SweepReport(moment)
    ctx = AccessContext.internal(SWEEPER)
    seen: set[str] = set()
    while True:
        with store.read_only(ctx) as tx:
            due = [i for i in tx.find("Task", f"sla-deadline=lt{fhir_instant(moment)}&overdue=false", limit=batch)
                   if i not in seen]
        if not due:
            return report
        for task_id in due:
            seen.add(task_id)
            try:
                with store.write(ctx) as tx:
                    escalated = escalate_overdue(tx, policy, task_id, moment)
            except FhirError as exc:  # changed concurrently: the next sweep looks again
                log.warning("referral sweep skipped Task/%s: %s", task_id, exc)
                escalated = False
            (report.escalated if escalated else report.skipped).append(f"Task/{task_id}")


def escalate_overdue(tx: StoreTransaction, policy: Policy, task_id: str, now: datetime) -> bool:
    """Flag one Task overdue and tell the referral desk, if it still is overdue and unflagged."""
    version = tx.current_version("Task", task_id, lock=True)  # serialises workers on PostgreSQL
    task = tx.current_content("Task", task_id)
    if version is None or version[1] or task is None:
        return False
    deadline = extension_value(task, EXT_SLA_DEADLINE, "DateTime")
    if extension_value(task, EXT_OVERDUE, "Boolean") is True or not deadline or _instant(deadline) >= now:
        return False
    rule = policy.deadline_for(task.get("priority"), task.get("status"))
    set_extension(task, EXT_OVERDUE, {"valueBoolean": True})
    set_tag(task, FLAG, "overdue", "超时")
    tx.update("Task", task_id, task, if_match=version[0])
    owner, requester = ref_of(task.get("owner")), ref_of(task.get("requester"))
    desk = referral_desk(tx, policy, owner) or referral_desk(tx, policy, requester)
    tx.emit("referral.escalated", {
        "task": f"Task/{task_id}", "referral": ref_of(task.get("focus")), "status": task.get("status"),
        "priority": task.get("priority"), "deadline": deadline, "overdueSince": deadline,
        "sla": rule.id if rule else None, "step": rule.step if rule else None,
        "rule": rule.rule if rule else "R31", "owner": owner, "requester": requester,
        "notify": desk, "detectedAt": fhir_instant(now),
    })
    return True


def referral_desk(tx: StoreTransaction, policy: Policy, organization: str | None) -> str | None:
    """The alliance referral desk (转诊办) for an organization: from the policy, else the alliance."""
    alliance = directory.alliance_of(tx, organization)
    if alliance is None:
        return None
    setting = policy.alliances.get(alliance)
    return (setting.referral_desk if setting and setting.referral_desk else None) or alliance


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone(timedelta(hours=8)))  # Asia/Shanghai, as everywhere
    return moment


def run_in_lifespan(app: Any, policy: Policy) -> None:
    """Sweep every ``sla.sweep_interval`` while the app runs (each worker; sweeps are idempotent)."""
    interval = policy.sweep_interval.total_seconds()
    if interval <= 0:
        return
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with inner(application) as state:
            task = asyncio.create_task(_periodically(application.state.store, policy, interval))
            try:
                yield state
            finally:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan


async def _periodically(store: ResourceStore, policy: Policy, interval: float) -> None:
    while True:
        await asyncio.sleep(interval * (0.9 + 0.2 * random.random()))  # workers drift apart
        try:
            report = await asyncio.to_thread(sweep, store, policy)
            if report.escalated:
                log.info(report.summary())
        except Exception:  # never let one failed sweep stop the next
            log.exception("referral sweep failed")
