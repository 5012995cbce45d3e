"""The search parameter registry (service.fhir.searchparams) and its derived definitions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from service.fhir.definitions import derive_search
from service.fhir.indexing.paths import parts_for_base, split_union
from service.fhir.searchparams import (
    DEFINITIONS_FILE,
    PROFILES_DIR,
    SearchParam,
    get_param,
    load_registry,
    params_for,
    supported_types,
)


def test_patient_parameters() -> None:
    ps = params_for("Patient")
    assert ps["name"].type == "string" and ps["name"].expression == "Patient.name"
    assert ps["name"].base == "Patient" and ps["name"].url == "http://hl7.org/fhir/SearchParameter/Patient-name"
    assert ps["family"].expression == "Patient.name.family"
    assert ps["birthdate"].type == "date"
    assert ps["phone"].expression == "Patient.telecom.where(system='phone')"
    assert ps["organization"].targets == ("Organization",)
    assert ps["identifier"].description == "A patient identifier"
    assert {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"} <= ps.keys()


def test_common_parameters_and_columns() -> None:
    ident = get_param("Observation", "_id")
    assert ident is not None and ident.column and ident.base == "Resource" and ident.type == "token"
    updated = get_param("Observation", "_lastUpdated")
    assert updated is not None and updated.column and updated.type == "date"
    tag = get_param("Observation", "_tag")
    assert tag is not None and not tag.column and tag.expression == "Resource.meta.tag"
    assert get_param("Observation", "_text") is None and get_param("Observation", "_content") is None


def test_unions_are_split_per_type() -> None:
    assert get_param("Practitioner", "name").expression == "Practitioner.name"  # type: ignore[union-attr]
    # clinical-patient covers 32 types, with and without resolve():
    obs = get_param("Observation", "patient")
    assert obs is not None and obs.expression == "Observation.subject.where(resolve() is Patient)"
    assert obs.targets == ("Patient",)
    assert obs.description == "The subject that the observation is about (if patient)"
    allergy = get_param("AllergyIntolerance", "patient")
    assert allergy is not None and allergy.expression == "AllergyIntolerance.patient"
    # a union inside one type survives
    vd = get_param("Observation", "value-date")
    assert vd is not None and vd.expression == "(Observation.value as dateTime) | (Observation.value as Period)"
    ctx = get_param("ActivityDefinition", "context")
    assert ctx is not None and ctx.expression == "(ActivityDefinition.useContext.value as CodeableConcept)"
    bundle = get_param("Bundle", "composition")
    assert bundle is not None and bundle.expression == "Bundle.entry[0].resource"


def test_no_expression_mentions_another_type() -> None:
    from service.fhir.indexing.model import RESOURCE_TYPES
    from service.fhir.indexing.paths import root_of

    for rt in supported_types():
        for p in params_for(rt).values():
            if p.expression:
                for part in split_union(p.expression):
                    root = root_of(part)
                    assert root not in RESOURCE_TYPES or root == rt, (rt, p.code, p.expression)


def test_composites_and_reference_any() -> None:
    cvq = get_param("Observation", "code-value-quantity")
    assert cvq is not None and cvq.type == "composite"
    assert [(c.code, c.expression) for c in cvq.components] == [("code", "code"), ("value-quantity", "value.as(Quantity)")]
    req = get_param("PaymentNotice", "request")
    assert req is not None and "Patient" in req.targets and "Parameters" not in req.targets and len(req.targets) > 140


def test_custom_direction_parameter() -> None:
    d = get_param("ServiceRequest", "direction")
    assert d == SearchParam(
        code="direction",
        type="token",
        base="ServiceRequest",
        expression="ServiceRequest.category",
        targets=(),
        url="https://yilian.example.org/fhir/SearchParameter/referral-direction",
        description=d.description,  # type: ignore[union-attr]
    )
    assert "referral" in d.description  # type: ignore[union-attr]
    assert get_param("Patient", "direction") is None
    assert (PROFILES_DIR / "SearchParameter-yilian-referral-direction.json").is_file()


def test_lookups() -> None:
    assert get_param("Patient", "no-such-param") is None
    assert params_for("NotAType") == {}
    types = supported_types()
    assert types == sorted(types)
    assert {"Patient", "Observation", "ServiceRequest", "Binary"} <= set(types)
    assert "Resource" not in types and "DomainResource" not in types
    p = get_param("Patient", "name")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.code = "x"  # type: ignore[misc, union-attr]


def test_registry_is_cached() -> None:
    assert params_for("Patient") is params_for("Patient")


@pytest.mark.parametrize(
    ("expression", "parts"),
    [
        ("Patient.name | Practitioner.name", ["Patient.name", "Practitioner.name"]),
        ("(A.value as Quantity) | (A.value as Range)", ["(A.value as Quantity)", "(A.value as Range)"]),
        ("A.x.where(y='a|b') | B.z", ["A.x.where(y='a|b')", "B.z"]),
        ("Bundle.entry[0].resource", ["Bundle.entry[0].resource"]),
    ],
)
def test_split_union(expression: str, parts: list[str]) -> None:
    assert split_union(expression) == parts


def test_parts_for_base() -> None:
    expr = "(ActivityDefinition.useContext.value as CodeableConcept) | (Library.useContext.value as CodeableConcept)"
    assert parts_for_base(expr, "Library") == ["(Library.useContext.value as CodeableConcept)"]
    assert parts_for_base("Resource.meta.tag", "Patient") == ["Resource.meta.tag"]
    assert parts_for_base("name | alias", "InsurancePlan") == ["name", "alias"]


def test_string_parameters_with_the_same_values_share_index_rows() -> None:
    patient = params_for("Patient")
    assert patient["name"].keys == ("name", "family", "given") and patient["name"].parts_left == ("family", "given")
    assert patient["phonetic"].keys == patient["name"].keys and not patient["phonetic"].writes_rows
    assert patient["address"].keys == ("address", "address-city", "address-state", "address-postalcode",
                                       "address-country")
    assert patient["family"].keys == ("family",) and patient["family"].writes_rows
    # Organization.phonetic is Organization.name, its name also the aliases: nothing to share
    organization = params_for("Organization")
    assert organization["phonetic"].keys == ("phonetic",) and organization["name"].keys == ("name",)


def test_a_custom_parameter_over_an_address_part_takes_that_part(tmp_path: Path) -> None:
    (tmp_path / "SearchParameter-district.json").write_text(json.dumps(_sp(
        url="https://yilian.example.org/fhir/SearchParameter/district", code="district", type="string",
        base=["Patient"], expression="Patient.address.district")), encoding="utf-8")
    address = load_registry(DEFINITIONS_FILE, tmp_path).params_for("Patient")["address"]
    assert "district" in address.parts_left and "district" in address.keys


def _sp(**kw: object) -> dict:
    return {"resourceType": "SearchParameter", "status": "active", **kw}


def test_adding_a_parameter_is_adding_a_file(tmp_path: Path) -> None:
    (tmp_path / "SearchParameter-region.json").write_text(json.dumps(_sp(
        url="https://yilian.example.org/fhir/SearchParameter/region", code="region", type="string",
        base=["Patient", "Practitioner"], description="Region of the home address",
        expression="Patient.address.district | Practitioner.address.district")), encoding="utf-8")
    (tmp_path / "SearchParameter-gender-override.json").write_text(json.dumps(_sp(
        url="https://yilian.example.org/fhir/SearchParameter/gender", code="gender", type="token",
        base=["Patient"], expression="Patient.gender")), encoding="utf-8")
    (tmp_path / "not-a-parameter.json").write_text("{}", encoding="utf-8")
    reg = load_registry(DEFINITIONS_FILE, tmp_path)
    assert reg.params_for("Patient")["region"].expression == "Patient.address.district"
    assert reg.params_for("Practitioner")["region"].expression == "Practitioner.address.district"
    assert reg.params_for("Patient")["gender"].url == "https://yilian.example.org/fhir/SearchParameter/gender"
    assert "direction" not in reg.params_for("ServiceRequest")  # only this folder's files


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "Patient"},
        _sp(code="x", type="token", base=["Patient"]),  # no expression
        _sp(code="x", type="fuzzy", base=["Patient"], expression="Patient.name"),
        _sp(code="x", type="token", base=["Unicorn"], expression="Unicorn.horn"),
    ],
)
def test_broken_custom_files_fail_loudly(tmp_path: Path, body: dict) -> None:
    (tmp_path / "SearchParameter-broken.json").write_text(json.dumps(body), encoding="utf-8")
    with pytest.raises(ValueError):
        load_registry(DEFINITIONS_FILE, tmp_path)


def test_committed_definitions_are_up_to_date() -> None:
    """search_parameters.json is exactly what derive_search makes of the official package."""
    pkg = derive_search.package_dir()
    derived = derive_search.dumps(derive_search.derive(derive_search.core_search_parameters(pkg)))
    assert derived == DEFINITIONS_FILE.read_text(encoding="utf-8"), (
        "run: python -m service.fhir.definitions.derive_search")


def test_definitions_shape() -> None:
    raw = json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))
    assert set(raw["Resource"]) == {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"}
    assert raw["Resource"]["_id"]["column"] is True
    for rt, params in raw.items():
        for code, d in params.items():
            assert d["type"] in {"number", "date", "string", "token", "reference", "composite", "quantity", "uri", "special"}
            assert d["url"].startswith("http://hl7.org/fhir/SearchParameter/"), (rt, code)
            assert len(d["description"]) <= 200
