"""SLA deadlines and escalation (R31, R34, R24) with an injected clock: overdue referral
Tasks are flagged once, searchable, and escalated to the alliance referral desk — by the
sweep in the app, the CLI, or several workers at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from service.fhir.store import fhir_instant
from service.referral import codes
from service.referral.sla import sweep
from tests.test_referral_support import (  # noqa: F401  (fixtures)
    ALLIANCE,
    HOSPITAL,
    SHANGZHAN,
    START,
    Clock,
    clock,
    events,
    found_ids,
    http,
    move,
    new_patient,
    referral,
    referral_app,
    send,
    task_of,
)


def deadline(task: dict) -> str | None:
    return codes.extension_value(task, codes.EXT_SLA_DEADLINE, "DateTime")


def overdue(task: dict) -> bool | None:
    return codes.extension_value(task, codes.EXT_OVERDUE, "Boolean")


async def test_r31_routine_referral_not_accepted_within_48_hours_is_flagged_and_escalated_once(
        http: httpx.AsyncClient, referral_app: FastAPI, clock: Clock, engine: sa.Engine) -> None:
    patient = await new_patient(http)
    sent = await send(http, referral(patient["ref"]))
    task = await task_of(http, sent["id"])
    assert deadline(task) == fhir_instant(START + timedelta(hours=48)) and overdue(task) is False
    policy, store = referral_app.state.referral.policy, referral_app.state.store

    clock.advance(hours=47, minutes=59)
    assert f"Task/{task['id']}" not in sweep(store, policy).escalated
    clock.advance(minutes=2)
    report = sweep(store, policy)
    assert f"Task/{task['id']}" in report.escalated

    flagged = await task_of(http, sent["id"])
    assert overdue(flagged) is True and flagged["status"] == "requested"
    assert {"system": codes.FLAG, "code": "overdue", "display": "超时"} in flagged["meta"]["tag"]
    assert task["id"] in await found_ids(http, "Task", HOSPITAL, overdue="true", owner=HOSPITAL)
    assert task["id"] in await found_ids(http, "Task", HOSPITAL, _tag=f"{codes.FLAG}|overdue")
    escalated = events(engine, "referral.escalated", task=f"Task/{task['id']}")
    assert len(escalated) == 1
    assert escalated[0]["notify"] == ALLIANCE and escalated[0]["sla"] == "SLA-ACCEPT-ROUTINE"
    assert escalated[0]["owner"] == HOSPITAL and escalated[0]["requester"] == SHANGZHAN

    clock.advance(hours=5)
    assert f"Task/{task['id']}" not in sweep(store, policy).escalated  # idempotent: flagged once per step
    assert len(events(engine, "referral.escalated", task=f"Task/{task['id']}")) == 1


@pytest.mark.parametrize("priority, hours, rule",
                         [("urgent", 2, "SLA-ACCEPT-URGENT"), ("stat", 0.5, "SLA-ACCEPT-STAT")])
async def test_r34_urgent_referrals_have_short_deadlines(http: httpx.AsyncClient, referral_app: FastAPI, clock: Clock,
                                                         engine: sa.Engine, priority: str, hours: float,
                                                         rule: str) -> None:
    patient = await new_patient(http)
    sent = await send(http, referral(patient["ref"], priority=priority))
    task = await task_of(http, sent["id"])
    assert deadline(task) == fhir_instant(START + timedelta(hours=hours))
    clock.advance(hours=hours, minutes=1)
    sweep(referral_app.state.store, referral_app.state.referral.policy)
    assert [e["sla"] for e in events(engine, "referral.escalated", task=f"Task/{task['id']}")] == [rule]


async def test_r24_accepting_ends_the_step_and_starts_the_next_clock(http: httpx.AsyncClient, referral_app: FastAPI,
                                                                    clock: Clock, engine: sa.Engine) -> None:
    """Once accepted, the overdue flag of the accept step is cleared and the routine 'see the
    patient within 14 days' step (R24) has its own deadline; after in-progress none."""
    patient = await new_patient(http)
    sent = await send(http, referral(patient["ref"]))
    task = await task_of(http, sent["id"])
    clock.advance(hours=50)
    sweep(referral_app.state.store, referral_app.state.referral.policy)
    task = await task_of(http, sent["id"])
    assert overdue(task) is True
    for status in ("received", "accepted"):
        response = await move(http, task, status, HOSPITAL)
        assert response.status_code == 200, response.text
        task = response.json()
    assert overdue(task) is False and not any(t["code"] == "overdue" for t in task["meta"].get("tag", []))
    assert deadline(task) == fhir_instant(clock() + timedelta(days=14))
    assert task["id"] in await found_ids(http, "Task", HOSPITAL, overdue="false", owner=HOSPITAL)
    response = await move(http, task, "in-progress", HOSPITAL)
    assert response.status_code == 200 and deadline(response.json()) is None


async def test_r31_sweeps_running_at_once_escalate_each_task_once(http: httpx.AsyncClient, referral_app: FastAPI,
                                                                  clock: Clock, engine: sa.Engine) -> None:
    """Several workers sweeping together (threads here; processes in production) race on the
    same Tasks: the row lock and the re-read make each escalation happen once."""
    patient = await new_patient(http)
    tasks = []
    for _ in range(3):
        sent = await send(http, referral(patient["ref"]))
        tasks.append((await task_of(http, sent["id"]))["id"])
    clock.advance(hours=49)
    store, policy = referral_app.state.store, referral_app.state.referral.policy
    with ThreadPoolExecutor(max_workers=4) as pool:
        reports = list(pool.map(lambda _: sweep(store, policy), range(4)))
    for task_id in tasks:
        assert len(events(engine, "referral.escalated", task=f"Task/{task_id}")) == 1
        assert sum(f"Task/{task_id}" in r.escalated for r in reports) == 1


async def test_r31_yilian_referral_sweep_command(http: httpx.AsyncClient, database_url: str, engine: sa.Engine,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main
    from service.config import get_settings

    patient = await new_patient(http)
    sent = await send(http, referral(patient["ref"]))
    task = await task_of(http, sent["id"])
    monkeypatch.setenv("YILIAN_DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        assert main(["referral", "sweep", "--now", (START + timedelta(hours=47)).isoformat()]) == 0
        assert f"escalated Task/{task['id']}" not in capsys.readouterr().out
        assert main(["referral", "sweep", "--now", (START + timedelta(hours=49)).isoformat()]) == 0
        assert f"escalated Task/{task['id']}" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()
    assert len(events(engine, "referral.escalated", task=f"Task/{task['id']}")) == 1


async def test_r31_the_app_runs_the_sweep_in_its_lifespan(referral_app: FastAPI) -> None:
    """Starting and stopping the app starts and stops the periodic sweep cleanly."""
    import asyncio

    def sweeps() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if "_periodically" in repr(t.get_coro()) and not t.done()]

    async with referral_app.router.lifespan_context(referral_app):
        assert len(sweeps()) == 1
    assert sweeps() == []
