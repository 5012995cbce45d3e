"""Index-on-write extraction (service.fhir.indexing): pure functions, no database."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import fhirpathpy
import pytest
from fhirpathpy.models import models

from service.fhir.definitions.derive_search import package_dir
from service.fhir.indexing import (
    DATE_MAX,
    DATE_MIN,
    IndexRows,
    accessor_stats,
    date_range,
    fallback_expressions,
    index_resource,
    normalize_string,
    number_range,
    plan_for,
)
from service.fhir.indexing.paths import DirectAccessor, UnionAccessor, compile_expression

DIRECTION_SYSTEM = "https://yilian.example.org/fhir/CodeSystem/referral-direction"


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def rows(resource: dict[str, Any], table: str, param: str) -> list[dict]:
    return [r for r in getattr(index_resource(resource), table) if r["param"] == param]


def strings(resource: dict[str, Any], param: str) -> set[tuple[str, str]]:
    return {(r["value"], r["exact"]) for r in rows(resource, "strings", param)}


def tokens(resource: dict[str, Any], param: str) -> set[tuple[str, str | None, str | None]]:
    return {(r["system"], r["code"], r["text"]) for r in rows(resource, "tokens", param)}


def refs(resource: dict[str, Any], param: str) -> set[tuple[str | None, str | None, str | None]]:
    return {(r["target_type"], r["target_id"], r["url"]) for r in rows(resource, "references", param)}


def dates(resource: dict[str, Any], param: str) -> set[tuple[int, int]]:
    return {(r["low"], r["high"]) for r in rows(resource, "dates", param)}


ZHANG = {
    "resourceType": "Patient",
    "id": "zsf",
    "meta": {
        "lastUpdated": "2024-03-01T10:00:00+08:00",
        "tag": [{"system": "https://yilian.example.org/fhir/CodeSystem/source", "code": "his-a"}],
        "profile": ["https://yilian.example.org/fhir/StructureDefinition/yilian-patient"],
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
        "source": "https://his-a.example.org",
    },
    "identifier": [
        {"type": {"text": "居民身份证"}, "system": "urn:oid:2.16.156.10011.1.3", "value": "110101199003071234"},
        {"system": "https://his-a.example.org/mrn", "value": "MRN-1"},
        {"system": "https://his-a.example.org/mrn", "value": "MRN-1"},  # duplicate: one row
        {"value": "no-system"},
    ],
    "active": True,
    "name": [{"use": "official", "text": "张三丰", "family": "张", "given": ["三丰"]}],
    "telecom": [
        {"system": "phone", "value": "13800138000", "use": "mobile"},
        {"system": "email", "value": "zsf@example.cn"},
    ],
    "gender": "male",
    "birthDate": "1990-03-07",
    "address": [{"text": "北京市东城区王府井大街1号", "line": ["王府井大街1号"], "city": "北京市", "district": "东城区",
                 "postalCode": "100006", "country": "CN"}],
    "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "zh-CN",
                                                "display": "Chinese (China)"}], "text": "中文"}}],
    "generalPractitioner": [{"reference": "Practitioner/dr-wang"}],
    "managingOrganization": {"reference": "https://his-a.example.org/fhir/Organization/his-a/_history/3"},
}


# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "folded"),
    [
        ("Zhang", "zhang"),
        ("Ångström Müller", "angstrom muller"),
        ("José Núñez", "jose nunez"),
        ("Straße", "strasse"),
        ("張三丰 张三丰", "張三丰 张三丰"),  # CJK unchanged, traditional and simplified kept apart
        ("ＺＨＡＮＧ１２３", "zhang123"),  # full-width forms fold to ASCII
        ("がっこう", "がっこう"),  # kana voicing marks are not accents
        ("한국어", "한국어"),  # Hangul recomposes
    ],
)
def test_normalize_string(raw: str, folded: str) -> None:
    assert normalize_string(raw) == folded


# --- dates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2024-03-01", "2024-02-29T16:00:00Z", "2024-03-01T15:59:59.999Z"),  # +08:00 by default
        ("2024", "2023-12-31T16:00:00Z", "2024-12-31T15:59:59.999Z"),
        ("2024-02", "2024-01-31T16:00:00Z", "2024-02-29T15:59:59.999Z"),  # leap February
        ("2023-02", "2023-01-31T16:00:00Z", "2023-02-28T15:59:59.999Z"),
        ("2024-03-01T10:30:00+08:00", "2024-03-01T02:30:00Z", "2024-03-01T02:30:00.999Z"),
        ("2024-03-01T10:30:00Z", "2024-03-01T10:30:00Z", "2024-03-01T10:30:00.999Z"),
        ("2024-03-01T10:30:00-05:00", "2024-03-01T15:30:00Z", "2024-03-01T15:30:00.999Z"),
        ("2024-03-01T10:30:00", "2024-03-01T02:30:00Z", "2024-03-01T02:30:00.999Z"),  # no zone: +08:00
        ("2024-03-01T10:30+08:00", "2024-03-01T02:30:00Z", "2024-03-01T02:30:59.999Z"),  # minutes
        ("2024-03-01T10:30:00.123Z", "2024-03-01T10:30:00.123Z", "2024-03-01T10:30:00.123Z"),
        ("2024-03-01T10:30:00.5Z", "2024-03-01T10:30:00.500Z", "2024-03-01T10:30:00.599Z"),
        ("2024-03-01T10:30:00.123456Z", "2024-03-01T10:30:00.123Z", "2024-03-01T10:30:00.123Z"),
        ("2024-12-31", "2024-12-30T16:00:00Z", "2024-12-31T15:59:59.999Z"),
    ],
)
def test_date_range_precision(value: str, low: str, high: str) -> None:
    assert date_range(value) == (ms(low), ms(high))


def test_date_range_extremes_do_not_overflow() -> None:
    low, high = date_range("0001")
    assert low < high < 0
    low, high = date_range("9999-12-31")
    assert high == ms("9999-12-31T15:59:59.999Z")


@pytest.mark.parametrize("bad", ["", "2024-13", "2024-02-30", "24-03-01", "2024-03-01T25:00:00Z", "yesterday", "2024/03/01"])
def test_date_range_rejects_non_dates(bad: str) -> None:
    with pytest.raises(ValueError):
        date_range(bad)


# --- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("100", 99.5, 100.5),
        ("100.0", 99.95, 100.05),
        ("1.50", 1.495, 1.505),
        ("0.02", 0.015, 0.025),
        ("-5", -5.5, -4.5),
        ("1e2", 50.0, 150.0),
        ("1.0e2", 95.0, 105.0),
    ],
)
def test_number_range_implied_precision(value: str, low: float, high: float) -> None:
    got = number_range(value)
    assert got == pytest.approx((low, high))


@pytest.mark.parametrize("bad", ["", "abc", "1.2.3", "--1"])
def test_number_range_rejects_non_numbers(bad: str) -> None:
    with pytest.raises(ValueError):
        number_range(bad)


# --- strings ----------------------------------------------------------------------------------------


def test_chinese_name_parts_are_separate_string_rows() -> None:
    # name's family and given parts are the rows of family and given (read by name searches too)
    assert strings(ZHANG, "name") == {("张三丰", "张三丰")}
    assert strings(ZHANG, "family") == {("张", "张")}
    assert strings(ZHANG, "given") == {("三丰", "三丰")}


def test_accented_names_fold_but_keep_exact() -> None:
    p = {"resourceType": "Patient", "name": [{"family": "Müller", "given": ["José", "Zoë"], "prefix": ["Dr."], "suffix": ["Jr."]}]}
    assert strings(p, "name") == {("dr.", "Dr."), ("jr.", "Jr.")}
    assert strings(p, "family") | strings(p, "given") == {("muller", "Müller"), ("jose", "José"), ("zoe", "Zoë")}


def test_address_parts_each_a_row() -> None:
    # city, state, postalCode and country are the rows of address-city ... (read by address searches too)
    assert strings(ZHANG, "address") == {
        ("北京市东城区王府井大街1号", "北京市东城区王府井大街1号"), ("王府井大街1号", "王府井大街1号"), ("东城区", "东城区"),
    }
    assert strings(ZHANG, "address-city") == {("北京市", "北京市")}
    assert strings(ZHANG, "address-postalcode") == {("100006", "100006")}
    assert strings(ZHANG, "address-country") == {("cn", "CN")}


def test_parameters_with_the_same_values_share_rows() -> None:
    """Each value is one row: phonetic (Patient.name, like name) writes none of its own, and
    no part of a name or address is written twice (searchparams.share_string_rows)."""
    written = [(r["param"], r["value"]) for r in index_resource(ZHANG).strings]
    assert not [r for r in written if r[0] == "phonetic"]
    assert "phonetic" not in {entry.code for entry in plan_for("Patient")}
    values = [value for _, value in written]
    assert len(values) == len(set(values)), written


def test_long_strings_are_clipped() -> None:
    from service.fhir.indexing import MAX_STRING_CHARS

    p = {"resourceType": "Patient", "name": [{"text": "长" * 1000}]}
    (row,) = rows(p, "strings", "name")
    assert len(row["value"]) == len(row["exact"]) == MAX_STRING_CHARS


# --- tokens ------------------------------------------------------------------------------------------


def test_identifier_tokens_with_system_and_type_text() -> None:
    assert tokens(ZHANG, "identifier") == {
        ("urn:oid:2.16.156.10011.1.3", "110101199003071234", "居民身份证"),
        ("https://his-a.example.org/mrn", "MRN-1", None),
        ("", "no-system", None),
    }
    assert len(rows(ZHANG, "tokens", "identifier")) == 3  # the duplicate collapsed


def test_codeable_concept_codings_and_text() -> None:
    assert tokens(ZHANG, "language") == {("urn:ietf:bcp:47", "zh-CN", "chinese (china)"), ("", None, "中文")}


def test_code_boolean_and_contact_point_tokens() -> None:
    assert tokens(ZHANG, "gender") == {("", "male", None)}
    assert tokens(ZHANG, "active") == {("", "true", None)}
    assert tokens(ZHANG, "phone") == {("", "13800138000", None)}  # where(system='phone')
    assert tokens(ZHANG, "email") == {("", "zsf@example.cn", None)}
    assert tokens(ZHANG, "telecom") == {("", "13800138000", None), ("", "zsf@example.cn", None)}


def test_common_parameters_are_indexed_but_columns_are_not() -> None:
    r = index_resource(ZHANG)
    params = {row["param"] for table in r.__dict__.values() for row in table}
    assert {"_tag", "_profile", "_security", "_source"} <= params
    assert "_id" not in params and "_lastUpdated" not in params
    assert tokens(ZHANG, "_tag") == {("https://yilian.example.org/fhir/CodeSystem/source", "his-a", None)}
    assert {r["value"] for r in rows(ZHANG, "uris", "_profile")} == {
        "https://yilian.example.org/fhir/StructureDefinition/yilian-patient"}
    assert {r["value"] for r in rows(ZHANG, "uris", "_source")} == {"https://his-a.example.org"}


def test_custom_direction_parameter_is_indexed() -> None:
    sr = {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "category": [{"coding": [{"system": DIRECTION_SYSTEM, "code": "up", "display": "上转"}]}],
        "subject": {"reference": "Patient/zsf"},
    }
    assert tokens(sr, "direction") == {(DIRECTION_SYSTEM, "up", "上转")}
    assert tokens(sr, "category") == tokens(sr, "direction")


# --- dates in resources --------------------------------------------------------------------------


def test_birthdate_is_a_day_in_china() -> None:
    assert dates(ZHANG, "birthdate") == {(ms("1990-03-06T16:00:00Z"), ms("1990-03-07T15:59:59.999Z"))}


def test_period_open_ends() -> None:
    start_only = {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "AMB"},
                  "period": {"start": "2024-03-01T08:00:00+08:00"}}
    assert dates(start_only, "date") == {(ms("2024-03-01T00:00:00Z"), DATE_MAX)}
    end_only = {**start_only, "period": {"end": "2024-03-02"}}
    assert dates(end_only, "date") == {(DATE_MIN, ms("2024-03-02T15:59:59.999Z"))}
    both = {**start_only, "period": {"start": "2024-03-01", "end": "2024-03-02"}}
    assert dates(both, "date") == {(ms("2024-02-29T16:00:00Z"), ms("2024-03-02T15:59:59.999Z"))}
    assert dates({**start_only, "period": {}}, "date") == set()


def test_timing_events_and_unparseable_dates() -> None:
    plan = {"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": {"reference": "Patient/1"},
            "activity": [{"detail": {"status": "scheduled", "scheduledTiming": {"event": ["2024-03-01", "2024-03-08"]}}},
                         {"detail": {"status": "scheduled", "scheduledString": "every Monday"}}]}
    assert dates(plan, "activity-date") == {date_range("2024-03-01"), date_range("2024-03-08")}
    bad = {"resourceType": "Patient", "birthDate": "not a date"}
    assert dates(bad, "birthdate") == set()


# --- references ---------------------------------------------------------------------------------


def test_relative_history_and_absolute_references() -> None:
    assert refs(ZHANG, "general-practitioner") == {("Practitioner", "dr-wang", None)}
    assert refs(ZHANG, "organization") == {
        ("Organization", "his-a", "https://his-a.example.org/fhir/Organization/his-a")}
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "Patient/zsf/_history/2"},
           "performer": [{"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
                         {"reference": "http://example.org/not/a/resource"},
                         {"reference": "#contained-practitioner"},
                         {"display": "display only"}]}
    assert refs(obs, "subject") == {("Patient", "zsf", None)}
    assert refs(obs, "performer") == {(None, None, "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"),
                                      (None, None, "http://example.org/not/a/resource")}


def test_reference_identifier_is_a_token_under_colon_identifier() -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"identifier": {"system": "urn:oid:2.16.156.10011.1.3", "value": "110101199003071234"}}}
    assert refs(obs, "subject") == set()
    assert tokens(obs, "subject:identifier") == {("urn:oid:2.16.156.10011.1.3", "110101199003071234", None)}
    assert tokens(obs, "patient:identifier") == set()  # resolve() is Patient: type unknown


def test_resolve_is_filters_by_target_type() -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "Group/g1"}}
    assert refs(obs, "subject") == {("Group", "g1", None)}
    assert refs(obs, "patient") == set()
    obs["subject"] = {"reference": "https://other.example.org/fhir/Patient/p9"}
    assert refs(obs, "patient") == {("Patient", "p9", "https://other.example.org/fhir/Patient/p9")}
    obs["subject"] = {"identifier": {"value": "X1"}, "type": "Patient"}  # typed identifier reference
    assert tokens(obs, "patient:identifier") == {("", "X1", None)}


def test_canonical_references_match_by_url_with_and_without_version() -> None:
    qr = {"resourceType": "QuestionnaireResponse", "status": "completed",
          "questionnaire": "https://yilian.example.org/fhir/Questionnaire/intake|2.0"}
    assert refs(qr, "questionnaire") == {(None, None, "https://yilian.example.org/fhir/Questionnaire/intake|2.0"),
                                         (None, None, "https://yilian.example.org/fhir/Questionnaire/intake")}


def test_bundle_first_entry_resource_as_reference() -> None:
    doc = {"resourceType": "Bundle", "type": "document",
           "entry": [{"resource": {"resourceType": "Composition", "id": "c1"}},
                     {"resource": {"resourceType": "Patient", "id": "p1"}}]}
    assert refs(doc, "composition") == {("Composition", "c1", None)}


# --- choice types, quantities, numbers ------------------------------------------------------------


def test_choice_type_expressions() -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": 5.4, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}}
    q = rows(obs, "quantities", "value-quantity")
    assert q == [{"param": "value-quantity", "value": 5.4, "low": pytest.approx(5.35), "high": pytest.approx(5.45),
                  "system": "http://unitsofmeasure.org", "code": "mmol/L"}]
    assert dates(obs, "value-date") == set()

    obs2 = {**obs, "valueDateTime": "2024-03-01"}
    del obs2["valueQuantity"]
    assert dates(obs2, "value-date") == {date_range("2024-03-01")}
    assert rows(obs2, "quantities", "value-quantity") == []

    obs3 = {**obs, "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "260385009"}],
                                            "text": "阴性"}}
    del obs3["valueQuantity"]
    assert tokens(obs3, "value-concept") == {("http://snomed.info/sct", "260385009", None), ("", None, "阴性")}
    assert strings(obs3, "value-string") == {("阴性", "阴性")}  # (Observation.value as CodeableConcept).text

    dead = {"resourceType": "Patient", "deceasedDateTime": "2020-01-01"}
    assert dates(dead, "death-date") == {date_range("2020-01-01")}
    assert tokens(dead, "deceased") == {("", "true", None)}
    assert tokens({"resourceType": "Patient", "deceasedBoolean": False}, "deceased") == {("", "false", None)}
    assert tokens({"resourceType": "Patient"}, "deceased") == {("", "false", None)}

    med = {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/1"},
           "medicationReference": {"reference": "Medication/m1"}}
    assert refs(med, "medication") == {("Medication", "m1", None)}
    assert tokens(med, "code") == set()


def test_quantity_code_unit_money_and_range() -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "bp"},
           "component": [{"code": {"text": "sys"}, "valueQuantity": {"value": 118, "unit": "mmHg",
                                                                     "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]}
    assert {(r["value"], r["low"], r["high"], r["system"], r["code"]) for r in rows(obs, "quantities", "component-value-quantity")} == {
        (118.0, 117.5, 118.5, "http://unitsofmeasure.org", "mm[Hg]"), (118.0, 117.5, 118.5, "", "mmHg")}
    charge = {"resourceType": "ChargeItem", "status": "billable", "code": {"text": "x"}, "subject": {"reference": "Patient/1"},
              "priceOverride": {"value": 40, "currency": "CNY"}}
    assert [(r["value"], r["system"], r["code"]) for r in rows(charge, "quantities", "price-override")] == [
        (40.0, "urn:iso:std:iso:4217", "CNY")]
    ad = {"resourceType": "ActivityDefinition", "status": "active",
          "useContext": [{"code": {"code": "age"}, "valueRange": {"low": {"value": 18, "unit": "a"}, "high": {"value": 65, "unit": "a"}}}]}
    assert [(r["low"], r["high"], r["code"]) for r in rows(ad, "quantities", "context-quantity")] == [(18.0, 65.0, "a")]


def test_numbers_with_precision() -> None:
    ra = {"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/1"},
          "prediction": [{"probabilityDecimal": 0.02}, {"probabilityRange": {"low": {"value": 10}, "high": {"value": 20}}}]}
    got = {(r["value"], round(r["low"], 6), round(r["high"], 6)) for r in rows(ra, "numbers", "probability")}
    assert got == {(0.02, 0.015, 0.025), (10.0, 10.0, 20.0)}
    exact = {"resourceType": "RiskAssessment", "prediction": [{"probabilityDecimal": Decimal("1.50")}]}
    (row,) = rows(exact, "numbers", "probability")
    assert (row["low"], row["high"]) == pytest.approx((1.495, 1.505))


def test_relative_core_expression_is_compiled_directly() -> None:
    # InsurancePlan-name is written "name | alias" in R4: FHIRPath resolves it on the resource.
    accessor = compile_expression("name | alias", "InsurancePlan")
    assert accessor.direct
    plan = {"resourceType": "InsurancePlan", "name": "惠民保", "alias": ["Huimin Bao"]}
    assert strings(plan, "name") == {("惠民保", "惠民保"), ("huimin bao", "Huimin Bao")}


# --- robustness ---------------------------------------------------------------------------------


def test_unknown_type_and_odd_values() -> None:
    assert len(index_resource({"resourceType": "NotAType", "id": "x"})) == 0
    with pytest.raises(ValueError):
        index_resource({"id": "no-type"})
    odd = {"resourceType": "Patient", "name": "not a list", "identifier": [None, 7, {"system": 3}],
           "telecom": [{"system": "phone"}], "birthDate": 19900307, "gender": None}
    r = index_resource(odd)
    assert isinstance(r, IndexRows)


def test_rows_have_the_documented_keys() -> None:
    r = index_resource(ZHANG)
    assert set(r.tokens[0]) == {"param", "system", "code", "text"}
    assert set(r.strings[0]) == {"param", "value", "exact"}
    assert set(r.dates[0]) == {"param", "low", "high"}
    assert set(r.references[0]) == {"param", "target_type", "target_id", "url"}
    assert set(r.uris[0]) == {"param", "value"}


# --- the official examples ----------------------------------------------------------------------


def _official_examples() -> Iterator[dict[str, Any]]:
    """Every resource of the package, and every resource inside its Bundles."""
    for path in sorted(package_dir().glob("*.json")):
        if path.name in ("package.json", ".index.json"):
            continue
        resource = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            continue
        yield resource
        if resource["resourceType"] == "Bundle":
            for entry in resource.get("entry") or ():
                if isinstance(entry.get("resource"), dict):
                    yield entry["resource"]


@pytest.fixture(scope="module")
def official_examples() -> list[dict[str, Any]]:
    return list(_official_examples())


def test_every_official_example_indexes(official_examples: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.fhir.indexing")
    total = 0
    for resource in official_examples:
        total += len(index_resource(resource))
    assert len(official_examples) > 5000
    assert total > 100_000
    assert [r.getMessage() for r in caplog.records] == []


def _plain(values: list[Any]) -> list[str]:
    return sorted(json.dumps(v, sort_keys=True, default=float) for v in values)


def test_direct_accessors_agree_with_fhirpath(official_examples: list[dict[str, Any]]) -> None:
    """Each compiled accessor finds what fhirpathpy finds, on a few examples of every type.

    Skipped members: resolve() (fhirpathpy does not implement it) and ``Resource.*`` (fhirpathpy
    does not treat a Patient as a Resource there). fhirpathpy's "singleton expected" errors on
    ``(X as T)`` over collections are also skipped: we are deliberately lenient there.
    """
    compiled: dict[str, Any] = {}
    per_type: dict[str, int] = {}
    checked = 0
    for resource in official_examples:
        rt = resource["resourceType"]
        per_type[rt] = per_type.get(rt, 0) + 1
        if per_type[rt] > 5:
            continue
        for entry in plan_for(rt):
            members = entry.accessor.members if isinstance(entry.accessor, UnionAccessor) else [entry.accessor]
            for m in members:
                if not isinstance(m, DirectAccessor) or "resolve()" in m.expression or m.expression.startswith("Resource."):
                    continue
                fn = compiled.get(m.expression) or compiled.setdefault(
                    m.expression, fhirpathpy.compile(m.expression, model=models["r4"]))
                try:
                    expected = fn(resource)
                except Exception:
                    continue
                got = [v for _, values in m(resource) for v in values]
                assert _plain(got) == _plain(expected), (rt, resource.get("id"), m.expression)
                checked += 1
    assert checked > 3000


def test_all_core_expressions_compile_to_direct_accessors() -> None:
    stats = accessor_stats()
    assert stats.get("params_fallback", 0) == 0, fallback_expressions()
    assert stats["params_direct"] > 2000


def test_date_rows_in_utc_agree_with_datetime() -> None:
    low, high = date_range("2024-03-01T10:30:00+08:00")
    assert datetime.fromtimestamp(low / 1000, UTC).isoformat() == "2024-03-01T02:30:00+00:00"
    assert high - low == 999
