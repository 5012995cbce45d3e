"""Code systems the demo data uses: ours (``https://yilian.example.org/fhir/...``) and the
external ones, in one place so the server side can register the same URLs.

Our CodeSystems are small and local on purpose: the FHIR R4 bindings they fill
(``Organization.type``, ``Coverage.type``, ``PractitionerRole.code``,
``CareTeam.participant.role``) are *example* bindings, so local codes are allowed, and no
international code system says "medical alliance" or "urban-rural resident insurance".
Every element with a *required* binding uses the R4 code instead (see the tests).
"""

from __future__ import annotations

from typing import Any

BASE = "https://yilian.example.org/fhir"

# --- our systems -------------------------------------------------------------------------
ORGANIZATION_TYPE = f"{BASE}/CodeSystem/organization-type"
COVERAGE_TYPE = f"{BASE}/CodeSystem/coverage-type"
PRACTITIONER_ROLE = f"{BASE}/CodeSystem/practitioner-role"
DATA_ORIGIN = f"{BASE}/CodeSystem/data-origin"
MEDICAL_INSURANCE_SID = f"{BASE}/sid/medical-insurance"
PRACTITIONER_LICENSE_SID = f"{BASE}/sid/practitioner-license"

# --- external systems --------------------------------------------------------------------
RESIDENT_ID_SID = "urn:oid:2.16.156.10011.1.1"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
HL7_ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
HL7_PRACTITIONER_ROLE = "http://terminology.hl7.org/CodeSystem/practitioner-role"
HL7_LOCATION_PHYSICAL_TYPE = "http://terminology.hl7.org/CodeSystem/location-physical-type"
HL7_CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
HL7_CONDITION_VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
HL7_CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
HL7_SUBSCRIBER_RELATIONSHIP = "http://terminology.hl7.org/CodeSystem/subscriber-relationship"

#: ``organization-type``: the kind of institution and, as a second ``type``, its level.
ORGANIZATION_TYPES: dict[str, str] = {
    "alliance": "医疗联合体",
    "hospital": "医院",
    "community-health-center": "社区卫生服务中心",
    "township-hospital": "乡镇卫生院",
    "department": "临床科室",
    "insurance-bureau": "医疗保障局",
    # levels (分级): the grade of a hospital or grassroots institution
    "primary": "基层（一级）",
    "secondary": "二级",
    "tertiary": "三级",
}

#: ``coverage-type``: the two basic medical-insurance schemes.
COVERAGE_TYPES: dict[str, str] = {
    "urban-employee": "城镇职工基本医疗保险",
    "urban-rural-resident": "城乡居民基本医疗保险",
}

#: ``practitioner-role``: the roles of a "3+X" family-doctor team (domain.md, Actors).
PRACTITIONER_ROLES: dict[str, str] = {
    "family-doctor": "家庭医生（全科医生）",
    "community-nurse": "社区护士",
    "public-health": "公共卫生人员",
    "specialist": "专科医生",
}

#: SNOMED CT practice-setting codes (``c80-practice-codes``, the preferred binding of
#: ``PractitionerRole.specialty`` / ``HealthcareService.specialty``).
SPECIALTIES: dict[str, tuple[str, str]] = {
    "cardiology": ("394579002", "Cardiology"),
    "endocrinology": ("394583002", "Endocrinology"),
    "orthopaedics": ("394801008", "Trauma & orthopaedics"),
    "rehabilitation": ("394602003", "Rehabilitation - specialty"),
    "general-practice": ("394814009", "General practice"),
    "preventive-medicine": ("409968004", "Preventive medicine"),
}


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def concept(system: str, code: str, display: str | None = None, text: str | None = None) -> dict[str, Any]:
    cc: dict[str, Any] = {"coding": [coding(system, code, display)]}
    if text:
        cc["text"] = text
    return cc


def org_type(code: str) -> dict[str, Any]:
    """A CodeableConcept from our ``organization-type`` system, with the Chinese display."""
    display = ORGANIZATION_TYPES[code]
    return concept(ORGANIZATION_TYPE, code, display, display)


def specialty(key: str, text: str) -> dict[str, Any]:
    code, display = SPECIALTIES[key]
    return concept(SNOMED, code, display, text)


def role(code: str, hl7_code: str | None = None) -> dict[str, Any]:
    """A PractitionerRole.code: ours, plus the HL7 ``doctor``/``nurse`` code when one fits."""
    display = PRACTITIONER_ROLES[code]
    cc: dict[str, Any] = {"coding": [coding(PRACTITIONER_ROLE, code, display)], "text": display}
    if hl7_code:
        cc["coding"].append(coding(HL7_PRACTITIONER_ROLE, hl7_code, hl7_code.capitalize()))
    return cc


DEMO_TAG = coding(DATA_ORIGIN, "demo", "演示数据")
"""``meta.tag`` on every demo resource, so demo data can be found and purged."""
