"""Downward referral: the hand-back to the contracted family doctor (R40-R43, R12a).

When a hospital sends a ``down`` referral at discharge, Yilian

* addresses it to the contracted team (performer: the grassroots institution + CareTeam,
  from routing.route_downward) — :func:`address_to_team`;
* drafts a follow-up CarePlan for that team (:func:`draft_follow_up_plan`): follow-up visits
  on the policy's days, the referral's own service (rehabilitation, nursing, home care, R43),
  and the long prescriptions that come with it;
* when the referral asks for it (extension ``referral-bed-request``), opens a priority bed
  request at the institution (:func:`request_priority_bed`, R42).

Long prescriptions (R12a): a MedicationRequest whose ``basedOn`` names a referral (either
direction) may cover at most ``long_prescription.max_weeks`` (12) through
``dispenseRequest.expectedSupplyDuration``; more is refused with 422. Shorter ones are
ordinary prescriptions and pass. Other MedicationRequests are not this package's business.
The check runs when the MedicationRequest is written and again when its referral is sent
(a transaction may hold the prescription before the referral).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from service.fhir.errors import Unprocessable
from service.fhir.store import StoreTransaction, fhir_instant
from service.referral import _directory as directory
from service.referral._writes import create_checked, update_checked
from service.referral.codes import (
    CAREPLAN_CATEGORY,
    FLAG,
    FOLLOW_UP_PLAN_SID,
    SERVICE,
    codes_in,
    coding,
    concept,
    is_referral,
    ref_of,
    reference,
)
from service.referral.policy import Policy
from service.referral.routing import Candidate

_UNIT_DAYS = {"d": 1, "day": 1, "days": 1, "天": 1, "wk": 7, "week": 7, "weeks": 7, "周": 7,
              "mo": 30, "month": 30, "months": 30, "月": 30, "h": 1 / 24, "hour": 1 / 24, "hours": 1 / 24}
_ACTIVITY = {  # the referral's own service as a CarePlan activity (R41, R43)
    "rehabilitation": ("ServiceRequest", "康复训练"),
    "nursing": ("ServiceRequest", "社区护理"),
    "home-care": ("ServiceRequest", "居家服务 / 家庭病床（R43）"),
    "admission": ("ServiceRequest", "基层机构住院（R42）"),
}


def address_to_team(referral: dict[str, Any], candidate: Candidate | None) -> None:
    """Fill the performer with the institution and team, or add the team to the institution named."""
    if candidate is None:
        return
    performers = referral.get("performer") or []
    if not performers:
        referral["performer"] = candidate.performers()
        return
    named = {ref_of(p) for p in performers}
    if candidate.organization in named and candidate.care_team and not any(
            (r or "").startswith("CareTeam/") for r in named):
        performers.append(reference(candidate.care_team, candidate.care_team_name))
        referral["performer"] = performers


def team_of(referral: dict[str, Any]) -> str | None:
    return next((r for r in (ref_of(p) for p in referral.get("performer") or []) if r and r.startswith("CareTeam/")),
                None)


def check_discharge_document(policy: Policy, referral: dict[str, Any]) -> None:
    """A down referral carries the discharge information for the team (R41)."""
    if not policy.require_discharge_document:
        return
    if not any((ref_of(s) or "").startswith("DocumentReference/") for s in referral.get("supportingInfo") or []):
        raise Unprocessable("a downward referral carries the discharge summary: add a DocumentReference to "
                            "ServiceRequest.supportingInfo (R41)", expression="ServiceRequest.supportingInfo")


def draft_follow_up_plan(tx: StoreTransaction, policy: Policy, referral_id: str, referral: dict[str, Any],
                         receiver: str) -> str:
    """A draft CarePlan for the contracted team (R41); returns ``CarePlan/<id>``."""
    now = tx.clock()
    team = team_of(referral)
    performers = [reference(team)] if team else [reference(receiver)]
    activities: list[dict[str, Any]] = []
    for day in policy.follow_up_days:
        start = now + timedelta(days=day)
        activities.append({"detail": {
            "kind": "Appointment", "code": concept(SERVICE, "follow-up", "随访"), "status": "not-started",
            "scheduledPeriod": {"start": start.date().isoformat()}, "performer": performers,
            "description": f"出院后第{day}天随访（R41）",
        }})
    for code in codes_in(referral.get("code"), SERVICE):
        if code in _ACTIVITY:
            kind, text = _ACTIVITY[code]
            activities.append({"detail": {"kind": kind, "code": concept(SERVICE, code), "status": "not-started",
                                          "performer": performers, "description": text}})
    for prescription in tx.referrers("MedicationRequest", "based-on", f"ServiceRequest/{referral_id}", limit=100):
        activities.append({"reference": reference(f"MedicationRequest/{prescription}")})
    plan: dict[str, Any] = {
        "resourceType": "CarePlan",
        "identifier": [{"system": FOLLOW_UP_PLAN_SID, "value": referral_id}],
        "status": "draft",
        "intent": "plan",
        "category": [concept(CAREPLAN_CATEGORY, "referral-follow-up", "下转随访计划")],
        "title": "下转随访计划",
        "description": "Yilian drafted this plan from the downward referral; the family-doctor team completes and "
                       "activates it (R41).",
        "subject": dict(referral["subject"]),
        "created": fhir_instant(now),
        "author": reference(receiver),
        "supportingInfo": [reference(f"ServiceRequest/{referral_id}"),
                           *[dict(s) for s in referral.get("supportingInfo") or [] if ref_of(s)]],
        "activity": activities,
    }
    if team:
        plan["careTeam"] = [reference(team)]
    return create_checked(tx.as_system(), plan)


def request_priority_bed(tx: StoreTransaction, policy: Policy, referral_id: str, referral: dict[str, Any],
                         receiver: str) -> str:
    """A bed request at the grassroots institution, tagged priority-bed (R42)."""
    request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "meta": {"tag": [coding(FLAG, "priority-bed", "优先床位")]},
        "basedOn": [reference(f"ServiceRequest/{referral_id}")],
        "status": "active",
        "intent": "order",
        "priority": policy.bed_request_priority,
        "code": concept(SERVICE, "admission", "住院"),
        "subject": dict(referral["subject"]),
        "authoredOn": fhir_instant(tx.clock()),
        "requester": dict(referral["requester"]),
        "performer": [reference(receiver)],
        "reasonCode": [dict(r) for r in referral.get("reasonCode") or []],
        "note": [{"text": "下转患者优先收治（R42）"}],
    }
    return create_checked(tx.as_system(), request)


# -- long prescriptions (R12a) -----------------------------------------------------------------

def referral_of_prescription(tx: StoreTransaction, prescription: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for based_on in prescription.get("basedOn") or []:
        ref = ref_of(based_on)
        if ref and ref.startswith("ServiceRequest/"):
            referral = directory.content(tx, ref)
            if is_referral(referral):
                return ref, referral  # type: ignore[return-value]
    return None


def check_long_prescription(policy: Policy, prescription: dict[str, Any], *, where: str = "MedicationRequest") -> None:
    """At most ``max_weeks`` of supply on a referral's prescription (R12a), else 422."""
    duration = ((prescription.get("dispenseRequest") or {}).get("expectedSupplyDuration"))
    if not duration:
        return
    expression = f"{where}.dispenseRequest.expectedSupplyDuration"
    unit = str(duration.get("code") or duration.get("unit") or "").strip().lower()
    value = duration.get("value")
    if unit not in _UNIT_DAYS or not isinstance(value, (int, float)):
        raise Unprocessable(f"{expression}: give the supply as a number of d, wk or mo (UCUM), not "
                            f"{value!r} {unit!r} (R12a)", expression=expression)
    days = value * _UNIT_DAYS[unit]
    if days > policy.long_prescription_max.days:
        weeks = policy.long_prescription_max.days // 7
        raise Unprocessable(f"{expression}: {value} {unit} ({days:g} days) is longer than the {weeks} weeks a long "
                            f"prescription of a referred patient may cover (R12a)", expression=expression)


def link_prescription(tx: StoreTransaction, referral_ref: str, prescription_ref: str) -> None:
    """Add a referral's prescription to its draft follow-up CarePlan, if one exists (R41)."""
    referral_id = referral_ref.split("/", 1)[1]
    for plan_id in tx.find("CarePlan", f"identifier={FOLLOW_UP_PLAN_SID}|{referral_id}", limit=1):
        plan = tx.current_content("CarePlan", plan_id)
        if plan is None or plan.get("status") != "draft":
            continue
        if any(ref_of(a.get("reference")) == prescription_ref for a in plan.get("activity") or []):
            continue
        plan.setdefault("activity", []).append({"reference": reference(prescription_ref)})
        update_checked(tx.as_system(), plan)
