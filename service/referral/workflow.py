"""The closed loop of a referral: its Task and the transitions it may make (BSeR-style).

A referral (ServiceRequest) is fulfilled by one Task that Yilian opens when the referral is
sent (:func:`open_referral_task`): ``code`` fulfill, ``focus`` the referral, ``requester`` the
referring institution, ``owner`` the receiving one. From then on the Task moves only along
:data:`TRANSITIONS`, whoever writes it and however (PUT, PATCH, transaction): the before-hook
calls :func:`check_transition` and :func:`apply_transition`. The tests walk the same table.

Who may move it: ``AccessContext.organization`` compared with the Task's ``owner`` and
``requester`` — a department (``partOf``) of an institution counts as that institution.
A caller without an organization (no ``X-Yilian-Organization`` header, no token naming one)
may not change a referral's state at all; internal callers (``ctx.system``: Yilian itself,
loaders, the sweep) skip the *who* check but never the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.fhir.errors import Forbidden, Unprocessable
from service.fhir.store import StoreTransaction, fhir_instant
from service.referral import _directory as directory
from service.referral._writes import create_checked
from service.referral.codes import (
    BUSINESS_STATUS,
    EXT_OVERDUE,
    EXT_SLA_DEADLINE,
    FLAG,
    TASK_CODE,
    TASK_INPUT,
    coding,
    concept,
    extension_value,
    has_tag,
    is_referral,
    ref_of,
    reference,
    set_extension,
    set_tag,
)
from service.referral.policy import Policy

OWNER, REQUESTER = "owner", "requester"


@dataclass(frozen=True)
class Transition:
    """One allowed move of a referral Task: a business step, who takes it, whom it tells."""

    step: str  # receive | accept | reject | start | hold | resume | complete | fail | cancel
    source: str
    target: str
    actor: str  # owner | requester
    notify: str  # owner | requester: who the outbox event is for
    rule: str


#: The referral Task's state machine (R30-R43; HL7 BSeR / AU eRequesting Task statuses).
TRANSITIONS: tuple[Transition, ...] = (
    Transition("receive", "requested", "received", OWNER, REQUESTER, "R30"),
    Transition("accept", "received", "accepted", OWNER, REQUESTER, "R24"),
    Transition("reject", "received", "rejected", OWNER, REQUESTER, "R31"),  # needs statusReason
    Transition("start", "accepted", "in-progress", OWNER, REQUESTER, "R24"),
    Transition("hold", "in-progress", "on-hold", OWNER, REQUESTER, "R41"),
    Transition("resume", "on-hold", "in-progress", OWNER, REQUESTER, "R41"),
    Transition("complete", "in-progress", "completed", OWNER, REQUESTER, "R41"),  # needs output: closes the loop
    Transition("fail", "in-progress", "failed", OWNER, REQUESTER, "R41"),  # the patient did not come
    Transition("cancel", "requested", "cancelled", REQUESTER, OWNER, "R30"),
    Transition("cancel", "received", "cancelled", REQUESTER, OWNER, "R30"),
    Transition("cancel", "accepted", "cancelled", REQUESTER, OWNER, "R30"),
)

#: Task.businessStatus per status: where the referral stands, in the desk's words.
BUSINESS_STATUSES: dict[str, tuple[str, str]] = {
    "requested": ("awaiting-receipt", "待接收"),
    "received": ("awaiting-decision", "待审核"),
    "accepted": ("awaiting-visit", "已接诊待就诊"),
    "rejected": ("rejected", "已拒绝"),
    "in-progress": ("in-care", "诊疗中"),
    "on-hold": ("paused", "暂停"),
    "completed": ("result-returned", "已回传结果（闭环）"),
    "failed": ("no-show", "患者未到"),
    "cancelled": ("cancelled-by-sender", "转出方已撤销"),
}

#: What the referral (ServiceRequest.status) becomes when its Task reaches these statuses.
REFERRAL_STATUS_AFTER: dict[str, str] = {
    "completed": "completed",
    "rejected": "revoked",
    "cancelled": "revoked",
    "failed": "revoked",
}

#: Task elements nobody but Yilian changes once the Task exists.
FIXED_ELEMENTS = ("focus", "for", "requester", "owner", "code", "basedOn", "intent", "priority", "authoredOn")


def find_transition(source: str | None, target: str | None) -> Transition | None:
    return next((t for t in TRANSITIONS if t.source == source and t.target == target), None)


def is_referral_task(tx: StoreTransaction, task: dict[str, Any] | None) -> bool:
    """A Task with code fulfill whose focus is a referral ServiceRequest."""
    if not task or "fulfill" not in [c.get("code") for c in (task.get("code") or {}).get("coding") or []
                                     if c.get("system") == TASK_CODE]:
        return False
    focus = ref_of(task.get("focus"))
    return bool(focus and focus.startswith("ServiceRequest/") and is_referral(directory.content(tx, focus)))


# -- opening the Task --------------------------------------------------------------------------

def open_referral_task(tx: StoreTransaction, policy: Policy, referral_id: str, referral: dict[str, Any],
                       sender: str, receiver: str, appointments: Sequence[str],
                       extra_inputs: Sequence[tuple[str, str, str]] = ()) -> str:
    """Create the referral's Task (status requested) as Yilian itself; returns ``Task/<id>``."""
    now = tx.clock()
    task: dict[str, Any] = {
        "resourceType": "Task",
        "basedOn": [reference(f"ServiceRequest/{referral_id}")],
        "status": "requested",
        "businessStatus": _business_status("requested"),
        "intent": "order",
        "priority": referral.get("priority", "routine"),
        "code": concept(TASK_CODE, "fulfill", "Fulfill the focal request"),
        "description": _description(referral),
        "focus": reference(f"ServiceRequest/{referral_id}"),
        "for": dict(referral["subject"]),
        "authoredOn": fhir_instant(now),
        "lastModified": fhir_instant(now),
        "requester": reference(sender, directory.display(directory.content(tx, sender))),
        "owner": reference(receiver, directory.display(directory.content(tx, receiver))),
    }
    set_extension(task, EXT_OVERDUE, {"valueBoolean": False})
    deadline = policy.deadline_for(task["priority"], "requested")
    if deadline:
        set_extension(task, EXT_SLA_DEADLINE, {"valueDateTime": fhir_instant(now + deadline.within)})
    for appointment in appointments:
        add_input(task, "appointment", "预约", appointment)  # R32: what was booked
    for code, display, target in extra_inputs:
        add_input(task, code, display, target)
    return create_checked(tx.as_system(), task)


def add_input(task: dict[str, Any], code: str, display: str, target: str) -> bool:
    """Reference ``target`` from the Task's input (once); False when it was already there."""
    inputs = task.setdefault("input", [])
    if any(ref_of(i.get("valueReference")) == target for i in inputs):
        return False
    inputs.append({"type": concept(TASK_INPUT, code, display), "valueReference": reference(target)})
    return True


def _description(referral: dict[str, Any]) -> str:
    code = ((referral.get("code") or {}).get("coding") or [{}])[0]
    direction = "上转" if any(c.get("code") == "up" for cat in referral.get("category") or []
                             for c in cat.get("coding") or []) else "下转"
    return f"{direction}：{code.get('display') or code.get('code') or ''}"


def _business_status(status: str) -> dict[str, Any]:
    code, display = BUSINESS_STATUSES[status]
    return {"coding": [coding(BUSINESS_STATUS, code, display)], "text": display}


# -- moving it ---------------------------------------------------------------------------------

def actor_roles(tx: StoreTransaction, task: dict[str, Any]) -> set[str]:
    """Which sides of the Task the caller acts for: {owner, requester}, possibly empty."""
    organization = tx.ctx.organization
    roles = set()
    if directory.is_within(tx, organization, ref_of(task.get("owner"))):
        roles.add(OWNER)
    if directory.is_within(tx, organization, ref_of(task.get("requester"))):
        roles.add(REQUESTER)
    return roles


def who(tx: StoreTransaction) -> str:
    if tx.ctx.system:
        return f"Yilian ({tx.ctx.client_id})"
    return tx.ctx.organization or "a caller acting for no organization (send X-Yilian-Organization)"


def check_transition(tx: StoreTransaction, policy: Policy, previous: dict[str, Any],
                     task: dict[str, Any]) -> Transition:
    """The transition ``previous`` → ``task`` if the table allows it for this caller, else 422."""
    source, target = previous.get("status"), task.get("status")
    transition = find_transition(source, target)
    if transition is None:
        allowed = [f"{t.target} ({t.actor})" for t in TRANSITIONS if t.source == source]
        raise Unprocessable(f"a referral Task cannot go from {source} to {target} ({who(tx)}); from {source} it may "
                            f"go to {', '.join(allowed) or 'nothing: it is closed'}", expression="Task.status")
    if not tx.ctx.system:
        roles = actor_roles(tx, previous)
        if transition.actor not in roles:
            side = ref_of(previous.get(transition.actor))
            raise Unprocessable(
                f"a referral Task goes from {source} to {target} ({transition.step}) only by its {transition.actor} "
                f"{side} or a department of it; {who(tx)} is "
                + (f"its {' and '.join(sorted(roles))}" if roles else "neither owner nor requester"),
                expression="Task.status")
    _check_requirements(tx, policy, transition, task)
    return transition


def _check_requirements(tx: StoreTransaction, policy: Policy, transition: Transition, task: dict[str, Any]) -> None:
    if transition.step == "reject":
        reason = task.get("statusReason") or {}
        if not (reason.get("text") or reason.get("coding")):
            raise Unprocessable("rejecting a referral needs a reason in Task.statusReason (R31)",
                                expression="Task.statusReason")
    if transition.step == "complete":
        results = [ref_of(o.get("valueReference")) for o in task.get("output") or []]
        if not any(result_closes_loop(tx, policy, r) for r in results if r):
            raise Unprocessable(
                "completing a referral needs its result in Task.output: a reference to the Encounter or to a "
                f"DocumentReference of type {_document_types(policy)}, so the sender gets it back (R41)",
                expression="Task.output")


def _document_types(policy: Policy) -> str:
    return " | ".join(f"{system}|{code}" for system, code in sorted(policy.completion_documents))


def result_closes_loop(tx: StoreTransaction, policy: Policy, target: str) -> bool:
    resource = directory.content(tx, target)
    if resource is None:
        return False
    if resource.get("resourceType") == "Encounter":
        return True
    if resource.get("resourceType") == "DocumentReference":
        types = {(c.get("system"), c.get("code")) for c in (resource.get("type") or {}).get("coding") or []}
        return bool(types & policy.completion_documents)
    return False


def apply_transition(tx: StoreTransaction, policy: Policy, previous: dict[str, Any], task: dict[str, Any],
                     transition: Transition) -> None:
    """What Yilian records with every move: business status, times, SLA deadline and flag."""
    now = tx.clock()
    task["businessStatus"] = _business_status(transition.target)
    task["lastModified"] = fhir_instant(now)
    period = dict(task.get("executionPeriod") or {})
    if transition.target == "in-progress" and "start" not in period:
        period["start"] = fhir_instant(now)
    if transition.target in ("completed", "failed", "cancelled", "rejected"):
        period.setdefault("start", fhir_instant(now))
        period["end"] = fhir_instant(now)
    if period:
        task["executionPeriod"] = period
    before = policy.deadline_for(previous.get("priority"), transition.source)
    after = policy.deadline_for(previous.get("priority"), transition.target)
    if after is None:
        set_extension(task, EXT_SLA_DEADLINE, None)
    elif after != before:  # a new step with its own clock (R24, R31)
        set_extension(task, EXT_SLA_DEADLINE, {"valueDateTime": fhir_instant(now + after.within)})
    if after is None or after != before:
        set_extension(task, EXT_OVERDUE, {"valueBoolean": False})
        set_tag(task, FLAG, "overdue", on=False)


def check_fixed_elements(previous: dict[str, Any], task: dict[str, Any]) -> None:
    changed = [name for name in FIXED_ELEMENTS if previous.get(name) != task.get(name)]
    if changed:
        raise Unprocessable(f"Task.{changed[0]} of a referral is fixed when Yilian opens it; to send the patient "
                            "elsewhere, cancel and send a new referral", expression=f"Task.{changed[0]}")


def keep_server_marks(tx: StoreTransaction, previous: dict[str, Any], task: dict[str, Any]) -> None:
    """A caller's update keeps what Yilian records as stored: business status, SLA deadline,
    overdue flag and tag (a transition then sets them anew); ``lastModified`` is now."""
    for name in ("businessStatus", "executionPeriod"):
        if name in previous:
            task[name] = previous[name]
        else:
            task.pop(name, None)
    task["lastModified"] = fhir_instant(tx.clock())
    for url, kind in ((EXT_SLA_DEADLINE, "DateTime"), (EXT_OVERDUE, "Boolean")):
        value = extension_value(previous, url, kind)
        set_extension(task, url, None if value is None else {f"value{kind}": value})
    set_tag(task, FLAG, "overdue", "超时", on=has_tag(previous, FLAG, "overdue"))


def check_who_edits(tx: StoreTransaction, previous: dict[str, Any]) -> None:
    """Edits that do not move the Task (notes, inputs) still come from one of its two sides."""
    if tx.ctx.system or actor_roles(tx, previous):
        return
    raise Forbidden(f"only the owner {ref_of(previous.get('owner'))} or the requester "
                    f"{ref_of(previous.get('requester'))} of a referral Task may change it; {who(tx)} is neither",
                    expression="Task")
