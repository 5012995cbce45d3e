"""Searches of one shape share one statement (service/fhir/search/shapes.py): what is
templated, that values never leak from one search into another, and that paging, totals and
boundaries still hold on a shared statement."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
import sqlalchemy as sa

from service.fhir.search import execute as engine_module
from service.fhir.search.parse import parse_search
from service.fhir.search.shapes import template
from tests.conftest import empty_store
from tests.test_search_support import MiniStore

MRN = "urn:oid:2.16.156.10011.1.1"


def _request(resource_type: str, query: str):  # type: ignore[no-untyped-def]
    return parse_search(resource_type, parse_qsl(query, keep_blank_values=True))


@pytest.fixture(scope="module")
def store(engine: sa.Engine) -> MiniStore:
    empty_store(engine)
    s = MiniStore(engine)
    s.put_all([
        {"resourceType": "Patient", "id": f"s{i}", "gender": "female" if i % 2 else "male",
         "name": [{"family": "张王李赵钱孙李"[i], "given": ["三" if i < 3 else "四"]}],
         "identifier": [{"system": MRN, "value": f"11010519800101{i:04d}"}], "birthDate": f"{1980 + i}-06-15"}
        for i in range(7)
    ] + [
        {"resourceType": "Observation", "id": f"o{i}", "status": "final", "code": {"text": "x"},
         "subject": {"reference": f"Patient/s{i % 3}"}}
        for i in range(6)
    ])
    return s


def test_values_are_parameters_and_the_shape_is_the_rest() -> None:
    a = template(_request("Patient", f"identifier={MRN}|110105198001010001"))
    b = template(_request("Patient", f"identifier={MRN}|110105198001010002"))
    assert a is not None and b is not None
    assert a[0] == b[0]  # one shape
    assert a[2] == {"p0": MRN, "p1": "110105198001010001"}
    assert b[2]["p1"] == "110105198001010002"
    # a value without a system is another shape (the system test is left out, not bound)
    no_system = template(_request("Patient", "identifier=110105198001010001"))
    assert no_system is not None and no_system[0] != a[0] and no_system[2] == {"p0": "110105198001010001"}
    # two values OR-ed, :not, _id lists and local references are templated too
    for query in ("gender=male,female", "gender:not=male", "_id=s1,s2", "subject=Patient/s1",
                  "subject:Patient=s1", "status=final&subject=Patient/s1", "gender:missing=true"):
        assert template(_request("Patient" if "gender" in query or "_id" in query else "Observation", query)), query
    assert template(_request("Patient", "_id=s1"))[0] != template(_request("Patient", "_id=s1,s2"))[0]  # type: ignore[index]
    assert template(_request("Patient", "_count=5&gender=male"))[0] != template(_request("Patient", "gender=male"))[0]  # type: ignore[index]


def test_string_prefixes_are_parameters_with_their_upper_bound() -> None:
    zhang = template(_request("Patient", "name=张"))
    li = template(_request("Patient", "family=Li"))
    wang = template(_request("Patient", "name=王"))
    assert zhang is not None and li is not None and wang is not None
    assert zhang[0] == wang[0] != li[0]  # same parameter, same shape; another parameter, another
    assert zhang[2] == {"p0": "张", "p1": chr(ord("张") + 1)}  # [prefix, next code point)
    assert li[2] == {"p0": "li", "p1": "lj"}  # folded as indexed
    exact = template(_request("Patient", "name:exact=张三"))
    assert exact is not None and exact[2] == {"p0": "张三"} and exact[0] != zhang[0]


def test_dates_are_parameters_and_their_prefix_and_the_sort_are_the_shape() -> None:
    a = template(_request("Patient", "birthdate=ge1980-01-01&_sort=-birthdate"))
    b = template(_request("Patient", "birthdate=ge1990-05-01&_sort=-birthdate"))
    assert a is not None and b is not None and a[0] == b[0]
    assert a[2] == {"p0": 315504000000, "p1": 315590399999}  # 1980-01-01 in +08:00, as epoch ms (date_range)
    assert b[2]["p0"] > a[2]["p0"]
    for other in ("birthdate=le1980-01-01&_sort=-birthdate", "birthdate=ge1980-01-01&_sort=birthdate",
                  "birthdate=ge1980-01-01"):
        shaped = template(_request("Patient", other))
        assert shaped is not None and shaped[0] != a[0], other


@pytest.mark.parametrize("query", [
    "birthdate=ap1980", "name:contains=张", "identifier:text=x",
    "gender=male&_include=Patient:organization", "general-practitioner.name=x",
    "_has:Observation:subject:status=final", "_lastUpdated=gt2020", "subject=http://elsewhere/fhir/Patient/1",
])
def test_what_the_builder_computes_with_is_built_per_request(query: str) -> None:
    resource_type = "Observation" if query.startswith("subject=") else "Patient"
    assert template(_request(resource_type, query)) is None


def test_searches_of_one_shape_share_a_statement_and_keep_their_values(store: MiniStore) -> None:
    engine_module._PLANS.clear()
    for i in range(7):
        assert store.ids("Patient", f"identifier={MRN}|11010519800101{i:04d}") == [f"s{i}"]
    assert len(engine_module._PLANS) == 1
    assert store.id_set("Observation", "subject=Patient/s1") == {"o1", "o4"}
    assert store.id_set("Observation", "subject=Patient/s2") == {"o2", "o5"}
    assert store.id_set("Patient", "_id=s1,s6") == {"s1", "s6"}
    assert store.id_set("Patient", "_id=s2,s3") == {"s2", "s3"}
    assert len(engine_module._PLANS) == 3


def test_name_searches_of_one_shape_keep_their_values(store: MiniStore) -> None:
    engine_module._PLANS.clear()
    assert store.id_set("Patient", "family=张") == {"s0"}
    assert store.id_set("Patient", "family=李") == {"s2", "s6"}
    assert store.id_set("Patient", "family=赵") == {"s3"}
    assert store.id_set("Patient", "name=三") == {"s0", "s1", "s2"}
    assert store.id_set("Patient", "family:exact=李") == {"s2", "s6"}
    assert store.id_set("Patient", "family:exact=钱") == {"s4"}
    assert len(engine_module._PLANS) == 3  # family prefix, name prefix, family:exact


def test_dated_and_sorted_searches_of_one_shape_keep_their_values(store: MiniStore) -> None:
    engine_module._PLANS.clear()
    assert store.ids("Patient", "birthdate=ge1984&_sort=-birthdate") == ["s6", "s5", "s4"]
    assert store.ids("Patient", "birthdate=ge1982-06-15&_sort=-birthdate") == ["s6", "s5", "s4", "s3", "s2"]
    assert store.ids("Patient", "birthdate=lt1982&_sort=birthdate") == ["s0", "s1"]
    assert store.ids("Patient", "birthdate=lt1981&_sort=birthdate") == ["s0"]
    assert store.ids("Patient", "gender=female&_sort=-birthdate") == ["s5", "s3", "s1"]
    assert store.ids("Patient", "gender=male&_sort=-birthdate") == ["s6", "s4", "s2", "s0"]
    assert len(engine_module._PLANS) == 3


def test_pages_and_totals_of_a_shared_statement(store: MiniStore) -> None:
    first = store.search("Patient", "gender=female&_count=2")
    assert first.total == 3 and len(first.matches) == 2 and first.next_link
    again = store.search("Patient", "gender=male&_count=2")  # same shape, other values
    assert again.total == 4 and len(again.matches) == 2
    cursor = dict(parse_qsl(first.next_link))["_cursor"]
    second = store.search("Patient", [("gender", "female"), ("_count", "2"), ("_cursor", cursor)])
    assert [m[1] for m in first.matches + second.matches] == ["s1", "s3", "s5"]
    assert store.search("Patient", "gender=male&_summary=count").total == 4
    assert store.search("Patient", "gender=female&_summary=count").total == 3


def test_a_caller_with_a_boundary_gets_a_statement_of_its_own(store: MiniStore) -> None:
    engine_module._PLANS.clear()

    def only_s1(resource_type: str, type_col: sa.ColumnElement, id_col: sa.ColumnElement) -> sa.ColumnElement:
        return id_col == "s1"

    assert store.id_set("Patient", "gender=female", visible=only_s1) == {"s1"}
    assert len(engine_module._PLANS) == 0
    assert store.id_set("Patient", "gender=female") == {"s1", "s3", "s5"}  # the shared one sees all
    assert store.id_set("Patient", "gender=female", visible=lambda *_: None) == {"s1", "s3", "s5"}
    assert len(engine_module._PLANS) == 1


def test_conditional_matches_share_statements_too(store: MiniStore) -> None:
    engine_module._PLANS.clear()
    for i in range(7):
        assert store.find("Patient", f"identifier={MRN}|11010519800101{i:04d}") == [f"s{i}"]
    assert store.find("Patient", "gender=male", limit=10) == ["s0", "s2", "s4", "s6"]
    assert store.find("Patient", "gender=male", limit=2) == ["s0", "s2"]
    assert len(engine_module._PLANS) == 3  # identifier, gender with limit 10, gender with limit 2


def test_the_statement_cache_builds_once_keeps_none_and_stays_bounded() -> None:
    from service.fhir.statements import StatementCache

    built: list[str] = []

    def build(value: str | None) -> str | None:
        built.append(str(value))
        return value

    cache: StatementCache[str | None] = StatementCache(bound=3)
    assert cache.get("a", lambda: build("A")) == "A"
    assert cache.get("a", lambda: build("other")) == "A"
    assert cache.get("none", lambda: build(None)) is None
    assert cache.get("none", lambda: build("rebuilt")) is None  # None is a value too (no boundary)
    assert built == ["A", "None"]
    cache.get("b", lambda: build("B"))
    cache.get("c", lambda: build("C"))  # past the bound: emptied, then kept
    assert len(cache) == 1
