"""The demo alliance bundle (service.demo) and the resident-ID helpers.

The demo is what people first see of Yilian, and what end-to-end tests load: it must be
valid FHIR R4, self-contained (every reference resolves inside the bundle), deterministic,
and carry resident IDs a real GB 11643 validator accepts.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from datetime import date
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from service.demo import check_character, demo_bundle, make_resident_id
from service.demo import codes
from service.demo.alliance import AS_OF, CLINICS, DEPARTMENTS, DISTRICTS
from service.demo.resident_id import birth_date_of, is_valid, order_code, sex_of


@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return demo_bundle()


@pytest.fixture(scope="module")
def resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"]]


def of_type(resources: list[dict[str, Any]], rtype: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["resourceType"] == rtype]


def by_ref(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{r['resourceType']}/{r['id']}": r for r in resources}


def type_codes(org: dict[str, Any]) -> set[str]:
    return {c["code"] for t in org.get("type", []) for c in t.get("coding", [])
            if c["system"] == codes.ORGANIZATION_TYPE}


# --- resident ID (GB 11643-1999) ---------------------------------------------------------

def _mod11_2_ok(resident_id: str) -> bool:
    """Independent check (ISO 7064 MOD 11-2): with weights 2**(17-i) mod 11 over all 18
    characters, X counting 10, a valid number sums to 1 mod 11."""
    values = [10 if ch == "X" else int(ch) for ch in resident_id]
    return sum(v * pow(2, 17 - i, 11) for i, v in enumerate(values)) % 11 == 1


@pytest.mark.parametrize("resident_id", [
    "11010519491231002X",  # the example of GB 11643-1999
    "440524188001010014",  # the other example of the standard
    "140302195907080284",
])
def test_check_character_of_known_valid_ids(resident_id: str) -> None:
    assert check_character(resident_id[:17]) == resident_id[17]
    assert is_valid(resident_id)
    assert _mod11_2_ok(resident_id)


def test_check_character_agrees_with_the_mod11_2_definition() -> None:
    rng = random.Random(11643)
    seen = Counter()
    for _ in range(2000):
        first17 = "".join(rng.choice("0123456789") for _ in range(17))
        c = check_character(first17)
        seen[c] += 1
        assert _mod11_2_ok(first17 + c)
    assert set(seen) == set("0123456789X")  # every check character occurs, X included


@pytest.mark.parametrize("bad", ["11010519491231002X", "1101051949123100", "1101051949123100a", "１１０１０５１９４９１２３１００２"])
def test_check_character_rejects_malformed_input(bad: str) -> None:
    with pytest.raises(ValueError):
        check_character(bad)


def test_is_valid_rejects_wrong_check_character_and_impossible_dates() -> None:
    assert not is_valid("110105194912310021")
    month13 = "11010519491331002"
    assert not is_valid(month13 + check_character(month13))  # right check character, no such date
    assert not is_valid("11010519491231002x")  # lower-case x is not the standard form


def test_make_resident_id_layout() -> None:
    born = date(1988, 2, 29)
    male = make_resident_id("140302", born, 12, "male")
    female = make_resident_id("140302", born, 12, "female")
    assert male[:6] == female[:6] == "140302"
    assert male[6:14] == "19880229"
    assert male[14:17] == "023" and female[14:17] == "024"
    assert int(male[16]) % 2 == 1 and int(female[16]) % 2 == 0  # 17th digit: odd male, even female
    assert is_valid(male) and is_valid(female)
    assert sex_of(male) == "male" and sex_of(female) == "female"
    assert birth_date_of(male) == born


def test_order_codes_cover_the_range_without_overlap() -> None:
    males = {order_code(s, "male") for s in range(1, 500)}
    females = {order_code(s, "female") for s in range(1, 500)}
    assert len(males) == len(females) == 499 and not males & females
    assert min(males) == "001" and max(females) == "998"


@pytest.mark.parametrize("args", [
    ("14030", date(2000, 1, 1), 1, "male"),
    ("140302", date(2000, 1, 1), 0, "male"),
    ("140302", date(2000, 1, 1), 500, "female"),
    ("140302", date(2000, 1, 1), 1, "unknown"),
])
def test_make_resident_id_rejects_bad_arguments(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        make_resident_id(*args)


# --- the bundle as FHIR ------------------------------------------------------------------

def test_bundle_is_a_transaction_of_puts_with_stable_ids(bundle: dict[str, Any]) -> None:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    for e in bundle["entry"]:
        r = e["resource"]
        assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", e["fullUrl"])
        assert e["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
        assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", r["id"])
        assert codes.DEMO_TAG in r["meta"]["tag"]
    urls = [e["request"]["url"] for e in bundle["entry"]]
    assert len(set(urls)) == len(urls)
    assert "Organization/alliance-yq" in urls


def test_every_resource_validates_with_fhir_resources_r4b(bundle: dict[str, Any]) -> None:
    get_fhir_model_class("Bundle").model_validate(bundle)
    validated = [get_fhir_model_class(e["resource"]["resourceType"]).model_validate(e["resource"])
                 for e in bundle["entry"]]  # model_validate raises on any invalid resource
    assert len(validated) == len(bundle["entry"]) > 0


def _walk(node: Any, key: str = "") -> Any:
    """Yield (key, dict) for every object inside ``node`` with the key it hangs under."""
    if isinstance(node, dict):
        yield key, node
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def test_every_reference_resolves_inside_the_bundle(resources: list[dict[str, Any]]) -> None:
    known = set(by_ref(resources))
    refs = [obj["reference"] for r in resources for _, obj in _walk(r) if "reference" in obj]
    assert refs
    for ref in refs:
        assert re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", ref), ref
        assert ref in known, f"{ref} is not in the bundle"


#: Values allowed by the R4 required bindings the demo touches (fhir.resources checks
#: structure and cardinality but not codes).
REQUIRED_CODES: dict[str, set[str]] = {
    "gender": {"male", "female", "other", "unknown"},
    "telecom.system": {"phone", "fax", "email", "pager", "url", "sms", "other"},
    "telecom.use": {"home", "work", "temp", "old", "mobile"},
    "address.use": {"home", "work", "temp", "old", "billing"},
    "address.type": {"postal", "physical", "both"},
    "name.use": {"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"},
    "identifier.use": {"usual", "official", "temp", "secondary", "old"},
    "availableTime.daysOfWeek": {"mon", "tue", "wed", "thu", "fri", "sat", "sun"},
    "Coverage.status": {"active", "cancelled", "draft", "entered-in-error"},
    "CareTeam.status": {"proposed", "active", "suspended", "inactive", "entered-in-error"},
    "Location.status": {"active", "suspended", "inactive"},
    "Location.mode": {"instance", "kind"},
    "Condition.clinicalStatus": {"active", "recurrence", "relapse", "inactive", "remission", "resolved"},
    "Condition.verificationStatus": {"unconfirmed", "provisional", "differential", "confirmed", "refuted",
                                     "entered-in-error"},
}


def test_required_bindings_use_r4_codes(resources: list[dict[str, Any]]) -> None:
    checked = Counter()

    def check(name: str, value: Any) -> None:
        assert value in REQUIRED_CODES[name], f"{name}: {value!r}"
        checked[name] += 1

    for r in resources:
        rtype = r["resourceType"]
        for field in ("status", "mode"):
            if f"{rtype}.{field}" in REQUIRED_CODES:
                check(f"{rtype}.{field}", r[field])
        if rtype == "Condition":
            check("Condition.clinicalStatus", r["clinicalStatus"]["coding"][0]["code"])
            assert r["clinicalStatus"]["coding"][0]["system"] == codes.HL7_CONDITION_CLINICAL
            check("Condition.verificationStatus", r["verificationStatus"]["coding"][0]["code"])
        if "gender" in r:
            check("gender", r["gender"])
        for key, obj in _walk(r):
            if key == "telecom":
                check("telecom.system", obj["system"])
                check("telecom.use", obj["use"])
            elif key == "address":
                check("address.use", obj["use"])
                check("address.type", obj["type"])
            elif key == "name" and "family" in obj:
                check("name.use", obj["use"])
            elif key == "identifier":
                check("identifier.use", obj["use"])
            elif key == "availableTime":
                for d in obj["daysOfWeek"]:
                    check("availableTime.daysOfWeek", d)
        if rtype == "Organization":
            # org-2, org-3: an organization's address and telecom are never "home"
            assert all(a["use"] != "home" for a in r.get("address", []))
            assert all(t["use"] != "home" for t in r.get("telecom", []))
    assert set(checked) == set(REQUIRED_CODES)


# --- the alliance ------------------------------------------------------------------------

def test_alliance_hospital_departments_and_grassroots(resources: list[dict[str, Any]]) -> None:
    orgs = of_type(resources, "Organization")
    refs = by_ref(resources)
    alliances = [o for o in orgs if "alliance" in type_codes(o)]
    assert [a["id"] for a in alliances] == ["alliance-yq"]
    hospital = next(o for o in orgs if "hospital" in type_codes(o))
    assert "tertiary" in type_codes(hospital)
    assert hospital["partOf"]["reference"] == "Organization/alliance-yq"

    depts = [o for o in orgs if "department" in type_codes(o)]
    assert {d["name"].removeprefix(hospital["name"]) for d in depts} == {"心内科", "内分泌科", "骨科", "康复科"}
    services = of_type(resources, "HealthcareService")
    for d in depts:
        assert d["partOf"]["reference"] == f"Organization/{hospital['id']}"
        hcs = [s for s in services if s["providedBy"]["reference"] == f"Organization/{d['id']}"]
        assert len(hcs) == 1
        loc = refs[hcs[0]["location"][0]["reference"]]
        assert loc["managingOrganization"]["reference"] == f"Organization/{d['id']}"

    grassroots = [o for o in orgs if "primary" in type_codes(o)]
    assert len(grassroots) == 3
    centers = [o["name"] for o in grassroots if "community-health-center" in type_codes(o)]
    townships = [o["name"] for o in grassroots if "township-hospital" in type_codes(o)]
    assert len(centers) == 2 and all(n.endswith("社区卫生服务中心") for n in centers)
    assert len(townships) == 1 and townships[0].endswith("镇卫生院")
    for o in grassroots:
        assert o["partOf"]["reference"] == "Organization/alliance-yq"
        addr = o["address"][0]
        assert addr["state"] == "山西省" and addr["city"] == "阳泉市" and addr["district"]
        assert o["telecom"][0]["value"].startswith("0353-")

    payer = refs["Organization/insurer-yq"]
    assert "医疗保障局" in payer["name"]


def test_a_3_plus_x_team_per_grassroots_institution(resources: list[dict[str, Any]]) -> None:
    refs = by_ref(resources)
    teams = of_type(resources, "CareTeam")
    assert len(teams) == len(CLINICS)
    for team in teams:
        clinic = team["managingOrganization"][0]["reference"]
        roles = [refs[p["member"]["reference"]] for p in team["participant"]]
        at_clinic = [r for r in roles if r["organization"]["reference"] == clinic]
        role_codes = {c["code"] for r in at_clinic for c in r["code"][0]["coding"] if c["system"] == codes.PRACTITIONER_ROLE}
        assert {"family-doctor", "community-nurse", "public-health"} <= role_codes  # the "3"
        specialists = [r for r in roles if r["organization"]["reference"] != clinic]
        assert specialists, "the X: a lead-hospital specialist"
        for s in specialists:
            dept = refs[s["organization"]["reference"]]
            assert dept["partOf"]["reference"] == "Organization/hospital-yq1"
        for r in roles:
            assert refs[r["practitioner"]["reference"]]["resourceType"] == "Practitioner"


def test_forty_patients_with_valid_matching_resident_ids(resources: list[dict[str, Any]]) -> None:
    refs = by_ref(resources)
    patients = of_type(resources, "Patient")
    assert len(patients) == 40
    codes_by_name = {d.name: d.code for d in DISTRICTS.values()}
    seen_ids = set()
    for p in patients:
        ids = {i["system"]: i["value"] for i in p["identifier"]}
        rid = ids[codes.RESIDENT_ID_SID]
        assert len(rid) == 18 and is_valid(rid), rid
        assert rid not in seen_ids
        seen_ids.add(rid)
        assert rid[:6] == codes_by_name[p["address"][0]["district"]]
        assert rid[6:14] == p["birthDate"].replace("-", "")
        assert sex_of(rid) == p["gender"]
        assert ids[codes.MEDICAL_INSURANCE_SID]
        name = p["name"][0]
        assert name["text"] == name["family"] + "".join(name["given"])
        assert re.fullmatch(r"[\u4e00-\u9fff]{2,4}", name["text"])
        assert re.fullmatch(r"1\d{10}", p["telecom"][0]["value"])
        assert date.fromisoformat(p["birthDate"]) < AS_OF
        clinic = p["managingOrganization"]["reference"]
        gp = refs[p["generalPractitioner"][0]["reference"]]
        assert gp["resourceType"] == "PractitionerRole" and gp["organization"]["reference"] == clinic
        assert any(c["code"] == "family-doctor" for c in gp["code"][0]["coding"])
    # residents are spread over every grassroots institution
    assert {p["managingOrganization"]["reference"] for p in patients} == {f"Organization/clinic-yq-{c.key}" for c in CLINICS}


def test_one_active_coverage_per_patient_paid_by_the_insurance_bureau(resources: list[dict[str, Any]]) -> None:
    patients = {f"Patient/{p['id']}": p for p in of_type(resources, "Patient")}
    coverages = of_type(resources, "Coverage")
    assert sorted(c["beneficiary"]["reference"] for c in coverages) == sorted(patients)
    kinds = Counter()
    for c in coverages:
        assert c["status"] == "active"
        assert c["payor"] == [{"reference": "Organization/insurer-yq", "display": "阳泉市医疗保障局"}]
        coding = c["type"]["coding"][0]
        assert coding["system"] == codes.COVERAGE_TYPE and coding["code"] in codes.COVERAGE_TYPES
        kinds[coding["code"]] += 1
        patient = patients[c["beneficiary"]["reference"]]
        insurance = next(i["value"] for i in patient["identifier"] if i["system"] == codes.MEDICAL_INSURANCE_SID)
        assert c["subscriberId"] == insurance
    assert set(kinds) == set(codes.COVERAGE_TYPES)


def test_some_patients_have_icd10_chronic_conditions(resources: list[dict[str, Any]]) -> None:
    patients = {f"Patient/{p['id']}": p for p in of_type(resources, "Patient")}
    conditions = of_type(resources, "Condition")
    assert 5 <= len(conditions) < 2 * len(patients)
    found = Counter(c["code"]["coding"][0]["code"] for c in conditions)
    assert {"I10", "E11"} <= set(found)
    for c in conditions:
        assert c["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10"
        patient = patients[c["subject"]["reference"]]
        assert c["onsetDateTime"] >= patient["birthDate"]
        assert c["recordedDate"] < AS_OF.isoformat()
        if c["code"]["coding"][0]["code"] == "N40":
            assert patient["gender"] == "male"


def test_departments_are_data_driven() -> None:
    assert [d.name for d in DEPARTMENTS] == ["心内科", "内分泌科", "骨科", "康复科"]
    assert all(d.key in codes.SPECIALTIES for d in DEPARTMENTS)


# --- determinism -------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_people(bundle: dict[str, Any]) -> None:
    same = json.dumps(demo_bundle(2026), ensure_ascii=False, sort_keys=True)
    assert json.dumps(bundle, ensure_ascii=False, sort_keys=True) == same
    other = demo_bundle(7)
    assert json.dumps(other, ensure_ascii=False, sort_keys=True) != same
    names = lambda b: [e["resource"]["name"][0]["text"] for e in b["entry"] if e["resource"]["resourceType"] == "Patient"]  # noqa: E731
    assert names(bundle) != names(other)
    # the ids of everything but conditions do not depend on the seed: reloading with
    # another seed updates the same resources instead of adding new ones
    ids = lambda b: {e["request"]["url"] for e in b["entry"] if e["resource"]["resourceType"] != "Condition"}  # noqa: E731
    assert ids(bundle) == ids(other)


@pytest.mark.parametrize("seed", [0, 1, 99, 123456])
def test_other_seeds_are_valid_too(seed: int) -> None:
    b = demo_bundle(seed, patients=60)
    res = [e["resource"] for e in b["entry"]]
    assert len(of_type(res, "Patient")) == 60
    known = set(by_ref(res))
    for r in res:
        get_fhir_model_class(r["resourceType"]).model_validate(r)
        for _, obj in _walk(r):
            if "reference" in obj:
                assert obj["reference"] in known
    rids = [i["value"] for p in of_type(res, "Patient") for i in p["identifier"] if i["system"] == codes.RESIDENT_ID_SID]
    assert len(set(rids)) == 60 and all(is_valid(r) for r in rids)
