"""Resource validation (service/fhir/validation.py): bindings, references, structure, conformance.

The unit tests below each fail without the derived tables or the walk: fhir.resources alone
accepts ``Patient.gender = "robot"`` and a Patient as general practitioner. The last test runs
every clinical/administrative example of the official package (fetched with ``npm pack``).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.fhir.definitions.derive_validation import ensure_examples_package
from service.fhir.validation import check_known_type, known_resource_types, validate_resource

DEFINITIONS = Path(__file__).resolve().parent.parent / "service" / "fhir" / "definitions"
GENDER_VS = "http://hl7.org/fhir/ValueSet/administrative-gender"
# Conformance/terminology resources: thousands of files that describe FHIR itself, not data.
DEFINITIONAL = frozenset({"StructureDefinition", "ValueSet", "CodeSystem", "SearchParameter", "ConceptMap",
                          "OperationDefinition", "CompartmentDefinition", "NamingSystem", "ImplementationGuide",
                          "StructureMap", "GraphDefinition", "MessageDefinition", "CapabilityStatement",
                          "TerminologyCapabilities"})


def patient(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p1", **fields}


def expressions(issues: list[Any]) -> list[str]:
    return [e for issue in issues for e in issue.expression]


def only_issue(resource: dict[str, Any], **kwargs: Any) -> Any:
    issues = validate_resource(resource, **kwargs)
    assert len(issues) == 1, issues
    return issues[0]


# -- required bindings ----------------------------------------------------------------------------

def test_valid_patient_has_no_issues() -> None:
    assert validate_resource(patient(gender="female", birthDate="1974-12-25", active=True,
                                     name=[{"use": "official", "family": "Chalmers", "given": ["Peter"]}])) == []


def test_gender_outside_the_required_value_set_is_rejected() -> None:
    issue = only_issue(patient(gender="robot"))
    assert (issue.severity, issue.code, issue.expression) == ("error", "code-invalid", ("Patient.gender",))
    assert "'robot'" in issue.diagnostics and GENDER_VS in issue.diagnostics
    assert "female | male | other | unknown" in issue.diagnostics


def test_contact_gender_is_checked_inside_the_backbone_element() -> None:
    issue = only_issue(patient(contact=[{"gender": "male"}, {"gender": "robot"}]))
    assert issue.expression == ("Patient.contact[1].gender",)


def test_datatype_bindings_apply_wherever_the_datatype_is_used() -> None:
    issues = validate_resource(patient(
        identifier=[{"use": "official", "value": "1"}, {"use": "bogus", "value": "2"}],
        contact=[{"name": {"use": "nickname-ish", "family": "X"}}],
        telecom=[{"system": "pager", "value": "1"}, {"system": "pigeon", "value": "2"}],
        address=[{"use": "spaceship"}],
        text={"status": "maybe", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}))
    assert sorted(expressions(issues)) == ["Patient.address[0].use", "Patient.contact[0].name.use",
                                           "Patient.identifier[1].use", "Patient.telecom[1].system",
                                           "Patient.text.status"]
    assert {i.code for i in issues} == {"code-invalid"}


def test_choice_type_uses_of_type_in_the_expression() -> None:
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
                   "valueQuantity": {"value": 70, "comparator": "~"}}
    issue = only_issue(observation)
    assert issue.expression == ("Observation.value.ofType(Quantity).comparator",)


def test_codeable_concept_binding_ignores_codings_of_other_systems() -> None:
    condition = {"resourceType": "Condition", "subject": {"reference": "Patient/1"},
                 "clinicalStatus": {"coding": [
                     {"system": "http://snomed.info/sct", "code": "55561003"},
                     {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}}
    assert validate_resource(condition) == []
    condition["clinicalStatus"]["coding"][1]["code"] = "dormant"
    assert only_issue(condition).expression == ("Condition.clinicalStatus.coding[1].code",)


def test_bindings_inside_extensions_and_primitive_extensions_are_checked() -> None:
    issue = only_issue(patient(birthDate="1970", _birthDate={"extension": [
        {"url": "http://example.org/x", "valueIdentifier": {"use": "robot", "value": "1"}}]}))
    assert issue.expression == ("Patient.birthDate.extension[0].value.ofType(Identifier).use",)


def test_extension_on_an_extension_value_is_valid_r4() -> None:
    # R4B's Extension model lacks _valueString; the official examples use it for translations.
    resource = patient(extension=[{"url": "http://example.org/x", "valueString": "a",
                                   "_valueString": {"extension": [{"url": "lang", "valueCode": "nl"}]}}])
    assert validate_resource(resource) == []


# -- references -----------------------------------------------------------------------------------

def test_reference_to_a_type_the_element_does_not_allow_is_rejected() -> None:
    issue = only_issue(patient(generalPractitioner=[{"reference": "Practitioner/1"}, {"reference": "Patient/1"}]))
    assert issue.expression == ("Patient.generalPractitioner[1].reference",)
    assert "Patient" in issue.diagnostics and "Organization | Practitioner | PractitionerRole" in issue.diagnostics


@pytest.mark.parametrize("reference", [
    {"reference": "http://example.org/fhir/Patient/1"},
    {"reference": "Patient/1/_history/2"},
    {"type": "Patient", "identifier": {"value": "1"}},
    {"type": "http://hl7.org/fhir/StructureDefinition/Patient", "display": "Peter"},
])
def test_absolute_versioned_and_typed_references_are_checked(reference: dict[str, Any]) -> None:
    issue = only_issue(patient(managingOrganization=reference))
    assert issue.expression[0].startswith("Patient.managingOrganization.")


def test_group_is_an_allowed_observation_subject() -> None:
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "subject": {"reference": "Group/1"}}
    assert validate_resource(observation) == []


@pytest.mark.parametrize("reference", [
    {"reference": "#contained-org"}, {"reference": "urn:uuid:3c6ed4b7-d8dc-4cf5-bd2f-d4f1b6c9e8a1"},
    {"identifier": {"system": "urn:oid:1.2.3", "value": "9"}}, {"display": "Dr. Who"},
    {"reference": "Practitioner?identifier=urn:oid:1.2.3|9"},
])
def test_references_that_name_no_type_are_not_judged(reference: dict[str, Any]) -> None:
    assert validate_resource(patient(generalPractitioner=[reference])) == []


# -- structure and datatypes ----------------------------------------------------------------------

def test_bad_date_and_unknown_field_give_expressions() -> None:
    issues = validate_resource(patient(birthDate="1974-13-45", favouriteColour="blue"))
    by_expression = {i.expression: i for i in issues}
    assert set(by_expression) == {("Patient.birthDate",), ("Patient.favouriteColour",)}
    assert by_expression[("Patient.birthDate",)].code == "value"
    assert "'1974-13-45'" in by_expression[("Patient.birthDate",)].diagnostics
    assert by_expression[("Patient.favouriteColour",)].code == "structure"


def test_nested_datatype_error_names_the_path_with_indices() -> None:
    issue = only_issue(patient(contact=[{"name": {"family": "ok"}}, {"name": {"family": 5}}]))
    assert issue.expression == ("Patient.contact[1].name.family",)
    assert "string" in issue.diagnostics


def test_json_value_kinds_are_strict() -> None:
    issues = validate_resource(patient(active="yes", multipleBirthInteger="3"))
    assert sorted(expressions(issues)) == ["Patient.active", "Patient.multipleBirth.ofType(integer)"]


def test_choice_types_are_exclusive_and_required_elements_required() -> None:
    assert expressions(validate_resource(patient(deceasedBoolean=True, deceasedDateTime="2020"))) == ["Patient"]
    issue = only_issue(patient(link=[{"other": {"reference": "Patient/2"}}]))
    assert (issue.code, issue.expression) == ("required", ("Patient.link[0].type",))


def test_null_and_empty_values_are_rejected() -> None:
    issues = validate_resource(patient(name=[], telecom=[{}], birthDate=None))
    assert sorted(expressions(issues)) == ["Patient.birthDate", "Patient.name", "Patient.telecom[0]"]


def test_code_with_a_no_break_space_follows_the_java_regex_of_the_spec() -> None:
    code_system = {"resourceType": "CodeSystem", "status": "active", "content": "complete",
                   "concept": [{"code": "CHEST\u00a0"}]}
    assert validate_resource(code_system) == []


# -- resource types -------------------------------------------------------------------------------

def test_unknown_missing_and_unexpected_resource_types() -> None:
    assert only_issue({"resourceType": "Spaceship"}).code == "invalid"
    assert only_issue({"resourceType": "Resource"}).code == "invalid"
    assert only_issue({"id": "1"}).code == "required"
    issue = only_issue({"resourceType": "Observation"}, expected_type="Patient")
    assert issue.code == "invalid" and "Patient" in issue.diagnostics


def test_known_resource_types_are_the_r4_ones() -> None:
    types = known_resource_types()
    assert len(types) == 146
    assert {"Patient", "Bundle", "Parameters", "MedicinalProduct", "EffectEvidenceSynthesis"} <= types
    assert not {"Resource", "DomainResource", "Citation", "Identifier"} & types  # abstract, R4B/R5, datatype
    assert check_known_type("Patient") and not check_known_type("patient")


def test_r4_only_types_are_checked_without_r4b_models() -> None:
    product = {"resourceType": "MedicinalProduct", "name": [{"productName": "Aspirin"}]}
    assert validate_resource(product) == []
    product["name"][0]["productName"] = 5
    product["combinedPharmaceuticalDoseForm"] = [{"text": "tablet"}]
    product["wingspan"] = 3
    assert sorted(expressions(validate_resource(product))) == [
        "MedicinalProduct.combinedPharmaceuticalDoseForm", "MedicinalProduct.name[0].productName",
        "MedicinalProduct.wingspan"]
    assert expressions(validate_resource({"resourceType": "MedicinalProduct"})) == ["MedicinalProduct.name"]


def test_nested_resources_are_validated_with_their_own_type() -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "MedicinalProduct", "name": [{"productName": "Aspirin"}]}},
        {"resource": patient(gender="robot")}]}
    assert expressions(validate_resource(bundle)) == ["Bundle.entry[1].resource.gender"]
    contained = patient(contained=[{"resourceType": "Organization", "id": "o", "telecom": [{"system": "fax?"}]},
                                   {"resourceType": "Practitioner", "id": "d", "birthDate": "soon", "hobby": "x"}])
    issues = validate_resource(contained)
    assert sorted(expressions(issues)) == ["Patient.contained[0].telecom[0].system",
                                           "Patient.contained[1].birthDate", "Patient.contained[1].hobby"]
    assert any("not defined for Practitioner" in i.diagnostics for i in issues)


# -- the derived tables ---------------------------------------------------------------------------

def test_derived_tables_cover_resources_and_datatypes() -> None:
    bindings = json.loads((DEFINITIONS / "required_bindings.json").read_text("utf-8"))
    targets = json.loads((DEFINITIONS / "reference_targets.json").read_text("utf-8"))
    for path in ("Patient.gender", "Patient.contact.gender", "Identifier.use", "HumanName.use",
                 "ContactPoint.system", "Address.use", "Quantity.comparator", "Narrative.status"):
        assert path in bindings["paths"], path
    gender = bindings["valueSets"][bindings["paths"]["Patient.gender"]]
    assert gender == {"http://hl7.org/fhir/administrative-gender": ["female", "male", "other", "unknown"]}
    assert targets["Patient.generalPractitioner"] == ["Organization", "Practitioner", "PractitionerRole"]
    assert targets["Identifier.assigner"] == ["Organization"]
    assert "Money.currency" not in bindings["paths"]  # ISO 4217 is not in the package: skipped


# -- conformance over the official examples -------------------------------------------------------

@pytest.fixture(scope="session")
def examples_dir() -> Path:
    try:
        return ensure_examples_package()
    except FileNotFoundError as exc:  # only "npm is not installed"; any other failure must fail
        pytest.skip(f"cannot fetch hl7.fhir.r4.examples@4.0.1: {exc}")


def test_official_examples_conform(examples_dir: Path) -> None:
    checked, failures, types = 0, {}, Counter()
    for path in sorted(examples_dir.glob("*.json")):
        if path.name in ("package.json", ".index.json"):
            continue
        resource = orjson.loads(path.read_bytes())
        if resource.get("resourceType") in DEFINITIONAL:
            continue
        checked += 1
        types[resource["resourceType"]] += 1
        original = copy.deepcopy(resource) if checked < 50 else None
        issues = validate_resource(resource, expected_type=resource["resourceType"])
        if original is not None:
            assert resource == original, f"{path.name} was modified by validation"
        if issues:
            failures[path.name] = issues
    passed = checked - len(failures)
    print(f"\nofficial examples: {passed}/{checked} valid ({passed / checked:.2%}) over {len(types)} types")
    for name, issues in failures.items():
        print(f"  FAIL {name}: {len(issues)} issue(s), e.g. {issues[0].diagnostics}")
    assert len(types) >= 120
    assert passed / checked >= 0.98, f"only {passed}/{checked} official examples pass"


# -- the walk alone decides: it accepts nothing pydantic refuses -------------------------------------

def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    found = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found.append(((*path, key), value))
        found += _leaves(value, (*path, key))
    return found


def _mutations(value: Any) -> list[Any]:
    """Plausible client mistakes for a JSON value (each one pydantic or the walk may refuse)."""
    found: list[Any] = [None]
    if isinstance(value, bool):
        found.append(str(value).lower())
    elif isinstance(value, int):
        found += [value + 0.5, str(value), 10**20]
    elif isinstance(value, float):
        found += [str(value)]
    elif isinstance(value, str):
        found += [" " + value, value + " ", "", [value], {"bogus": 1}, 12, "a\tb\nc", "xx"]
        if len(value) >= 10 and value[4:5] == "-":
            found += ["2023-02-30", "2020-13-01T10:00:00Z", "2020-01-01T25:00:00+08:00", value[:10] + "T10:00"]
    elif isinstance(value, dict):
        found += [[value], "text"]
    elif isinstance(value, list) and value:
        found += [value[0], []]
    return found


def test_the_walk_accepts_nothing_pydantic_refuses(examples_dir: Path) -> None:
    """Differential check over mutated official examples: the fast path (the walk alone) and
    the cross-check (pydantic as well) must agree on every accept/refuse decision."""
    import random

    rng = random.Random(20261122)
    paths = sorted(p for p in examples_dir.glob("*.json") if p.name not in ("package.json", ".index.json"))
    compared, disagreements = 0, []
    for path in rng.sample(paths, 250):
        resource = orjson.loads(path.read_bytes())
        leaves = [(p, v) for p, v in _leaves(resource) if p[0] != "resourceType"]
        for _ in range(4):
            where, value = rng.choice(leaves)
            mutated = copy.deepcopy(resource)
            target = mutated
            for key in where[:-1]:
                target = target[key]
            target[where[-1]] = rng.choice(_mutations(value))
            fast = bool(validate_resource(copy.deepcopy(mutated)))
            thorough = bool(validate_resource(copy.deepcopy(mutated), cross_check=True))
            compared += 1
            if fast != thorough:
                disagreements.append(f"{path.name} {where}: {target[where[-1]]!r:.60} fast={fast} pydantic={thorough}")
    assert compared >= 900
    assert disagreements == []


@pytest.mark.parametrize(("field", "value", "where"), [
    ("birthDate", "2023-02-30", "Patient.birthDate"),
    ("multipleBirthInteger", 10**10, "Patient.multipleBirth"),
])
def test_values_the_regex_admits_but_r4_does_not(field: str, value: Any, where: str) -> None:
    """The walk refuses them itself (it alone decides for valid-looking resources)."""
    issue = only_issue(patient(**{field: value}))
    assert issue.expression[0].startswith(where)


def test_a_coding_system_that_is_not_a_string_is_refused_not_a_crash() -> None:
    bad = patient(maritalStatus={"coding": [{"system": ["http://x"], "code": "M"}]})
    assert validate_resource(bad)  # was TypeError (unhashable list) inside the binding check: a 500


def test_base64_must_decode() -> None:
    assert validate_resource({"resourceType": "Binary", "contentType": "text/plain", "data": "xx"})
    assert not validate_resource({"resourceType": "Binary", "contentType": "text/plain", "data": "eHg="})
