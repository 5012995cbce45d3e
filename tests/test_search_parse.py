"""``parse_search`` without a database: warnings vs strict, malformed values, escaping."""

from __future__ import annotations

import pytest

from service.fhir.errors import BadRequest
from service.fhir.search import parse_search
from service.fhir.search.model import (
    ChainClause,
    HasClause,
    IncludeSpec,
    MissingClause,
    ParamClause,
    ReferenceValue,
    SortSpec,
    TextValue,
    TokenValue,
)


def test_unknown_parameter_is_a_warning_or_an_error() -> None:
    request = parse_search("Patient", [("nosuch", "1"), ("name", "x")])
    assert len(request.clauses) == 1
    [warning] = request.warnings
    assert warning.severity == "warning" and "nosuch" in warning.diagnostics
    with pytest.raises(BadRequest, match="nosuch") as err:
        parse_search("Patient", [("nosuch", "1")], strict=True)
    assert err.value.issues[0].expression == ("nosuch",)


@pytest.mark.parametrize("name, value", [
    ("code-value-quantity", "http://loinc.org|1|5"),  # composite
    ("_text", "fever"),
    ("_content", "fever"),
    ("_list", "l1"),
    ("_has:Nope:subject:status", "x"),
    ("subject.nosuch", "x"),
    ("_sort", "nosuch"),
    ("_sort", "subject"),  # reference parameters are not sortable
    ("_include", "Observation:nosuch"),
    ("_revinclude", "*"),
])
def test_unsupported_is_a_warning_or_an_error(name: str, value: str) -> None:
    request = parse_search("Observation", [(name, value)])
    assert request.warnings and not request.clauses
    with pytest.raises(BadRequest):
        parse_search("Observation", [(name, value)], strict=True)


def test_silent_and_empty_parameters() -> None:
    request = parse_search("Patient", [("_format", "json"), ("_pretty", "true"), ("name", "")], strict=True)
    assert not request.warnings and not request.clauses
    assert request.link_params == [("_format", "json"), ("_pretty", "true"), ("name", "")]


@pytest.mark.parametrize("name, value, message", [
    ("Patient.birthdate", "xx2020", "unknown prefix"),
    ("Patient.birthdate", "2020-02-30", "birthdate"),
    ("RiskAssessment.probability", "abc", "unknown prefix"),
    ("RiskAssessment.probability", "1.2.3", "not a number"),
    ("RiskAssessment.probability", "gtx", "not a number"),
    ("value-quantity", "5|a", "value-quantity"),
    ("identifier", "a|b|c", "identifier"),
    ("_count", "abc", "_count"),
    ("_count", "-1", "_count"),
    ("_total", "some", "_total"),
    ("_summary", "maybe", "_summary"),
    ("Patient.active:missing", "maybe", "true or false"),
    ("identifier:of-type", "http://terminology.hl7.org/CodeSystem/v2-0203|MR|123", "of-type"),
    ("code:in", "http://example.org/vs", ":in"),
    ("code:below", "123", ":below"),
    ("Patient.gender:exact", "male", ":exact"),
    ("Patient.name:text", "x", ":text"),
    ("Patient.name:foo", "x", ":foo"),
    ("subject:Nope", "1", ":Nope"),
    ("subject", "Patient/1/extra", "subject"),
    ("_has:Task", "x", "_has:Type"),
    ("_has:Task:status:status", "x", "not a reference"),
    ("_include", "Observation", "_include"),
    ("_include", "Observation:status", "not a reference"),
    ("_include:foo", "Observation:subject", ":foo"),
    ("_lastUpdated:missing", "true", "_lastUpdated"),
    ("status.name", "x", "not a reference"),
    ("subject.organization.partof.partof.name", "x", "chains more than"),
])
def test_malformed_values_are_errors(name: str, value: str, message: str) -> None:
    resource_type = "Observation"
    if name[0].isupper():
        resource_type, name = name.split(".", 1)
    with pytest.raises(BadRequest, match=message) as err:
        parse_search(resource_type, [(name, value)])
    assert name.split(":")[0].split(".")[0] in str(err.value) or message in str(err.value)


def test_unknown_resource_type() -> None:
    with pytest.raises(BadRequest, match="Nope"):
        parse_search("Nope", [])


def test_commas_and_escapes() -> None:
    [clause] = parse_search("Patient", [("name", r"a\,b")]).clauses
    assert isinstance(clause, ParamClause) and clause.values == (TextValue("a,b", "a,b"),)
    [clause] = parse_search("Patient", [("name", "a,B")]).clauses
    assert clause.values == (TextValue("a", "a"), TextValue("B", "b"))
    [clause] = parse_search("Patient", [("identifier", r"urn:x\|y|1\\2,|3")]).clauses
    assert clause.values == (TokenValue("urn:x|y", "1\\2"), TokenValue("", "3"))
    [clause] = parse_search("Patient", [("identifier", "urn:x|")]).clauses
    assert clause.values == (TokenValue("urn:x", None),)


def test_clause_kinds() -> None:
    request = parse_search("Observation", [
        ("subject.name", "x"), ("_has:Provenance:target:agent", "Practitioner/1"), ("subject:missing", "true"),
        ("subject:identifier", "s|1"), ("patient", "7"), ("code", "s|c"),
    ])
    kinds = [type(c) for c in request.clauses]
    # planned: full tokens first (in the order given), then references, chains/_has, :missing last
    assert kinds == [ParamClause, ParamClause, ParamClause, ChainClause, HasClause, MissingClause]
    identifier, token, patient = request.clauses[:3]
    assert token.code == "code" and identifier.code == "subject:identifier" and identifier.type == "token"
    assert patient.values == (ReferenceValue("Patient", "7"),)  # single target: type implied
    chain = request.clauses[3]
    assert isinstance(chain, ChainClause) and "Patient" in dict(chain.targets)
    missing = request.clauses[5]
    assert isinstance(missing, MissingClause)
    assert missing.codes == (("reference", "subject"), ("token", "subject:identifier"))


def test_result_parameters() -> None:
    request = parse_search("Observation", [
        ("_count", "7"), ("_sort", "-date,status,_id"), ("_total", "none"), ("_summary", "data"),
        ("_elements", "status, code"), ("_include", "Observation:subject:Patient"),
        ("_include:iterate", "Patient:organization"), ("_revinclude", "Provenance:target"), ("_include", "*"),
    ])
    assert request.count == 7 and request.total == "none" and request.summary == "data"
    assert request.elements == ("status", "code")
    assert request.sort == [SortSpec("date", "date", True), SortSpec("status", "token"), SortSpec("_id", "_id")]
    assert request.includes == [
        IncludeSpec("Observation", "subject", "Patient"),
        IncludeSpec("Patient", "organization", None, iterate=True),
        IncludeSpec("Provenance", "target", None, reverse=True),
        IncludeSpec("Observation", None),
    ]
    assert parse_search("Observation", [("_summary", "count")]).summary_count
    assert parse_search("Observation", [("_count", "100000")]).count == 1000


def test_chain_through_any_reference_needs_a_type() -> None:
    with pytest.raises(BadRequest, match="ambiguous"):
        parse_search("Task", [("focus.identifier", "s|1")])
    [clause] = parse_search("Task", [("focus:Patient.identifier", "s|1")]).clauses
    assert isinstance(clause, ChainClause) and [t for t, _ in clause.targets] == ["Patient"]
