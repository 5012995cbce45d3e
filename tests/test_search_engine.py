"""Search semantics per parameter type and modifier, chains, _has, includes, sorting, totals.

The data set is loaded once per module (``store`` fixture) and only read by the tests.
"""

from __future__ import annotations

import orjson
import pytest
import sqlalchemy as sa

from service.fhir.errors import BadRequest
from service.fhir.search import searchset_bundle
from tests.conftest import empty_store
from tests.test_search_support import MiniStore

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

DATA = [
    {"resourceType": "Organization", "id": "org1", "name": "Beijing Union Hospital",
     "identifier": [{"system": "urn:org", "value": "o1"}]},
    {"resourceType": "Organization", "id": "org2", "name": "上海第一人民医院", "partOf": {"reference": "Organization/org1"}},
    {"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "Li", "given": ["Wei"]}],
     "identifier": [{"system": "urn:prac", "value": "pr1"}]},
    {"resourceType": "PractitionerRole", "id": "role1", "practitioner": {"reference": "Practitioner/pr1"},
     "organization": {"reference": "Organization/org1"}},
    {"resourceType": "Patient", "id": "p1", "active": True, "gender": "male", "birthDate": "1980-05-01",
     "name": [{"family": "Müller", "given": ["Hans"]}],
     "identifier": [{"system": "urn:mrn", "value": "123"}, {"system": "http://other", "value": "ABC"}],
     "telecom": [{"system": "phone", "value": "555-1234"}],
     "address": [{"city": "Beijing"}],
     "generalPractitioner": [{"reference": "PractitionerRole/role1"}],
     "managingOrganization": {"reference": "Organization/org1"}},
    {"resourceType": "Patient", "id": "p2", "active": False, "gender": "female", "birthDate": "1990",
     "name": [{"text": "张三", "family": "张", "given": ["三"]}],
     "identifier": [{"system": "urn:mrn", "value": "456"}],
     "managingOrganization": {"reference": "Organization/org2"}},
    {"resourceType": "Patient", "id": "p3", "gender": "other", "name": [{"family": "Smith", "given": ["Zoë"]}],
     "identifier": [{"value": "789"}], "generalPractitioner": [{"reference": "Practitioner/pr1"}]},
    {"resourceType": "Patient", "id": "p4", "gender": "female", "name": [{"family": "Müllerová", "given": ["Anna"]}],
     "identifier": [{"system": "urn:mrn", "value": "999"}]},  # deleted below
    {"resourceType": "Observation", "id": "o1", "status": "final",
     "code": {"coding": [{"system": LOINC, "code": "1234-5", "display": "Glucose"}], "text": "Blood sugar"},
     "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2020-01-01T10:00:00+08:00",
     "valueQuantity": {"value": 5.4, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"}},
    {"resourceType": "Observation", "id": "o2", "status": "preliminary",
     "code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
     "subject": {"reference": "Patient/p2"},
     "effectivePeriod": {"start": "2020-01-01", "end": "2020-01-31"},
     "valueQuantity": {"value": 80, "unit": "/min", "system": UCUM, "code": "/min"}},
    {"resourceType": "Observation", "id": "o3", "status": "final",
     "code": {"coding": [{"system": LOINC, "code": "1234-5"}]}, "subject": {"reference": "Patient/p3"},
     "effectiveDateTime": "2021-06-15", "performer": [{"reference": "Practitioner/pr1"}],
     "valueQuantity": {"value": 7.2, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"}},
    {"resourceType": "Observation", "id": "o4", "status": "final", "code": {"text": "Free text only"},
     "subject": {"reference": "http://other.org/fhir/Patient/p1"}},  # another server's p1
    {"resourceType": "Observation", "id": "o5", "status": "final",
     "code": {"coding": [{"system": LOINC, "code": "1234-5"}]},
     "subject": {"identifier": {"system": "urn:mrn", "value": "123"}}},
    {"resourceType": "Observation", "id": "o6", "status": "final",
     "code": {"coding": [{"system": LOINC, "code": "2222-2"}]}, "subject": {"reference": "Patient/p4"}},
    {"resourceType": "Observation", "id": "o7", "status": "final",
     "code": {"coding": [{"system": LOINC, "code": "3333-3"}]},
     "subject": {"reference": "http://127.0.0.1:8000/fhir/Patient/p2"}},  # our own base, absolute
    {"resourceType": "Provenance", "id": "prov1", "target": [{"reference": "Observation/o1"}],
     "recorded": "2020-01-01T10:00:00+08:00", "agent": [{"who": {"reference": "Practitioner/pr1"}}]},
    {"resourceType": "Task", "id": "t1", "status": "requested", "intent": "order", "focus": {"reference": "Patient/p1"}},
    {"resourceType": "Task", "id": "t2", "status": "completed", "intent": "order", "focus": {"reference": "Patient/p2"}},
    {"resourceType": "RiskAssessment", "id": "ra1", "status": "final", "subject": {"reference": "Patient/p1"},
     "prediction": [{"probabilityDecimal": 0.35}]},
    {"resourceType": "RiskAssessment", "id": "ra2", "status": "final", "subject": {"reference": "Patient/p2"},
     "prediction": [{"probabilityDecimal": 100}]},
    {"resourceType": "ValueSet", "id": "vs1", "status": "active", "url": "http://example.org/fhir/ValueSet/abc"},
    {"resourceType": "ValueSet", "id": "vs2", "status": "active", "url": "http://example.org/fhir/ValueSet/abc/def"},
    {"resourceType": "ValueSet", "id": "vs3", "status": "active", "url": "http://example.org/other"},
]


@pytest.fixture(scope="module")
def store(engine: sa.Engine) -> MiniStore:
    empty_store(engine)
    s = MiniStore(engine)
    s.put_all(DATA)
    s.delete("Patient", "p4")
    return s


# -- token --------------------------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ("identifier=urn:mrn|123", {"p1"}),
    ("identifier=123", {"p1"}),
    ("identifier=urn:mrn|", {"p1", "p2"}),  # p4 (urn:mrn|999) is deleted
    ("identifier=|789", {"p3"}),
    ("identifier=|123", set()),
    ("identifier=other|123", set()),
    ("identifier=urn:mrn|123,|789", {"p1", "p3"}),
    ("identifier=urn:mrn|123&identifier=http://other|ABC", {"p1"}),
    ("identifier=urn:mrn|456&identifier=http://other|ABC", set()),
    ("gender=male,female", {"p1", "p2"}),
    ("gender:not=male", {"p2", "p3"}),
    ("gender:not=male,female", {"p3"}),
    ("active=true", {"p1"}),
    ("active=false", {"p2"}),
    ("active:missing=true", {"p3"}),
    ("active:missing=false", {"p1", "p2"}),
    ("phone=555-1234", {"p1"}),
    ("_id=p1,p3", {"p1", "p3"}),
    ("_id=p4", set()),
    ("_id:not=p1", {"p2", "p3"}),
    ("identifier:text=x", set()),
])
def test_token(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("Patient", query) == expected


@pytest.mark.parametrize("query, expected", [
    ("code=http://loinc.org|1234-5", {"o1", "o3", "o5"}),
    ("code=1234-5,8867-4", {"o1", "o2", "o3", "o5"}),
    ("code:text=blood", {"o1"}),  # CodeableConcept.text
    ("code:text=GLUC", {"o1"}),  # Coding.display, case-insensitive prefix
    ("code:text=free", {"o4"}),
    ("code:not=1234-5", {"o2", "o4", "o6", "o7"}),
    ("status=final&code=1234-5", {"o1", "o3", "o5"}),
    ("status=preliminary", {"o2"}),
])
def test_token_observation(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("Observation", query) == expected


def test_token_escaped_separators(store: MiniStore) -> None:
    # '\|' and '\,' are part of the code, not separators: nothing has such a code
    assert store.id_set("Patient", r"identifier=urn:mrn\|123") == set()
    assert store.id_set("Patient", r"gender=male\,female") == set()


# -- string -------------------------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ("name=muller", {"p1"}),  # accent- and case-insensitive; deleted Müllerová never matches
    ("name=MÜL", {"p1"}),
    ("family=Mu", {"p1"}),
    ("name=zoe", {"p3"}),
    ("given=ZOË", {"p3"}),
    ("name=ans", set()),  # prefix, not contains
    ("name:contains=ans", {"p1"}),
    ("name:contains=LLER", {"p1"}),
    ("name=张", {"p2"}),
    ("name=张三", {"p2"}),
    ("name:contains=三", {"p2"}),
    ("name=三", {"p2"}),  # the given name is its own value
    ("name:exact=Müller", {"p1"}),
    ("name:exact=müller", set()),
    ("name:exact=Mül", set()),
    ("name=smith,li", {"p3"}),
    ("name=smith&name=zo", {"p3"}),
    ("name=smith&name=hans", set()),
    ("address-city=bei", {"p1"}),
    ("name=100%", set()),
    ("name:contains=%", set()),
    ("name:contains=_", set()),
    ("family:missing=true", set()),
    # Rows shared between parameters (searchparams.share_string_rows) answer as if each had its own:
    ("phonetic=张", {"p2"}),  # phonetic reads name's rows (the same expression, Patient.name)
    ("phonetic=hans", {"p1"}),
    ("phonetic:exact=Smith", {"p3"}),
    ("phonetic:missing=false", {"p1", "p2", "p3"}),
    ("name:missing=false", {"p1", "p2", "p3"}),  # p1 and p3 have no name text: family/given rows count
    ("address=bei", {"p1"}),  # p1's address is only a city: address-city's row counts for address
    ("address:exact=Beijing", {"p1"}),
    ("address:contains=jin", {"p1"}),
    ("address:missing=true", {"p2", "p3"}),
    ("address=bei&name=mu", {"p1"}),
])
def test_string(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("Patient", query) == expected


def test_string_chinese_organization(store: MiniStore) -> None:
    assert store.id_set("Organization", "name=上海") == {"org2"}
    assert store.id_set("Organization", "name:contains=人民") == {"org2"}
    assert store.id_set("Organization", "name=人民") == set()


# -- reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ("subject=Patient/p1", {"o1"}),  # not o4: that is another server's Patient/p1
    ("subject=p1", {"o1"}),
    ("subject:Patient=p1", {"o1"}),
    ("patient=p1", {"o1"}),  # single target: the type is implied
    ("subject=Patient/p1/_history/1", {"o1"}),
    ("subject=http://other.org/fhir/Patient/p1", {"o4"}),
    ("subject=http://127.0.0.1:8000/fhir/Patient/p1", {"o1"}),  # our own base = local
    ("subject=Patient/p2", {"o2", "o7"}),  # o7 refers to p2 by an absolute URL on our base
    ("subject:identifier=urn:mrn|123", {"o5"}),
    ("subject:Group=p1", set()),
    ("subject=Patient/p1,Patient/p3", {"o1", "o3"}),
    ("performer=Practitioner/pr1", {"o3"}),
    ("subject:missing=true", set()),
    ("performer:missing=false", {"o3"}),
])
def test_reference(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("Observation", query) == expected


def test_reference_to_deleted_resource_still_matches_by_id(store: MiniStore) -> None:
    # o6 still says subject=Patient/p4; the reference search does not need p4 to exist
    assert store.id_set("Observation", "subject=Patient/p4") == {"o6"}


# -- chains and _has ----------------------------------------------------------------------------


@pytest.mark.parametrize("rt, query, expected", [
    ("Observation", "subject.identifier=urn:mrn|123", {"o1"}),
    ("Observation", "subject:Patient.identifier=urn:mrn|123", {"o1"}),
    ("Observation", "subject:Patient.name=zoe", {"o3"}),
    ("Observation", "subject.name=张", {"o2", "o7"}),
    ("Observation", "subject.gender=female", {"o2", "o7"}),  # not o6: p4 is deleted
    ("Observation", "patient.birthdate=1980", {"o1"}),
    ("Patient", "general-practitioner.organization.name=beijing", {"p1"}),
    ("Patient", "general-practitioner:PractitionerRole.organization.identifier=urn:org|o1", {"p1"}),
    ("Patient", "general-practitioner.name=li", {"p3"}),
    ("Patient", "organization.name=上海", {"p2"}),
    ("Patient", "organization.partof.name=beijing", {"p2"}),
    ("Patient", "organization.name=beijing&gender=male", {"p1"}),
    ("Patient", "organization.name=beijing&gender=female", set()),
    ("Patient", "_has:Task:focus:status=requested", {"p1"}),
    ("Patient", "_has:Task:focus:status=requested,completed", {"p1", "p2"}),
    ("Patient", "_has:Observation:patient:code=1234-5", {"p1", "p3"}),
    ("Patient", "_has:Observation:subject:_has:Provenance:target:agent=Practitioner/pr1", {"p1"}),
    ("Patient", "_has:Observation:subject:code=2222-2", set()),  # only the deleted p4 has one
    ("Patient", "_has:Observation:subject:subject:identifier=urn:mrn|123", set()),
    ("Practitioner", "_has:Observation:performer:subject.name=smith", {"pr1"}),
])
def test_chain_and_has(store: MiniStore, rt: str, query: str, expected: set[str]) -> None:
    assert store.id_set(rt, query) == expected


def test_chain_errors(store: MiniStore) -> None:
    with pytest.raises(BadRequest, match="not a reference"):
        store.search("Patient", "gender.name=x")
    with pytest.raises(BadRequest, match="cannot point at"):
        store.search("Observation", "subject:Organization.name=x")
    page = store.search("Observation", "subject.nosuch=x")
    assert page.warnings and "nosuch" in page.warnings[0].diagnostics
    assert {m[1] for m in page.matches} == {"o1", "o2", "o3", "o4", "o5", "o6", "o7"}


# -- number, quantity, uri ----------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ("probability=0.35", {"ra1"}),
    ("probability=0.4", {"ra1"}),  # 0.4 means [0.35, 0.45)
    ("probability=0.3", set()),  # [0.25, 0.35): 0.35 is just outside
    ("probability=100", {"ra2"}),
    ("probability=1e2", {"ra2"}),
    ("probability=gt0.35", {"ra2"}),
    ("probability=ge0.35", {"ra1", "ra2"}),
    ("probability=lt100", {"ra1"}),
    ("probability=le100", {"ra1", "ra2"}),
    ("probability=ne100", {"ra1"}),
    ("probability=ap95", {"ra2"}),
    ("probability=ap0.2", set()),
])
def test_number(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("RiskAssessment", query) == expected


@pytest.mark.parametrize("query, expected", [
    ("value-quantity=5.4|http://unitsofmeasure.org|mmol/L", {"o1"}),
    ("value-quantity=5.4", {"o1"}),
    ("value-quantity=5.4||mmol/L", {"o1"}),
    ("value-quantity=5.4||/min", set()),
    ("value-quantity=gt5||mmol/L", {"o1", "o3"}),
    ("value-quantity=gt6||mmol/L", {"o3"}),
    ("value-quantity=lt100||/min", {"o2"}),
    ("value-quantity=le80|http://unitsofmeasure.org|/min", {"o2"}),
    ("value-quantity=ap80", {"o2"}),
])
def test_quantity(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("Observation", query) == expected


@pytest.mark.parametrize("query, expected", [
    ("url=http://example.org/fhir/ValueSet/abc", {"vs1"}),
    ("url=http://example.org/fhir/ValueSet/ab", set()),
    ("url:below=http://example.org/fhir/ValueSet/abc", {"vs1", "vs2"}),
    ("url:below=http://example.org/", {"vs1", "vs2", "vs3"}),
    ("url:above=http://example.org/fhir/ValueSet/abc/def/ghi", {"vs1", "vs2"}),
    ("url:above=http://example.org/fhir/ValueSet/abc", {"vs1"}),
])
def test_uri(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("ValueSet", query) == expected


# -- sorting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ("", ["p1", "p2", "p3"]),  # default: by id
    ("_sort=-_id", ["p3", "p2", "p1"]),
    ("_sort=birthdate", ["p1", "p2", "p3"]),  # p3 has no birthDate: last either way
    ("_sort=-birthdate", ["p2", "p1", "p3"]),
    ("_sort=family", ["p1", "p3", "p2"]),  # muller < smith < 张 (code point order)
    ("_sort=-family", ["p2", "p3", "p1"]),
    ("_sort=gender", ["p2", "p1", "p3"]),
    ("_sort=-gender", ["p3", "p1", "p2"]),
    ("_sort=active,-_id", ["p2", "p1", "p3"]),  # false < true; p3 has none
    ("_sort:desc=family", ["p2", "p3", "p1"]),
    ("_sort=name", ["p1", "p3", "p2"]),  # hans (a given name) < smith < 三: family and given rows count
    ("_sort=-name", ["p2", "p3", "p1"]),  # 张三 > zoe > muller
])
def test_sort(store: MiniStore, query: str, expected: list[str]) -> None:
    assert store.ids("Patient", query) == expected


def test_sort_numbers_and_last_updated(store: MiniStore) -> None:
    assert store.ids("RiskAssessment", "_sort=-probability") == ["ra2", "ra1"]
    assert store.ids("RiskAssessment", "_sort=probability") == ["ra1", "ra2"]
    ordered = store.ids("Organization", "_sort=_lastUpdated")
    assert store.ids("Organization", "_sort=-_lastUpdated") == list(reversed(ordered))


# -- include / revinclude -----------------------------------------------------------------------


def _keys(rows: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [(t, i) for t, i, _ in rows]


def test_include(store: MiniStore) -> None:
    page = store.search("Observation", "_id=o1,o3&_include=Observation:subject")
    assert sorted(_keys(page.includes)) == [("Patient", "p1"), ("Patient", "p3")]
    page = store.search("Observation", "_id=o3&_include=Observation:subject:Group")
    assert page.includes == []
    page = store.search("Observation", "_id=o3&_include=*")
    assert sorted(_keys(page.includes)) == [("Patient", "p3"), ("Practitioner", "pr1")]
    # the external reference of o4 and the deleted target of o6 include nothing
    page = store.search("Observation", "_id=o4,o6&_include=Observation:subject")
    assert page.includes == []
    # included resources carry their stored JSON
    page = store.search("Observation", "_id=o1&_include=Observation:patient")
    assert orjson.loads(page.includes[0][2])["id"] == "p1"


def test_include_is_not_duplicated(store: MiniStore) -> None:
    page = store.search("Patient", "_id=p1,p3&_include=Patient:general-practitioner"
                        "&_include:iterate=PractitionerRole:practitioner")
    keys = _keys(page.includes)
    assert sorted(keys) == [("Practitioner", "pr1"), ("PractitionerRole", "role1")]
    # a match is never repeated as an include
    page = store.search("Organization", "_include=Organization:partof")
    assert page.includes == []


def test_include_iterate(store: MiniStore) -> None:
    base = "_id=p1&_include=Patient:general-practitioner"
    assert _keys(store.search("Patient", base).includes) == [("PractitionerRole", "role1")]
    page = store.search("Patient", base + "&_include:iterate=PractitionerRole:organization")
    assert sorted(_keys(page.includes)) == [("Organization", "org1"), ("PractitionerRole", "role1")]
    # a non-iterate include of a type that is not matched does nothing
    page = store.search("Patient", base + "&_include=PractitionerRole:organization")
    assert _keys(page.includes) == [("PractitionerRole", "role1")]


def test_revinclude(store: MiniStore) -> None:
    page = store.search("Observation", "_id=o1,o2&_revinclude=Provenance:target")
    assert _keys(page.includes) == [("Provenance", "prov1")]
    page = store.search("Patient", "_id=p1&_revinclude=Observation:subject&_revinclude=Task:focus")
    assert sorted(_keys(page.includes)) == [("Observation", "o1"), ("Task", "t1")]
    page = store.search("Patient", "_id=p2&_revinclude=Observation:subject")
    assert sorted(_keys(page.includes)) == [("Observation", "o2"), ("Observation", "o7")]
    page = store.search("Patient", "_id=p1&_revinclude=Observation:subject"
                        "&_revinclude:iterate=Provenance:target")
    assert sorted(_keys(page.includes)) == [("Observation", "o1"), ("Provenance", "prov1")]


# -- totals, summary, visibility, deleted ---------------------------------------------------------


def test_totals(store: MiniStore) -> None:
    assert store.search("Observation", "code=1234-5").total == 3
    assert store.search("Observation", "code=1234-5&_count=1").total == 3
    assert store.search("Observation", "code=1234-5&_total=none").total is None
    assert store.search("Observation", "code=1234-5&_total=estimate").total == 3
    page = store.search("Observation", "code=1234-5&_summary=count")
    assert page.total == 3 and page.matches == [] and page.summary_count
    page = store.search("Observation", "code=1234-5&_count=0")
    assert page.total == 3 and page.matches == [] and page.next_link is None


def test_deleted_never_matches(store: MiniStore) -> None:
    assert store.id_set("Patient", "_id=p4") == set()
    assert store.id_set("Patient", "family=müllerová") == set()
    assert store.id_set("Patient", "gender:not=male") == {"p2", "p3"}
    assert store.id_set("Patient", "_has:Observation:subject:code=2222-2") == set()
    assert store.search("Patient").total == 3


def test_visible_hook_applies_to_matches_totals_and_includes(store: MiniStore) -> None:
    calls: list[str] = []

    def visible(resource_type, type_col, id_col):  # type: ignore[no-untyped-def]
        calls.append(resource_type)
        return id_col != "p2"

    page = store.search("Patient", "_count=1", visible=visible)
    assert page.total == 2 and [m[1] for m in page.matches] == ["p1"]
    page = store.search("Observation", "_id=o1,o2&_include=Observation:subject", visible=visible)
    assert _keys(page.includes) == [("Patient", "p1")]
    assert "Patient" in calls and "Observation" in calls


def test_find_matches(store: MiniStore) -> None:
    assert store.find("Patient", "identifier=urn:mrn|123") == ["p1"]
    assert store.find("Patient", "?identifier=urn:mrn|") == ["p1", "p2"]
    assert store.find("Patient", "identifier=urn:mrn|", limit=1) == ["p1"]
    assert store.find("Patient", "identifier=urn:mrn|999") == []  # deleted
    assert store.find("Observation", "subject:Patient.identifier=urn:mrn|123") == ["o1"]
    with pytest.raises(BadRequest, match="nosuch"):
        store.find("Patient", "nosuch=1")
    with pytest.raises(BadRequest, match="no search criteria"):
        store.find("Patient", "_count=5")


# -- bundle -------------------------------------------------------------------------------------


def test_searchset_bundle(store: MiniStore) -> None:
    page = store.search("Observation", "code=1234-5&_count=2&_include=Observation:subject&foo=bar")
    bundle = orjson.loads(searchset_bundle(page, base_url="https://fhir.example.cn/fhir/"))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 3
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["self"].startswith("https://fhir.example.cn/fhir/Observation?code=1234-5&_count=2")
    assert "_cursor=" in links["next"] and "code=1234-5" in links["next"] and "previous" not in links
    modes = [e["search"]["mode"] for e in bundle["entry"]]
    assert modes == ["match", "match", "include", "include", "outcome"]
    first = bundle["entry"][0]
    assert first["fullUrl"] == "https://fhir.example.cn/fhir/Observation/o1"
    assert first["resource"]["id"] == "o1" and first["resource"]["meta"]["versionId"] == "1"
    outcome = bundle["entry"][-1]["resource"]
    assert outcome["resourceType"] == "OperationOutcome" and "foo" in outcome["issue"][0]["diagnostics"]


def test_bundle_summary_and_elements(store: MiniStore) -> None:
    page = store.search("Observation", "_id=o1&_elements=status,value")
    resource = orjson.loads(searchset_bundle(page, base_url="http://x/fhir"))["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "status", "valueQuantity", "code"}  # code: mandatory
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "SUBSETTED"} in resource["meta"]["tag"]
    page = store.search("Patient", "_id=p1&_summary=true")
    resource = orjson.loads(searchset_bundle(page, base_url="http://x/fhir"))["entry"][0]["resource"]
    assert "name" in resource and "telecom" in resource and "generalPractitioner" not in resource
    page = store.search("Patient", "_id=p1&_summary=count")
    bundle = orjson.loads(searchset_bundle(page, base_url="http://x/fhir"))
    assert bundle["total"] == 1 and "entry" not in bundle
