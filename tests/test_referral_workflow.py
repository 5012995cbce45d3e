"""The referral Task's state machine, driven from the same table the code enforces
(service/referral/workflow.py TRANSITIONS): every legal step works for its side only, every
other move is refused with 422 naming from, to and who — on PUT, PATCH and transactions."""

from __future__ import annotations

from collections import deque
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from service.fhir.access import AccessContext
from service.fhir.errors import Unprocessable
from service.fhir.hooks import WriteHooks
from service.fhir.store import ResourceStore
from service.referral.hooks import register
from service.referral.policy import TASK_STATUSES
from service.referral.workflow import OWNER, REQUESTER, TRANSITIONS, Transition, find_transition
from tests.test_referral_support import (  # noqa: F401  (fixtures)
    CARDIOLOGY,
    HOSPITAL,
    QIAOTOU,
    SHANGZHAN,
    acting,
    assert_refused,
    clock,
    encounter,
    events,
    found_ids,
    http,
    issues_text,
    move,
    new_patient,
    referral,
    referral_app,
    reread,
    send,
    task_of,
)

SIDES = {OWNER: HOSPITAL, REQUESTER: SHANGZHAN}
STRANGER = QIAOTOU  # another clinic of the same alliance


def path_to(target: str) -> list[Transition]:
    """The shortest walk along TRANSITIONS from requested to ``target``."""
    queue: deque[tuple[str, list[Transition]]] = deque([("requested", [])])
    seen = {"requested"}
    while queue:
        status, walked = queue.popleft()
        if status == target:
            return walked
        for t in TRANSITIONS:
            if t.source == status and t.target not in seen:
                seen.add(t.target)
                queue.append((t.target, walked + [t]))
    raise AssertionError(f"{target} is unreachable")


REACHABLE = ["requested", *dict.fromkeys(t.target for t in TRANSITIONS)]


async def requirements(http: httpx.AsyncClient, task: dict[str, Any], step: str) -> dict[str, Any]:
    """What a step needs besides the status: a reason to reject, the result to complete."""
    if step == "reject":
        return {"statusReason": {"text": "本院无相应床位"}}
    if step == "complete":
        visit = await encounter(http, task["for"]["reference"], HOSPITAL)
        return {"output": [{"type": {"text": "就诊记录"}, "valueReference": {"reference": visit}}]}
    return {}


async def referral_task_in(http: httpx.AsyncClient, status: str) -> dict[str, Any]:
    patient = await new_patient(http, SHANGZHAN)
    sent = await send(http, referral(patient["ref"]))
    task = await task_of(http, sent["id"])
    for transition in path_to(status):
        response = await move(http, task, transition.target, SIDES[transition.actor],
                              **await requirements(http, task, transition.step))
        assert response.status_code == 200, f"{transition}: {response.text}"
        task = response.json()
    assert task["status"] == status
    return task


@pytest.mark.parametrize("transition", TRANSITIONS, ids=lambda t: f"{t.source}->{t.target}")
async def test_r30_every_step_of_the_table_works_for_its_side(http: httpx.AsyncClient, engine: sa.Engine,
                                                              transition: Transition) -> None:
    """Each (from, to) of the table, taken by its side, moves the Task, sets the business
    status, makes the referral follow, and tells the other side through the outbox."""
    task = await referral_task_in(http, transition.source)
    response = await move(http, task, transition.target, SIDES[transition.actor],
                          **await requirements(http, task, transition.step))
    assert response.status_code == 200, response.text
    moved = response.json()
    assert moved["status"] == transition.target and moved["businessStatus"]["coding"][0]["code"]
    referral_id = moved["focus"]["reference"].split("/")[1]
    expected = {"completed": "completed", "rejected": "revoked", "cancelled": "revoked", "failed": "revoked"}
    assert (await reread(http, "ServiceRequest", referral_id))["status"] == expected.get(transition.target, "active")
    told = events(engine, f"referral.{transition.target}", task=f"Task/{task['id']}", step=transition.step)
    assert [e["notify"] for e in told] == [SIDES[transition.notify]]


@pytest.mark.parametrize("source", REACHABLE)
async def test_r30_every_move_outside_the_table_is_refused_naming_from_to_and_who(
        http: httpx.AsyncClient, engine: sa.Engine, source: str) -> None:
    """From each reachable status: every status the table does not allow is refused for both
    sides; every allowed one is refused for the other side, a stranger and a caller naming no
    organization. Each refusal is 422 naming from, to and who, and writes nothing."""
    task = await referral_task_in(http, source)
    output_made = await requirements(http, task, "complete")  # written before counting events
    before = len(events(engine))
    attempts: list[tuple[str, str | None]] = []
    for target in TASK_STATUSES:
        if target == source:
            continue
        allowed = find_transition(source, target)
        if allowed is None:
            attempts += [(target, HOSPITAL), (target, SHANGZHAN)]
        else:
            wrong_side = SIDES[REQUESTER if allowed.actor == OWNER else OWNER]
            attempts += [(target, wrong_side), (target, STRANGER), (target, None)]
    output = output_made
    for target, org in attempts:
        response = await move(http, task, target, org, **output)
        assert_refused(response, source, target, org, side=org in SIDES.values())
    stored = await reread(http, "Task", task["id"])
    assert stored["status"] == source and stored["meta"]["versionId"] == task["meta"]["versionId"]
    assert len(events(engine)) == before


async def test_r31_reject_needs_a_reason(http: httpx.AsyncClient) -> None:
    task = await referral_task_in(http, "received")
    response = await move(http, task, "rejected", HOSPITAL)
    assert response.status_code == 422 and "Task.statusReason" in issues_text(response)


async def test_r41_completion_needs_an_encounter_or_a_discharge_or_consult_document(http: httpx.AsyncClient) -> None:
    task = await referral_task_in(http, "in-progress")
    patient = task["for"]["reference"]
    note = (await http.post("/DocumentReference", headers=acting(HOSPITAL), json={
        "resourceType": "DocumentReference", "status": "current", "subject": {"reference": patient},
        "type": {"coding": [{"system": "http://loinc.org", "code": "34108-1"}], "text": "门诊病历"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "5b2V"}}]})).json()
    wrong = [{"type": {"text": "病历"}, "valueReference": {"reference": f"DocumentReference/{note['id']}"}}]
    response = await move(http, task, "completed", HOSPITAL, output=wrong)
    assert response.status_code == 422 and "18842-5" in issues_text(response)
    consult_body = {k: v for k, v in note.items() if k not in ("id", "meta")}
    consult_body["type"] = {"coding": [{"system": "http://loinc.org", "code": "11488-4"}], "text": "会诊记录"}
    consult = (await http.post("/DocumentReference", headers=acting(HOSPITAL), json=consult_body)).json()
    right = [{"type": {"text": "会诊记录"}, "valueReference": {"reference": f"DocumentReference/{consult['id']}"}}]
    response = await move(http, task, "completed", HOSPITAL, output=right)
    assert response.status_code == 200, response.text


async def test_r30_patch_and_transactions_obey_the_same_table(http: httpx.AsyncClient) -> None:
    task = await referral_task_in(http, "requested")
    patch = [{"op": "replace", "path": "/status", "value": "accepted"}]
    response = await http.patch(f"/Task/{task['id']}", json=patch,
                                headers={**acting(HOSPITAL), "Content-Type": "application/json-patch+json"})
    assert response.status_code == 422 and "requested" in issues_text(response)
    patch = [{"op": "replace", "path": "/status", "value": "received"}]
    response = await http.patch(f"/Task/{task['id']}", json=patch,
                                headers={**acting(CARDIOLOGY), "Content-Type": "application/json-patch+json"})
    assert response.status_code == 200, response.text
    task = response.json()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": dict({k: v for k, v in task.items() if k != "meta"}, status="in-progress"),
         "request": {"method": "PUT", "url": f"Task/{task['id']}"}}]}
    response = await http.post("", json=bundle, headers={**acting(HOSPITAL), "Content-Type": "application/fhir+json"})
    assert response.status_code == 422
    assert "received" in issues_text(response) and "in-progress" in issues_text(response)
    bundle["entry"][0]["resource"]["status"] = "accepted"
    response = await http.post("", json=bundle, headers={**acting(HOSPITAL), "Content-Type": "application/fhir+json"})
    assert response.status_code == 200, response.text
    assert (await reread(http, "Task", task["id"]))["status"] == "accepted"


async def test_r30_the_task_is_yilians_its_parties_fields_and_existence_are_fixed(http: httpx.AsyncClient) -> None:
    """Nobody redirects a Task (owner, focus ...), deletes it, or opens a second one; a stranger
    cannot even add a note; the sides can."""
    task = await referral_task_in(http, "requested")
    redirected = await move(http, task, "requested", SHANGZHAN, owner={"reference": QIAOTOU})
    assert redirected.status_code == 422 and "Task.owner" in issues_text(redirected)
    noted = await move(http, task, "requested", STRANGER, note=[{"text": "路过"}])
    assert noted.status_code in (403, 404)  # the workflow, or the organization boundary before it
    noted = await move(http, task, "requested", HOSPITAL, note=[{"text": "已电话联系患者"}])
    assert noted.status_code == 200, noted.text
    deleted = await http.delete(f"/Task/{task['id']}", headers=acting(SHANGZHAN))
    assert deleted.status_code == 422
    second = {k: v for k, v in task.items() if k not in ("meta", "id")}
    created = await http.post("/Task", json=second, headers=acting(SHANGZHAN))
    assert created.status_code == 422 and "Task.focus" in issues_text(created)
    assert await found_ids(http, "Task", SHANGZHAN, focus=task["focus"]["reference"]) == [task["id"]]


async def test_r30_the_referral_status_follows_its_task_and_sent_fields_are_fixed(http: httpx.AsyncClient) -> None:
    patient = await new_patient(http, SHANGZHAN)
    sent = await send(http, referral(patient["ref"]))
    body = {k: v for k, v in sent.items() if k != "meta"}
    for change, element in (({"status": "completed"}, "ServiceRequest.status"),
                            ({"status": "revoked"}, "ServiceRequest.status"),
                            ({"priority": "stat"}, "ServiceRequest.priority"),
                            ({"performer": [{"reference": QIAOTOU}]}, "ServiceRequest.performer")):
        response = await http.put(f"/ServiceRequest/{sent['id']}", json=dict(body, **change), headers=acting(SHANGZHAN))
        assert response.status_code == 422 and element in issues_text(response), response.text
    response = await http.delete(f"/ServiceRequest/{sent['id']}", headers=acting(SHANGZHAN))
    assert response.status_code == 422
    task = await task_of(http, sent["id"])
    response = await move(http, task, "cancelled", SHANGZHAN, statusReason={"text": "患者改变主意"})
    assert response.status_code == 200, response.text
    assert (await reread(http, "ServiceRequest", sent["id"]))["status"] == "revoked"


async def test_r30_without_an_organization_nobody_moves_a_referral_and_yilian_keeps_to_the_table(
        http: httpx.AsyncClient, referral_app: FastAPI) -> None:
    """The workflow alone (a store with the referral hooks and no access policy): a caller
    naming no organization may not take even a legal step; an internal caller may, but only
    along the table."""
    hooks = WriteHooks()
    register(hooks, referral_app.state.referral)
    store = ResourceStore(referral_app.state.engine, hooks=hooks, clock=referral_app.state.store.clock)
    task = await referral_task_in(http, "requested")
    body = {k: v for k, v in task.items() if k != "meta"}
    with pytest.raises(Unprocessable) as refused:
        store.update(AccessContext(client_id="anonymous"), "Task", task["id"], dict(body, status="received"))
    assert "no organization" in str(refused.value) and "requested" in str(refused.value)
    with pytest.raises(Unprocessable, match="cannot go from requested to completed"):
        store.update(AccessContext.internal("test"), "Task", task["id"], dict(body, status="completed"))
    moved = store.update(AccessContext.internal("test"), "Task", task["id"], dict(body, status="received"))
    assert moved.resource.as_dict()["businessStatus"]["coding"][0]["code"] == "awaiting-decision"
