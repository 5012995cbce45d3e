"""The URLs and codes of the referral workflow, in one place (defined in ``fhir_profiles/``)."""

from __future__ import annotations

from typing import Any

BASE = "https://yilian.example.org/fhir"

# -- our code systems -------------------------------------------------------------------------
DIRECTION = f"{BASE}/CodeSystem/referral-direction"  # up | down
SERVICE = f"{BASE}/CodeSystem/referral-service"  # outpatient-specialist | exam | admission | ... (R43)
CRITERION = f"{BASE}/CodeSystem/referral-criterion"
FLAG = f"{BASE}/CodeSystem/referral-flag"  # meta.tag: green-channel | criteria-override | overdue | priority-bed
BUSINESS_STATUS = f"{BASE}/CodeSystem/referral-business-status"
TASK_INPUT = f"{BASE}/CodeSystem/referral-task-input"
CAREPLAN_CATEGORY = f"{BASE}/CodeSystem/careplan-category"
ORGANIZATION_TYPE = f"{BASE}/CodeSystem/organization-type"  # the demo's; levels primary | secondary | tertiary
COVERAGE_TYPE = f"{BASE}/CodeSystem/coverage-type"
FOLLOW_UP_PLAN_SID = f"{BASE}/sid/referral-follow-up-plan"  # CarePlan.identifier: value = the referral's id

# -- our profile and extensions ---------------------------------------------------------------
PROFILE = f"{BASE}/StructureDefinition/referral"
EXT_OVERRIDE_REASON = f"{BASE}/StructureDefinition/referral-override-reason"
EXT_CRITERION = f"{BASE}/StructureDefinition/referral-criterion"
EXT_BED_REQUEST = f"{BASE}/StructureDefinition/referral-bed-request"
EXT_DEDUCTIBLE_WAIVER = f"{BASE}/StructureDefinition/referral-deductible-waiver"
EXT_SLA_DEADLINE = f"{BASE}/StructureDefinition/referral-sla-deadline"
EXT_OVERDUE = f"{BASE}/StructureDefinition/referral-overdue"

#: Extensions and tags only Yilian sets: a caller's update keeps the stored ones, whatever it sends.
SERVER_EXTENSIONS = frozenset({EXT_DEDUCTIBLE_WAIVER, EXT_SLA_DEADLINE, EXT_OVERDUE})

# -- external systems -------------------------------------------------------------------------
SNOMED = "http://snomed.info/sct"
PATIENT_REFERRAL = "3457005"  # SNOMED CT: Patient referral (procedure)
ICD10 = "http://hl7.org/fhir/sid/icd-10"
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
HL7_ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"

UP, DOWN = "up", "down"
LEVELS = ("primary", "secondary", "tertiary")


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"coding": [coding(system, code, display)]}


def codes_in(value: Any, system: str) -> list[str]:
    """Codes of ``system`` in a CodeableConcept, a list of them, or a Coding."""
    if isinstance(value, list):
        return [code for item in value for code in codes_in(item, system)]
    if not isinstance(value, dict):
        return []
    if "coding" in value:
        return codes_in(value.get("coding"), system)
    return [value["code"]] if value.get("system") == system and isinstance(value.get("code"), str) else []


def ref_of(value: Any) -> str | None:
    """The literal ``Type/id`` of a Reference (None for logical or absent references)."""
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        reference = value["reference"]
        parts = reference.split("/")
        if len(parts) >= 2 and "_history" in parts:
            at = parts.index("_history")
            parts = parts[:at]
        if len(parts) >= 2 and parts[-2][:1].isupper():
            return f"{parts[-2]}/{parts[-1]}"
    return None


def reference(target: str, display: str | None = None) -> dict[str, str]:
    r = {"reference": target}
    if display:
        r["display"] = display
    return r


def extensions(resource: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in resource.get("extension") or [] if isinstance(e, dict) and e.get("url") == url]


def extension_value(resource: dict[str, Any], url: str, kind: str) -> Any:
    found = extensions(resource, url)
    return found[0].get(f"value{kind}") if found else None


def set_extension(resource: dict[str, Any], url: str, extension: dict[str, Any] | None) -> None:
    """Replace every extension ``url`` with ``extension`` (None removes them)."""
    kept = [e for e in resource.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == url)]
    if extension is not None:
        kept.append({"url": url, **extension})
    if kept:
        resource["extension"] = kept
    else:
        resource.pop("extension", None)


def has_tag(resource: dict[str, Any], system: str, code: str) -> bool:
    tags = (resource.get("meta") or {}).get("tag") or []
    return any(t.get("system") == system and t.get("code") == code for t in tags)


def set_tag(resource: dict[str, Any], system: str, code: str, display: str | None = None, *, on: bool = True) -> None:
    meta = dict(resource.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if not (t.get("system") == system and t.get("code") == code)]
    if on:
        tags.append(coding(system, code, display))
    if tags:
        meta["tag"] = tags
    else:
        meta.pop("tag", None)
    resource["meta"] = meta


def direction_of(service_request: dict[str, Any] | None) -> str | None:
    """``up`` / ``down`` for a referral, None for any other ServiceRequest."""
    if not service_request:
        return None
    found = codes_in(service_request.get("category"), DIRECTION)
    return found[0] if found else None


def is_referral(service_request: dict[str, Any] | None) -> bool:
    """A referral is a ServiceRequest whose category carries the referral-direction system."""
    if not service_request:
        return False
    return any(c.get("system") == DIRECTION for cat in service_request.get("category") or [] if isinstance(cat, dict)
               for c in cat.get("coding") or [] if isinstance(c, dict))
