"""Where capacity belongs and who is asking: organizations, alliances, departments.

An alliance is an Organization typed ``alliance``; its members point at it through
``partOf`` (a department → its hospital → the alliance). A grassroots institution carries
the level ``primary`` as a second ``type`` (codes of ``organization-type``, see the demo).
The organization look-ups themselves are :mod:`service.directory`'s (shared with referral).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.capacity._fhir import (
    KIND_SYSTEM,
    KINDS,
    codes_of,
    first_token,
    ref_of,
)
from service.directory import alliance_in, content, org_chain, type_codes
from service.fhir.store import StoreTransaction

__all__ = ["Placement", "alliance_in", "bed_placement", "content", "hospital_of", "is_grassroots", "org_chain",
           "schedule_placement", "type_codes"]

HOSPITAL_CODES = {"hospital", "secondary", "tertiary"}


def hospital_of(chain: list[tuple[str, dict[str, Any]]]) -> str | None:
    return next((ref for ref, org in chain if type_codes(org) & HOSPITAL_CODES), None)


def is_grassroots(chain: list[tuple[str, dict[str, Any]]]) -> bool:
    """The organization, or one it belongs to below the alliance, is at level ``primary``."""
    for _ref, org in chain:
        codes = type_codes(org)
        if "alliance" in codes:
            return False
        if "primary" in codes:
            return True
    return False


@dataclass(frozen=True)
class Placement:
    """Where a schedule's (or a bed's) capacity belongs, for policy, matching and reports."""

    alliance: str | None
    organization: str | None  # the hospital
    department: str | None  # HealthcareService, else the department Organization
    kind: str  # specialist | outpatient | exam | inpatient
    specialty: str | None
    service_type: str | None
    actors: tuple[dict[str, Any], ...] = ()  # the schedule's actors, for Appointment participants


def _placement_from_org(tx: StoreTransaction, org_ref: str | None, department: str | None, kind: str,
                        specialty: str | None, service_type: str | None,
                        actors: tuple[dict[str, Any], ...]) -> Placement:
    chain = org_chain(tx, org_ref)
    hospital = hospital_of(chain)
    if department is None and chain and org_ref != hospital:
        department = org_ref  # a department Organization below its hospital
    return Placement(alliance_in(chain), hospital or org_ref, department, kind, specialty, service_type, actors)


def schedule_placement(tx: StoreTransaction, schedule: dict[str, Any]) -> Placement:
    """Follow the Schedule's actors to the department and hospital it belongs to.

    HealthcareService → providedBy; PractitionerRole → organization (and healthcareService);
    Location → managingOrganization; Practitioner → its PractitionerRole. The kind comes from
    a ``capacity-kind`` coding in ``serviceCategory`` (default ``specialist``, R20)."""
    kinds = [k for k in codes_of(schedule.get("serviceCategory"), KIND_SYSTEM) if k in KINDS]
    kind = kinds[0] if kinds else "specialist"
    service: str | None = None
    org_ref: str | None = None
    actors = tuple(a for a in schedule.get("actor", []) if isinstance(a, dict))
    for actor in actors:
        reference = ref_of(actor) or ""
        resource = content(tx, reference)
        if resource is None:
            continue
        rtype = reference.split("/", 1)[0]
        if rtype == "HealthcareService":
            service = service or reference
            org_ref = org_ref or ref_of(resource.get("providedBy"))
        elif rtype == "PractitionerRole":
            services = [ref_of(s) for s in resource.get("healthcareService", [])]
            service = service or next((s for s in services if s), None)
            org_ref = org_ref or ref_of(resource.get("organization"))
        elif rtype == "Location":
            org_ref = org_ref or ref_of(resource.get("managingOrganization"))
        elif rtype == "Practitioner":
            roles = tx.find("PractitionerRole", f"practitioner={reference}", limit=1)
            role = content(tx, f"PractitionerRole/{roles[0]}") if roles else None
            if role:
                services = [ref_of(s) for s in role.get("healthcareService", [])]
                service = service or next((s for s in services if s), None)
                org_ref = org_ref or ref_of(role.get("organization"))
    if service and not org_ref:
        org_ref = ref_of((content(tx, service) or {}).get("providedBy"))
    return _placement_from_org(tx, org_ref, service, kind, first_token(schedule.get("specialty")),
                               first_token(schedule.get("serviceType")), actors)


def bed_placement(tx: StoreTransaction, bed: dict[str, Any]) -> Placement:
    """A bed belongs to the organization managing it (or its ward)."""
    org_ref = ref_of(bed.get("managingOrganization"))
    if org_ref is None:
        ward = content(tx, ref_of(bed.get("partOf")))
        org_ref = ref_of((ward or {}).get("managingOrganization"))
    return _placement_from_org(tx, org_ref, None, "inpatient", None, first_token(bed.get("type")), ())
