"""The referral workflow on every write path: the store's write hooks (R30-R43, R12a).

The hooks run inside the write's own transaction, whether the write came as REST create /
update / patch, inside a transaction or batch Bundle, or from Yilian itself, so the rules
below hold however a referral or its Task is written, and what they add (the Task, the
follow-up plan, outbox events) exists if and only if the write commits.

ServiceRequest (only referrals: category from ``CodeSystem/referral-direction``)
    before: check the profile (``StructureDefinition/referral``); when the referral is *sent*
    (created ``active``, or ``draft`` → ``active``): check the service against the direction,
    route it (fill ``performer``), apply the catalogue criteria (422 unless green channel or
    override reason), compute the deductible waiver. Afterwards the caller may not change
    status (it follows the Task), direction, subject, requester, performer, code or priority.
    after (sending): open the Task, link booked Appointments, draft the follow-up plan and bed
    request (down), emit ``referral.requested`` for the receiver; audit an override.
Task (only referral Tasks: code fulfill, focus a referral)
    before: the transition table of :mod:`workflow` and who may take each step.
    after: the referral's status follows; ``referral.<status>`` to the other side
    (``referral.completed`` with the result to the sender closes the loop).
Appointment
    after: one based on a referral is referenced from the referral's Task (``input``).
MedicationRequest
    before: R12a on prescriptions based on a referral; after: added to the draft plan.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.fhir.errors import Forbidden, Issue, Unprocessable
from service.fhir.hooks import WriteEvent, WriteHooks
from service.fhir.store import StoreTransaction, fhir_instant
from service.referral import _directory as directory
from service.referral import downward, insurance, routing, sla, workflow
from service.referral._writes import update_checked
from service.referral.codes import (
    DOWN,
    EXT_BED_REQUEST,
    EXT_DEDUCTIBLE_WAIVER,
    EXT_OVERRIDE_REASON,
    FLAG,
    PROFILE,
    SERVICE,
    UP,
    codes_in,
    direction_of,
    extension_value,
    has_tag,
    is_referral,
    ref_of,
    set_extension,
    set_tag,
)
from service.referral.policy import ReferralConfig, load_config

ROUTE_OPERATION = "https://yilian.example.org/fhir/OperationDefinition/ServiceRequest-route"
#: Referral elements fixed once it is sent (to send the patient elsewhere: cancel, send anew).
FIXED_AFTER_SEND = ("category", "subject", "requester", "performer", "code", "priority", "intent")
_FLAGS = {"green-channel": "绿色通道", "criteria-override": "超标准转诊"}  # tags only Yilian sets


def install(app: FastAPI, hooks: WriteHooks) -> None:
    """Plug the referral workflow into an app: hooks, ``$route``, the periodic SLA sweep.

    Loads and checks ``mappings/referral-*`` and the referral profile first: a malformed file
    stops the start with an error naming the file and the row or field.
    """
    config = load_config()
    register(hooks, config)
    app.state.referral = config
    from service.api.capability import register_operation

    register_operation("ServiceRequest", "route", ROUTE_OPERATION)
    sla.run_in_lifespan(app, config.policy)


def register(hooks: WriteHooks, config: ReferralConfig) -> None:
    """Register the hooks alone (the CLI's store needs them without an app)."""
    referrals = Referrals(config)
    hooks.before("ServiceRequest", referrals.service_request_before)
    hooks.after("ServiceRequest", referrals.service_request_after)
    hooks.before("Task", referrals.task_before)
    hooks.after("Task", referrals.task_after)
    hooks.after("Appointment", referrals.appointment_after)
    hooks.before("MedicationRequest", referrals.medication_request_before)
    hooks.after("MedicationRequest", referrals.medication_request_after)


def sending(new: dict[str, Any] | None, old: dict[str, Any] | None) -> bool:
    """The referral leaves the sender now: created active, or a draft becoming active."""
    return bool(new) and new.get("status") == "active" and (old is None or old.get("status") == "draft")


class Referrals:
    """The hooks, bound to the loaded policy, catalogue and profile."""

    def __init__(self, config: ReferralConfig) -> None:
        self.config = config
        self.policy = config.policy

    # -- ServiceRequest ------------------------------------------------------------------------

    def service_request_before(self, event: WriteEvent) -> None:
        tx, new, old = event.tx, event.resource, event.previous
        if not is_referral(new) and not is_referral(old):
            return
        if new is None:
            if not tx.ctx.system:
                raise Unprocessable("ServiceRequest: a referral is not deleted: its requester cancels its Task, "
                                    "its owner rejects it", expression="ServiceRequest")
            return
        if old is not None and is_referral(old) and direction_of(new) != direction_of(old):
            raise Unprocessable(f"ServiceRequest.category: the direction of a referral is fixed ({direction_of(old)})",
                                expression="ServiceRequest.category")
        issues = self.config.profile.check(new)
        if issues:
            raise Unprocessable(issues=issues)
        if not tx.ctx.system:
            if old is None and new.get("status") not in ("draft", "active"):
                raise Unprocessable(f"ServiceRequest.status: a referral is created as draft or active (sent), not "
                                    f"{new.get('status')}; its status then follows its Task",
                                    expression="ServiceRequest.status")
            if old is not None:
                self._check_caller_update(old, new)
        if sending(new, old):
            self._send(tx, new)

    def _check_caller_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        was, now = old.get("status"), new.get("status")
        if was != now and not (was == "draft" and now in ("active", "revoked")):
            raise Unprocessable(f"ServiceRequest.status of a referral follows its Task ({was} → {now} refused): "
                                "move the Task instead (the requester cancels it)", expression="ServiceRequest.status")
        if was != "draft":
            for name in FIXED_AFTER_SEND:
                if old.get(name) != new.get(name):
                    raise Unprocessable(f"ServiceRequest.{name} of a sent referral is fixed; to refer elsewhere, "
                                        "cancel its Task and send a new referral", expression=f"ServiceRequest.{name}")
        # what Yilian set stays as Yilian set it
        waiver = [e for e in old.get("extension") or [] if e.get("url") == EXT_DEDUCTIBLE_WAIVER]
        kept = {k: v for k, v in waiver[0].items() if k != "url"} if waiver else None
        set_extension(new, EXT_DEDUCTIBLE_WAIVER, kept)
        for flag, display in _FLAGS.items():
            set_tag(new, FLAG, flag, display, on=has_tag(old, FLAG, flag))
        if PROFILE in ((old.get("meta") or {}).get("profile") or []):
            _add_profile(new)

    def _send(self, tx: StoreTransaction, sr: dict[str, Any]) -> None:
        """Checks and completions when a referral is sent (R30-R34, R40-R41)."""
        policy = self.policy
        direction = direction_of(sr) or UP
        sr.setdefault("authoredOn", fhir_instant(tx.clock()))
        services = codes_in(sr.get("code"), SERVICE)
        if not set(services) & policy.services[direction]:
            allowed = ", ".join(sorted(policy.services[direction]))
            raise Unprocessable(f"ServiceRequest.code: a {direction} referral asks for one of {allowed} "
                                f"({policy.source}, services), not {', '.join(services)}",
                                expression="ServiceRequest.code")
        requester_org = directory.organization_of_role(tx, ref_of(sr.get("requester")))
        sender = directory.institution_of(tx, requester_org)
        if sender is None:
            raise Unprocessable(f"ServiceRequest.requester {ref_of(sr.get('requester'))} is no PractitionerRole of a "
                                "known organization here", expression="ServiceRequest.requester")
        if not tx.ctx.system and not directory.is_within(tx, tx.ctx.organization, sender):
            raise Forbidden(f"ServiceRequest.requester: a referral is sent by its requester's institution {sender} "
                            f"(or a department of it); {workflow.who(tx)} acts for another",
                            expression="ServiceRequest.requester")
        if direction == DOWN:
            downward.check_discharge_document(policy, sr)
        decision = routing.route(tx, self.config, sr)
        if decision.refused:
            raise Unprocessable(issues=[
                *(Issue("error", "business-rule", f"ServiceRequest.reasonCode: referral against the criteria: {reason}",
                        ("ServiceRequest.reasonCode",)) for reason in decision.assessment.reasons),
                Issue("error", "business-rule",
                      "ServiceRequest: send it with priority urgent/asap/stat for the green channel (R34), claim a "
                      "criterion (extension referral-criterion), or give an override reason (extension "
                      f"{EXT_OVERRIDE_REASON}), which is audited (R31)", ("ServiceRequest.extension",)),
            ])
        best = decision.candidates[0] if decision.candidates else None
        if direction == UP and not sr.get("performer") and best is not None:
            sr["performer"] = best.performers()
        if direction == DOWN:
            named = receiver_of(tx, sr)
            match = next((c for c in decision.candidates if c.organization == named), None) if named else best
            downward.address_to_team(sr, match)
        receiver = receiver_of(tx, sr)
        if receiver is None:
            raise Unprocessable("ServiceRequest.performer: no receiving institution: routing found no candidate "
                                f"({'; '.join(decision.assessment.reasons)}); name one in ServiceRequest.performer",
                                expression="ServiceRequest.performer")
        if receiver == sender:
            raise Unprocessable(f"ServiceRequest.performer: a referral goes to another institution, not back to "
                                f"{sender}", expression="ServiceRequest.performer")
        set_tag(sr, FLAG, "green-channel", "绿色通道", on=decision.green_channel)  # R34
        set_tag(sr, FLAG, "criteria-override", "超标准转诊",
                on=decision.against_criteria and not decision.green_channel and bool(decision.override_reason))
        set_extension(sr, EXT_DEDUCTIBLE_WAIVER, insurance.deductible_waiver(tx, policy, sr, sender, receiver))  # R33
        _add_profile(sr)

    def service_request_after(self, event: WriteEvent) -> None:
        new, old, tx = event.resource, event.previous, event.tx
        if not is_referral(new) or not sending(new, old):
            return
        assert new is not None
        referral_id = event.resource_id
        referral_ref = f"ServiceRequest/{referral_id}"
        if tx.referrers("Task", "focus", referral_ref, limit=1):
            raise Unprocessable("Yilian opens the Task of a referral itself when it is sent; do not send one",
                                expression="Task.focus")
        sender = directory.institution_of(tx, directory.organization_of_role(tx, ref_of(new.get("requester"))))
        receiver = receiver_of(tx, new)
        assert sender is not None and receiver is not None
        for prescription_id in tx.referrers("MedicationRequest", "based-on", referral_ref, limit=100):
            prescription = tx.current_content("MedicationRequest", prescription_id)
            downward.check_long_prescription(self.policy, prescription or {},
                                             where=f"MedicationRequest/{prescription_id}")  # R12a
        appointments = [f"Appointment/{i}" for i in tx.referrers("Appointment", "based-on", referral_ref, limit=20)]
        appointments += [r for r in (ref_of(s) for s in new.get("supportingInfo") or [])
                         if r and r.startswith("Appointment/") and r not in appointments
                         and directory.content(tx, r) is not None]
        extra: list[tuple[str, str, str]] = []
        if direction_of(new) == DOWN:
            plan = downward.draft_follow_up_plan(tx, self.policy, referral_id, new, receiver)  # R41
            extra.append(("follow-up-plan", "随访计划", plan))
            if extension_value(new, EXT_BED_REQUEST, "Boolean") is True:
                bed = downward.request_priority_bed(tx, self.policy, referral_id, new, receiver)  # R42
                extra.append(("bed-request", "床位申请", bed))
        task = workflow.open_referral_task(tx, self.policy, referral_id, new, sender, receiver, appointments, extra)
        override = extension_value(new, EXT_OVERRIDE_REASON, "String")
        tx.emit("referral.requested", {
            "referral": referral_ref, "task": task, "direction": direction_of(new), "priority": new.get("priority"),
            "service": codes_in(new.get("code"), SERVICE), "patient": ref_of(new.get("subject")),
            "sender": sender, "receiver": receiver, "notify": receiver,
            "greenChannel": has_tag(new, FLAG, "green-channel"), "appointments": appointments,
            "rule": "R30" if direction_of(new) == UP else "R40",
        })
        if has_tag(new, FLAG, "criteria-override"):
            record_override(tx, referral_ref, task, override or "", sender, receiver)

    # -- Task ----------------------------------------------------------------------------------

    def task_before(self, event: WriteEvent) -> None:
        tx, new, old = event.tx, event.resource, event.previous
        if old is None:
            if not tx.ctx.system and workflow.is_referral_task(tx, new):
                raise Unprocessable("Yilian opens the Task of a referral itself when the referral is sent; "
                                    "update that Task instead", expression="Task.focus")
            return
        if not workflow.is_referral_task(tx, old):
            return
        if new is None:
            if not tx.ctx.system:
                raise Unprocessable("a referral Task is not deleted: its requester cancels it, its owner rejects it",
                                    expression="Task")
            return
        if not tx.ctx.system:
            workflow.check_fixed_elements(old, new)
            workflow.keep_server_marks(tx, old, new)
        if old.get("status") != new.get("status"):
            transition = workflow.check_transition(tx, self.policy, old, new)
            workflow.apply_transition(tx, self.policy, old, new, transition)
        else:
            workflow.check_who_edits(tx, old)

    def task_after(self, event: WriteEvent) -> None:
        tx, new, old = event.tx, event.resource, event.previous
        if old is None or new is None or old.get("status") == new.get("status"):
            return
        transition = workflow.find_transition(old.get("status"), new.get("status"))
        if transition is None or not workflow.is_referral_task(tx, new):
            return
        referral_ref = ref_of(new.get("focus"))
        referral = directory.content(tx, referral_ref)
        follows = workflow.REFERRAL_STATUS_AFTER.get(transition.target)
        if referral is not None and follows and referral.get("status") != follows:
            referral["status"] = follows
            update_checked(tx.as_system(), referral)
        payload: dict[str, Any] = {
            "referral": referral_ref, "task": f"Task/{event.resource_id}", "step": transition.step,
            "from": transition.source, "to": transition.target, "by": workflow.who(tx),
            "sender": ref_of(new.get("requester")), "receiver": ref_of(new.get("owner")),
            "notify": ref_of(new.get(transition.notify)), "rule": transition.rule,
            "referralStatus": (referral or {}).get("status"),
        }
        if transition.target == "completed":  # the loop closes: the sender gets the result (R41)
            payload["outputs"] = [r for r in (ref_of(o.get("valueReference")) for o in new.get("output") or []) if r]
        if new.get("statusReason"):
            payload["statusReason"] = new["statusReason"].get("text") or new["statusReason"]
        tx.emit(f"referral.{transition.target}", payload)

    # -- Appointment and MedicationRequest -------------------------------------------------------

    def appointment_after(self, event: WriteEvent) -> None:
        """A booking for a referral (R32) is referenced from the referral's Task."""
        tx, new = event.tx, event.resource
        if new is None:
            return
        for based_on in new.get("basedOn") or []:
            referral_ref = ref_of(based_on)
            if not referral_ref or not referral_ref.startswith("ServiceRequest/"):
                continue
            if not is_referral(directory.content(tx, referral_ref)):
                continue
            for task_id in tx.referrers("Task", "focus", referral_ref, limit=1):
                task = tx.current_content("Task", task_id)
                if task is not None and workflow.add_input(task, "appointment", "预约",
                                                           f"Appointment/{event.resource_id}"):
                    update_checked(tx.as_system(), task)

    def medication_request_before(self, event: WriteEvent) -> None:
        if event.resource is not None and downward.referral_of_prescription(event.tx, event.resource):
            downward.check_long_prescription(self.policy, event.resource)  # R12a

    def medication_request_after(self, event: WriteEvent) -> None:
        if event.resource is None:
            return
        found = downward.referral_of_prescription(event.tx, event.resource)
        if found is not None and direction_of(found[1]) == DOWN:
            downward.link_prescription(event.tx, found[0], f"MedicationRequest/{event.resource_id}")


def receiver_of(tx: StoreTransaction, sr: dict[str, Any]) -> str | None:
    """The receiving institution: of the first Organization performer, else of a CareTeam's."""
    for performer in sr.get("performer") or []:
        ref = ref_of(performer)
        if ref and ref.startswith("Organization/"):
            return directory.institution_of(tx, ref)
    for performer in sr.get("performer") or []:
        ref = ref_of(performer)
        if ref and ref.startswith("CareTeam/"):
            team = directory.content(tx, ref) or {}
            managing = ref_of((team.get("managingOrganization") or [None])[0])
            if managing:
                return directory.institution_of(tx, managing)
    return None


def record_override(tx: StoreTransaction, referral: str, task: str, reason: str, sender: str, receiver: str) -> None:
    """Audit a referral sent against the criteria with an override reason (R31): an AuditEvent
    (service/security/audit.py) in the same transaction, and ``referral.override`` in the outbox
    for the referral desk. Without the security package, the outbox event alone."""
    tx.emit("referral.override", {"referral": referral, "task": task, "reason": reason, "by": workflow.who(tx),
                                  "sender": sender, "receiver": receiver, "notify": sender, "rule": "R31"})
    try:
        from service.security.audit import audit_event, patient_entity, resource_entity
    except ImportError:  # pragma: no cover - deployments without the security package
        return
    patient = ref_of((directory.content(tx, referral) or {}).get("subject"))
    entities = [resource_entity(referral), resource_entity(task)] + ([patient_entity(patient)] if patient else [])
    event = audit_event(subtype="create", action="C", status=201, ctx=tx.ctx, entities=entities,
                        recorded=tx.clock(),
                        description=f"referral sent against the catalogue criteria (R31); override reason: {reason}")
    tx.as_system("referral").create(event)


def _add_profile(resource: dict[str, Any]) -> None:
    meta = dict(resource.get("meta") or {})
    profiles = list(meta.get("profile") or [])
    if PROFILE not in profiles:
        profiles.append(PROFILE)
    meta["profile"] = profiles
    resource["meta"] = meta
