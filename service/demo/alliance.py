"""A demo medical alliance (医联体) in Yangquan, Shanxi, as one FHIR R4 transaction Bundle.

Why it exists: a developer, a tester or a sales demo needs a realistic alliance to click
through — a lead hospital with departments, three grassroots institutions with "3+X"
family-doctor teams, and residents with valid resident IDs, insurance and chronic
conditions — without touching real patient data.

Design:

- Deterministic: everything random comes from one ``random.Random(seed)`` and dates are
  relative to the fixed :data:`AS_OF`, never to today, so the same seed gives the same bytes.
- Idempotent to load: every entry is ``PUT Type/<stable-id>``; loading twice updates in
  place. Ids are readable (``Organization/alliance-yq``) so docs and tests can name them.
- Self-contained: every reference is a relative ``Type/id`` to another entry of the bundle.
- Data-driven: the institutions, departments and conditions are the module-level tuples
  below; the builder functions only turn them into resources.
"""

from __future__ import annotations

import copy
import random
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from service.demo import codes
from service.demo.codes import concept, org_type, role, specialty
from service.demo.names import NameGenerator, PersonName
from service.demo.resident_id import make_resident_id

Resource = dict[str, Any]

#: "Today" for the demo: ages, coverage periods and onset dates are computed from it.
AS_OF = date(2026, 1, 1)
DEFAULT_SEED = 2026
DEFAULT_PATIENTS = 40

PROVINCE = "山西省"
CITY = "阳泉市"
PHONE_AREA_CODE = "0353"
POSTAL_CODE = "045000"
#: Namespace of the entries' ``urn:uuid`` fullUrls (uuid5 of ``Type/id``: stable per resource).
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, codes.BASE + "/demo")


@dataclass(frozen=True)
class District:
    """A county-level division; ``code`` (GB/T 2260) is also the area code of resident IDs."""

    code: str
    name: str


DISTRICTS: dict[str, District] = {
    "chengqu": District("140302", "城区"),
    "kuangqu": District("140303", "矿区"),
    "jiaoqu": District("140311", "郊区"),
}


@dataclass(frozen=True)
class Department:
    key: str  # used in ids and as the key of codes.SPECIALTIES
    name: str
    location: str  # where its outpatient clinic is inside the hospital
    specialists: int


@dataclass(frozen=True)
class Clinic:
    """A grassroots institution (基层医疗卫生机构) and where its residents live."""

    key: str
    name: str
    kind: str  # codes.ORGANIZATION_TYPES: community-health-center | township-hospital
    district: str  # key of DISTRICTS
    line: str
    #: streets (urban) or villages (rural) of its catchment area, for patient addresses
    streets: tuple[str, ...]
    rural: bool
    #: the lead-hospital department whose specialist is the "X" of its 3+X team
    x_department: str


@dataclass(frozen=True)
class ConditionRule:
    """A chronic condition and how likely a patient of a given age has it (R6, R13)."""

    icd10: str
    name: str  # Chinese name, used as display and text
    min_age: int
    chance_by_age: tuple[tuple[int, float], ...]  # (from age, probability), ascending
    sex: str | None = None


ALLIANCE_ID = "alliance-yq"
ALLIANCE_NAME = "阳泉市第一人民医院医疗联合体"
ALLIANCE_ALIAS = "阳泉城市医疗集团"
HOSPITAL_ID = "hospital-yq1"
HOSPITAL_NAME = "阳泉市第一人民医院"
HOSPITAL_ALIAS = "阳泉一院"
HOSPITAL_DISTRICT = "chengqu"
HOSPITAL_LINE = "北大街217号"
INSURER_ID = "insurer-yq"
INSURER_NAME = "阳泉市医疗保障局"
INSURER_LINE = "桃北西街9号"

DEPARTMENTS: tuple[Department, ...] = (
    Department("cardiology", "心内科", "门诊楼3层东区", 2),
    Department("endocrinology", "内分泌科", "门诊楼3层西区", 2),
    Department("orthopaedics", "骨科", "门诊楼2层东区", 1),
    Department("rehabilitation", "康复科", "康复楼1层", 1),
)

CLINICS: tuple[Clinic, ...] = (
    Clinic("shangzhan", "上站街道社区卫生服务中心", "community-health-center", "chengqu",
           "桃北中路25号", ("桃北中路", "南大街", "德胜街", "东风路"), False, "cardiology"),
    Clinic("qiaotou", "桥头街道社区卫生服务中心", "community-health-center", "kuangqu",
           "赛鱼路116号", ("赛鱼路", "桥头街", "北大西街", "平坦垴路"), False, "endocrinology"),
    Clinic("hedi", "河底镇卫生院", "township-hospital", "jiaoqu",
           "河底镇河底村1号", ("河底镇河底村", "河底镇燕龛村", "河底镇苏家庄村", "河底镇上白泉村"), True,
           "rehabilitation"),
)
GPS_PER_CLINIC = 2

CONDITION_RULES: tuple[ConditionRule, ...] = (
    ConditionRule("I10", "原发性高血压", 35, ((35, 0.12), (55, 0.35), (65, 0.5))),
    ConditionRule("E11", "2型糖尿病", 35, ((35, 0.05), (55, 0.15), (65, 0.22))),
    ConditionRule("N40", "前列腺增生", 55, ((55, 0.2), (70, 0.35)), sex="male"),
    ConditionRule("M17", "膝关节病", 50, ((50, 0.08), (65, 0.15))),
    ConditionRule("I69.3", "脑梗死后遗症", 55, ((55, 0.04), (70, 0.08))),
)

#: (minimum age, maximum age, weight): skewed to the elderly, who are most of a family
#: doctor's contracted residents (R6), but with children 0-6 and working-age adults too.
AGE_BANDS: tuple[tuple[int, int, int], ...] = (
    (0, 6, 2), (7, 17, 2), (18, 44, 6), (45, 64, 10), (65, 90, 12),
)

WEEKDAYS = ["mon", "tue", "wed", "thu", "fri"]


# --- small helpers -----------------------------------------------------------------------

def ref(resource_type: str, rid: str, display: str | None = None) -> dict[str, str]:
    r = {"reference": f"{resource_type}/{rid}"}
    if display:
        r["display"] = display
    return r


def _meta() -> dict[str, Any]:
    return {"tag": [dict(codes.DEMO_TAG)]}


def _address(district: District, line: str, use: str, postal: bool = True) -> dict[str, Any]:
    addr: dict[str, Any] = {
        "use": use,
        "type": "physical",
        "text": f"{PROVINCE}{CITY}{district.name}{line}",
        "line": [line],
        "city": CITY,
        "district": district.name,
        "state": PROVINCE,
        "country": "CN",
    }
    if postal:
        addr["postalCode"] = POSTAL_CODE
    return addr


def _phone(value: str, use: str) -> dict[str, str]:
    return {"system": "phone", "value": value, "use": use}


def _name(person: PersonName) -> dict[str, Any]:
    return {"use": "official", "text": person.text, "family": person.family, "given": [person.given]}


def _age(birth: date, on: date = AS_OF) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _working_hours(start: str = "08:00:00", end: str = "17:30:00") -> list[dict[str, Any]]:
    return [{"daysOfWeek": list(WEEKDAYS), "availableStartTime": start, "availableEndTime": end}]


# --- organizations and places ------------------------------------------------------------

def _organizations(gen: NameGenerator) -> list[Resource]:
    city = DISTRICTS[HOSPITAL_DISTRICT]
    out: list[Resource] = [
        {
            "resourceType": "Organization", "id": ALLIANCE_ID, "meta": _meta(), "active": True,
            "type": [org_type("alliance")], "name": ALLIANCE_NAME, "alias": [ALLIANCE_ALIAS],
            "telecom": [_phone(gen.landline(PHONE_AREA_CODE), "work")],
            "address": [_address(city, HOSPITAL_LINE, "work")],
        },
        {
            "resourceType": "Organization", "id": INSURER_ID, "meta": _meta(), "active": True,
            "type": [
                {"coding": [codes.coding(codes.ORGANIZATION_TYPE, "insurance-bureau", "医疗保障局"),
                            codes.coding(codes.HL7_ORG_TYPE, "pay", "Payer")], "text": "医疗保障局"},
            ],
            "name": INSURER_NAME,
            "telecom": [_phone(gen.landline(PHONE_AREA_CODE), "work")],
            "address": [_address(city, INSURER_LINE, "work")],
        },
        {
            "resourceType": "Organization", "id": HOSPITAL_ID, "meta": _meta(), "active": True,
            "type": [
                {"coding": [codes.coding(codes.ORGANIZATION_TYPE, "hospital", "医院"),
                            codes.coding(codes.HL7_ORG_TYPE, "prov", "Healthcare Provider")], "text": "医院"},
                org_type("tertiary"),
            ],
            "name": HOSPITAL_NAME, "alias": [HOSPITAL_ALIAS],
            "telecom": [_phone(gen.landline(PHONE_AREA_CODE), "work")],
            "address": [_address(city, HOSPITAL_LINE, "work")],
            "partOf": ref("Organization", ALLIANCE_ID, ALLIANCE_NAME),
        },
    ]
    for dept in DEPARTMENTS:
        out.append({
            "resourceType": "Organization", "id": _dept_id(dept), "meta": _meta(), "active": True,
            "type": [{"coding": [codes.coding(codes.ORGANIZATION_TYPE, "department", "临床科室"),
                                 codes.coding(codes.HL7_ORG_TYPE, "dept", "Hospital Department")],
                      "text": "临床科室"}],
            "name": f"{HOSPITAL_NAME}{dept.name}",
            "telecom": [_phone(gen.landline(PHONE_AREA_CODE), "work")],
            "partOf": ref("Organization", HOSPITAL_ID, HOSPITAL_NAME),
        })
    for clinic in CLINICS:
        out.append({
            "resourceType": "Organization", "id": _clinic_id(clinic), "meta": _meta(), "active": True,
            "type": [
                {"coding": [codes.coding(codes.ORGANIZATION_TYPE, clinic.kind, codes.ORGANIZATION_TYPES[clinic.kind]),
                            codes.coding(codes.HL7_ORG_TYPE, "prov", "Healthcare Provider")],
                 "text": codes.ORGANIZATION_TYPES[clinic.kind]},
                org_type("primary"),
            ],
            "name": clinic.name,
            "telecom": [_phone(gen.landline(PHONE_AREA_CODE), "work")],
            "address": [_address(DISTRICTS[clinic.district], clinic.line, "work")],
            "partOf": ref("Organization", ALLIANCE_ID, ALLIANCE_NAME),
        })
    return out


def _dept_id(dept: Department) -> str:
    return f"dept-yq1-{dept.key}"


def _clinic_id(clinic: Clinic) -> str:
    return f"clinic-yq-{clinic.key}"


def _physical(code: str, display: str) -> dict[str, Any]:
    return concept(codes.HL7_LOCATION_PHYSICAL_TYPE, code, display)


def _locations() -> list[Resource]:
    city = DISTRICTS[HOSPITAL_DISTRICT]
    out: list[Resource] = [{
        "resourceType": "Location", "id": "loc-yq1-main", "meta": _meta(), "status": "active", "mode": "instance",
        "name": f"{HOSPITAL_NAME}院本部", "address": _address(city, HOSPITAL_LINE, "work"),
        "physicalType": _physical("si", "Site"),
        "managingOrganization": ref("Organization", HOSPITAL_ID, HOSPITAL_NAME),
    }]
    for dept in DEPARTMENTS:
        out.append({
            "resourceType": "Location", "id": f"loc-yq1-{dept.key}", "meta": _meta(), "status": "active",
            "mode": "instance", "name": f"{dept.name}门诊", "description": f"{HOSPITAL_NAME}{dept.location}",
            "address": _address(city, HOSPITAL_LINE, "work"), "physicalType": _physical("wi", "Wing"),
            "managingOrganization": ref("Organization", _dept_id(dept), f"{HOSPITAL_NAME}{dept.name}"),
            "partOf": ref("Location", "loc-yq1-main"),
        })
    for clinic in CLINICS:
        out.append({
            "resourceType": "Location", "id": f"loc-yq-{clinic.key}", "meta": _meta(), "status": "active",
            "mode": "instance", "name": clinic.name,
            "address": _address(DISTRICTS[clinic.district], clinic.line, "work"), "physicalType": _physical("bu", "Building"),
            "managingOrganization": ref("Organization", _clinic_id(clinic), clinic.name),
        })
    return out


def _healthcare_services(orgs: dict[str, Resource]) -> list[Resource]:
    out: list[Resource] = []
    for dept in DEPARTMENTS:
        org = orgs[_dept_id(dept)]
        out.append({
            "resourceType": "HealthcareService", "id": f"hcs-yq1-{dept.key}", "meta": _meta(), "active": True,
            "providedBy": ref("Organization", org["id"], org["name"]),
            "type": [{"text": f"{dept.name}专家门诊"}],
            "specialty": [specialty(dept.key, dept.name)],
            "location": [ref("Location", f"loc-yq1-{dept.key}")],
            "name": f"{dept.name}专家门诊",
            "comment": "预留25%优质专家号源供家庭医生转诊预约（R20）",
            "telecom": copy.deepcopy(org["telecom"]),
            "appointmentRequired": True,
            "availableTime": _working_hours(),
        })
    for clinic in CLINICS:
        out.append({
            "resourceType": "HealthcareService", "id": f"hcs-yq-{clinic.key}-family-doctor", "meta": _meta(),
            "active": True, "providedBy": ref("Organization", _clinic_id(clinic), clinic.name),
            "type": [{"text": "家庭医生签约服务"}],
            "specialty": [specialty("general-practice", "全科医疗科")],
            "location": [ref("Location", f"loc-yq-{clinic.key}")],
            "name": f"{clinic.name}家庭医生签约服务",
            "comment": "基础签约服务包：常见病多发病诊疗、转诊引导、上级医院预约、基本公共卫生服务（R5）",
            "telecom": copy.deepcopy(orgs[_clinic_id(clinic)]["telecom"]),
            "appointmentRequired": False,
            "availableTime": _working_hours(),
        })
    return out


# --- people ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Staff:
    """One practitioner and the single role the demo gives them."""

    id: str  # shared by the Practitioner and its PractitionerRole
    name: PersonName
    sex: str
    role_code: str  # codes.PRACTITIONER_ROLES
    organization: tuple[str, str]  # (id, name)
    location: str
    service: str
    specialty: dict[str, Any]


def _staff(gen: NameGenerator) -> list[Staff]:
    rng = gen.rng
    staff: list[Staff] = []

    def person(sex_chance_male: float) -> tuple[PersonName, str]:
        sex = "male" if rng.random() < sex_chance_male else "female"
        return gen.name(sex, rng.randint(1965, 1995)), sex

    for dept in DEPARTMENTS:
        for n in range(1, dept.specialists + 1):
            name, sex = person(0.55)
            staff.append(Staff(f"spec-yq1-{dept.key}-{n}", name, sex, "specialist",
                               (_dept_id(dept), f"{HOSPITAL_NAME}{dept.name}"),
                               f"loc-yq1-{dept.key}", f"hcs-yq1-{dept.key}", specialty(dept.key, dept.name)))
    for clinic in CLINICS:
        org = (_clinic_id(clinic), clinic.name)
        loc, hcs = f"loc-yq-{clinic.key}", f"hcs-yq-{clinic.key}-family-doctor"
        for n in range(1, GPS_PER_CLINIC + 1):
            name, sex = person(0.5)
            staff.append(Staff(f"gp-yq-{clinic.key}-{n}", name, sex, "family-doctor", org, loc, hcs,
                               specialty("general-practice", "全科医学")))
        name, sex = person(0.1)
        staff.append(Staff(f"nurse-yq-{clinic.key}", name, sex, "community-nurse", org, loc, hcs,
                           specialty("general-practice", "社区护理")))
        name, sex = person(0.5)
        staff.append(Staff(f"phs-yq-{clinic.key}", name, sex, "public-health", org, loc, hcs,
                           specialty("preventive-medicine", "基本公共卫生服务")))
    return staff


def _practitioner_resources(gen: NameGenerator, staff: list[Staff]) -> tuple[list[Resource], list[Resource]]:
    rng = gen.rng
    practitioners: list[Resource] = []
    roles: list[Resource] = []
    for s in staff:
        is_nurse = s.role_code == "community-nurse"
        practitioners.append({
            "resourceType": "Practitioner", "id": s.id, "meta": _meta(), "active": True,
            "identifier": [{"use": "official", "type": {"text": "执业证书编码"},
                            "system": codes.PRACTITIONER_LICENSE_SID,
                            "value": f"{rng.randrange(10**14, 10**15)}"}],
            "name": [_name(s.name)], "gender": s.sex,
            "telecom": [_phone(gen.mobile(), "mobile")],
            "qualification": [{"code": {"text": "执业护士" if is_nurse else "执业医师"}}],
        })
        hl7 = "nurse" if is_nurse else ("doctor" if s.role_code in ("family-doctor", "specialist") else None)
        roles.append({
            "resourceType": "PractitionerRole", "id": s.id, "meta": _meta(), "active": True,
            "period": {"start": "2024-01-01"},
            "practitioner": ref("Practitioner", s.id, s.name.text),
            "organization": ref("Organization", *s.organization),
            "code": [role(s.role_code, hl7)],
            "specialty": [s.specialty],
            "location": [ref("Location", s.location)],
            "healthcareService": [ref("HealthcareService", s.service)],
            "telecom": copy.deepcopy(practitioners[-1]["telecom"]),
            "availableTime": _working_hours(),
        })
    return practitioners, roles


def _care_teams(staff: list[Staff]) -> list[Resource]:
    """One "3+X" team (家庭健康责任团队) per grassroots institution: its GPs, nurse and
    public-health staff ("3") plus a lead-hospital specialist ("X")."""
    by_id = {s.id: s for s in staff}
    out: list[Resource] = []
    for clinic in CLINICS:
        members = [f"gp-yq-{clinic.key}-{n}" for n in range(1, GPS_PER_CLINIC + 1)]
        members += [f"nurse-yq-{clinic.key}", f"phs-yq-{clinic.key}", f"spec-yq1-{clinic.x_department}-1"]
        out.append({
            "resourceType": "CareTeam", "id": f"team-yq-{clinic.key}", "meta": _meta(), "status": "active",
            "category": [concept(codes.LOINC, "LA28865-6", "Longitudinal care-coordination focused care team")],
            "name": f"{clinic.name}家庭医生团队（3+X）",
            "period": {"start": "2024-01-01"},
            # the participant is a PractitionerRole, which already names the organization
            # (ctm-1 forbids onBehalfOf unless the member is a Practitioner)
            "participant": [
                {"role": [role(by_id[m].role_code)],
                 "member": ref("PractitionerRole", m, by_id[m].name.text),
                 "period": {"start": "2024-01-01"}}
                for m in members
            ],
            "managingOrganization": [ref("Organization", _clinic_id(clinic), clinic.name)],
            "note": [{"text": "3：全科医生 + 社区护士 + 公共卫生人员；X：牵头医院专科医生"}],
        })
    return out


@dataclass(frozen=True)
class _Patient:
    id: str
    sex: str
    birth: date
    clinic: Clinic
    gp: str


def _birth_date(rng: random.Random) -> date:
    low, high, _ = rng.choices(AGE_BANDS, [w for *_, w in AGE_BANDS])[0]
    age = rng.randint(low, high)
    return AS_OF - timedelta(days=age * 365 + rng.randrange(1, 365) + age // 4)


def _patients(gen: NameGenerator, count: int, gp_names: dict[str, str]) -> tuple[list[Resource], list[_Patient]]:
    rng = gen.rng
    resources: list[Resource] = []
    facts: list[_Patient] = []
    used_ids: set[str] = set()
    used_insurance: set[str] = set()
    for i in range(count):
        clinic = CLINICS[i % len(CLINICS)]
        gp = f"gp-yq-{clinic.key}-{(i // len(CLINICS)) % GPS_PER_CLINIC + 1}"
        district = DISTRICTS[clinic.district]
        sex = rng.choice(("male", "female"))
        birth = _birth_date(rng)
        name = gen.name(sex, birth.year)
        while True:
            resident_id = make_resident_id(district.code, birth, rng.randint(1, 499), sex)
            if resident_id not in used_ids:
                used_ids.add(resident_id)
                break
        while True:
            insurance_no = f"{district.code[:4]}{rng.randrange(10**11, 10**12)}"
            if insurance_no not in used_insurance:
                used_insurance.add(insurance_no)
                break
        street = rng.choice(clinic.streets)
        if clinic.rural:
            line = f"{street}{rng.randint(1, 180)}号"
        else:
            line = (f"{street}{rng.randint(1, 300)}号{rng.randint(1, 12)}号楼{rng.randint(1, 4)}单元"
                    f"{rng.randint(1, 6)}0{rng.randint(1, 4)}室")
        pid = f"patient-yq-{i + 1:03d}"
        resources.append({
            "resourceType": "Patient", "id": pid, "meta": _meta(), "active": True,
            "identifier": [
                {"use": "official", "type": {"text": "居民身份证"}, "system": codes.RESIDENT_ID_SID, "value": resident_id},
                {"use": "secondary", "type": {"text": "医保编号"}, "system": codes.MEDICAL_INSURANCE_SID,
                 "value": insurance_no},
            ],
            "name": [_name(name)],
            "telecom": [_phone(gen.mobile(), "mobile")],
            "gender": sex,
            "birthDate": birth.isoformat(),
            "address": [_address(district, line, "home", postal=not clinic.rural)],
            "communication": [{"language": concept("urn:ietf:bcp:47", "zh-CN", "Chinese (China)", "中文"),
                               "preferred": True}],
            "generalPractitioner": [ref("PractitionerRole", gp, gp_names[gp])],
            "managingOrganization": ref("Organization", _clinic_id(clinic), clinic.name),
        })
        facts.append(_Patient(pid, sex, birth, clinic, gp))
    return resources, facts


def _coverages(rng: random.Random, patients: list[Resource], facts: list[_Patient]) -> list[Resource]:
    out: list[Resource] = []
    for patient, fact in zip(patients, facts, strict=True):
        age = _age(fact.birth)
        employee = (18 <= age < 60 and rng.random() < 0.6) or (age >= 60 and rng.random() < 0.45)
        kind = "urban-employee" if employee else "urban-rural-resident"
        insurance_no = patient["identifier"][1]["value"]
        out.append({
            "resourceType": "Coverage", "id": f"coverage-{fact.id.removeprefix('patient-')}", "meta": _meta(),
            "status": "active",
            "identifier": [{"use": "official", "system": codes.MEDICAL_INSURANCE_SID, "value": insurance_no}],
            "type": concept(codes.COVERAGE_TYPE, kind, codes.COVERAGE_TYPES[kind], codes.COVERAGE_TYPES[kind]),
            "subscriber": ref("Patient", fact.id, patient["name"][0]["text"]),
            "subscriberId": insurance_no,
            "beneficiary": ref("Patient", fact.id, patient["name"][0]["text"]),
            "relationship": concept(codes.HL7_SUBSCRIBER_RELATIONSHIP, "self", "Self"),
            "period": {"start": f"{AS_OF.year}-01-01", "end": f"{AS_OF.year}-12-31"},
            "payor": [ref("Organization", INSURER_ID, INSURER_NAME)],
        })
    return out


def _chance(rule: ConditionRule, age: int) -> float:
    p = 0.0
    for from_age, chance in rule.chance_by_age:
        if age >= from_age:
            p = chance
    return p


def _conditions(rng: random.Random, facts: list[_Patient], gp_names: dict[str, str]) -> list[Resource]:
    out: list[Resource] = []
    for fact in facts:
        age = _age(fact.birth)
        for rule in CONDITION_RULES:
            if age < rule.min_age or (rule.sex and rule.sex != fact.sex):
                continue
            if rng.random() >= _chance(rule, age):
                continue
            onset = fact.birth + timedelta(days=365 * rng.randint(rule.min_age, age) + rng.randrange(365))
            onset = min(onset, AS_OF - timedelta(days=30))
            recorded = min(onset + timedelta(days=rng.randrange(0, 60)), AS_OF - timedelta(days=1))
            out.append({
                "resourceType": "Condition",
                "id": f"condition-{fact.id.removeprefix('patient-')}-{rule.icd10.lower().replace('.', '')}",
                "meta": _meta(),
                "clinicalStatus": concept(codes.HL7_CONDITION_CLINICAL, "active", "Active"),
                "verificationStatus": concept(codes.HL7_CONDITION_VER_STATUS, "confirmed", "Confirmed"),
                "category": [concept(codes.HL7_CONDITION_CATEGORY, "problem-list-item", "Problem List Item")],
                "code": concept(codes.ICD10, rule.icd10, rule.name, rule.name),
                "subject": ref("Patient", fact.id),
                "onsetDateTime": onset.isoformat(),
                "recordedDate": recorded.isoformat(),
                "recorder": ref("PractitionerRole", fact.gp, gp_names[fact.gp]),
                "asserter": ref("PractitionerRole", fact.gp, gp_names[fact.gp]),
            })
    return out


# --- the bundle --------------------------------------------------------------------------

def demo_resources(seed: int = DEFAULT_SEED, *, patients: int = DEFAULT_PATIENTS) -> list[Resource]:
    """All demo resources, referenced things before the things that reference them."""
    rng = random.Random(seed)
    gen = NameGenerator(rng)
    orgs = _organizations(gen)
    locations = _locations()
    services = _healthcare_services({o["id"]: o for o in orgs})
    staff = _staff(gen)
    practitioners, roles = _practitioner_resources(gen, staff)
    teams = _care_teams(staff)
    gp_names = {s.id: s.name.text for s in staff}
    people, facts = _patients(gen, patients, gp_names)
    coverages = _coverages(rng, people, facts)
    conditions = _conditions(rng, facts, gp_names)
    return [*orgs, *locations, *services, *practitioners, *roles, *teams, *people, *coverages, *conditions]


def full_url(resource: Resource) -> str:
    """The entry's ``urn:uuid`` fullUrl: uuid5 of ``Type/id``, the same on every run."""
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, resource['resourceType'] + '/' + resource['id'])}"


def demo_bundle(seed: int = DEFAULT_SEED, *, patients: int = DEFAULT_PATIENTS) -> dict[str, Any]:
    """The demo alliance as one FHIR R4 ``transaction`` Bundle of ``PUT Type/id`` entries.

    Deterministic for ``seed``; loading it twice leaves the server in the same state.
    """
    if not 1 <= patients <= 999:
        raise ValueError("patients must be within 1..999")
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "meta": _meta(),
        "entry": [
            {
                "fullUrl": full_url(r),
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in demo_resources(seed, patients=patients)
        ],
    }
