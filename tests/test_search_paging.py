"""Keyset paging: stable under concurrent creates and updates, previous links, cursor checks."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl

import pytest
from sqlalchemy.engine import Engine

from service.fhir.errors import BadRequest
from service.fhir.search import SearchPage
from tests.test_search_support import MiniStore

FAMILIES = ["Wang", "Li", "Zhang", "Müller", "Smith"]


def _patient(i: int, family: str | None = None, **extra: object) -> dict:
    resource: dict = {"resourceType": "Patient", "id": f"p{i:02d}", "active": True,
                      "name": [{"family": family or FAMILIES[i % len(FAMILIES)]}]}
    if i % 4:  # every fourth has no birthDate: NULL sort keys
        resource["birthDate"] = f"19{50 + i % 9}-01-0{1 + i % 3}"
    resource.update(extra)
    return resource


@pytest.fixture
def store(clean_db: Engine) -> MiniStore:
    s = MiniStore(clean_db)
    s.put_all([_patient(i) for i in range(50)])
    return s


def _walk(store: MiniStore, query: str, between: Callable[[int], None] | None = None,
          direction: str = "next", start: SearchPage | None = None) -> list[SearchPage]:
    """Every page of ``query``, following ``direction`` links; ``between(n)`` runs after page n."""
    page = start or store.search("Patient", query)
    pages = [page]
    while True:
        link = page.next_link if direction == "next" else page.previous_link
        if link is None:
            return pages
        if between is not None:
            between(len(pages))
        page = store.search("Patient", parse_qsl(link, keep_blank_values=True))
        pages.append(page)
        assert len(pages) < 100, "paging does not terminate"


def _ids(pages: list[SearchPage]) -> list[str]:
    return [rid for page in pages for _, rid, _ in page.matches]


def _churn(store: MiniStore) -> Callable[[int], None]:
    """Between pages: create resources that sort everywhere, and update some originals."""
    def between(n: int) -> None:
        store.put(_patient(0, family="Aaron", id=f"a{n:02d}"))  # sorts first by id and by name
        store.put(_patient(0, family="Li", id=f"p{n * 7:02d}x"))  # sorts right inside the range
        store.put(_patient(0, family="Zz", id=f"z{n:02d}"))  # sorts last
        for i in (n * 7 - 1, n * 7, n * 7 + 3, 49 - n):  # on both sides of the page boundary
            if 0 <= i < 50:
                store.put(_patient(i, active=n % 2 == 0))
    return between


ORIGINAL = [f"p{i:02d}" for i in range(50)]


@pytest.mark.parametrize("query", [
    "_count=7",
    "_count=7&_sort=-_id",
    "_count=7&_sort=family",
    "_count=7&_sort=family,-birthdate",
    "_count=7&_sort=-birthdate,-family",
    "_count=7&_sort=birthdate&_total=none",
])
def test_paging_under_concurrent_writes(store: MiniStore, query: str) -> None:
    pages = _walk(store, query, between=_churn(store))
    ids = _ids(pages)
    assert len(ids) == len(set(ids)), "duplicates across pages"
    assert sorted(ids) == ORIGINAL, "gaps or resources created after the first page"
    assert [len(p.matches) for p in pages] == [7] * 7 + [1]
    expected_total = None if "_total=none" in query else 50
    assert all(p.total == expected_total for p in pages)
    assert pages[0].previous_link is None and pages[-1].next_link is None
    # a new search sees the resources created meanwhile
    assert store.search("Patient", query).total in (None, 50 + 3 * 7)


def test_pages_follow_the_sort_order(store: MiniStore) -> None:
    pages = _walk(store, "_count=7&_sort=family,-birthdate")
    assert _ids(pages) == store.ids("Patient", "_sort=family,-birthdate")
    assert _ids(_walk(store, "_count=7&_sort=-_lastUpdated")) == store.ids("Patient", "_sort=-_lastUpdated")


def test_previous_links_walk_back(store: MiniStore) -> None:
    forward = _walk(store, "_count=7&_sort=family,-birthdate")
    backward = _walk(store, "", direction="previous", start=forward[-1])
    assert [[m[1] for m in p.matches] for p in backward] == [[m[1] for m in p.matches] for p in reversed(forward)]
    assert backward[-1].previous_link is None
    assert all(p.next_link is not None for p in backward[1:])


def test_links_repeat_the_search_parameters(store: MiniStore) -> None:
    page = store.search("Patient", "name=li&_count=3&_sort=-_lastUpdated")
    assert page.self_link == "name=li&_count=3&_sort=-_lastUpdated"
    params = parse_qsl(page.next_link or "")
    assert params[:3] == [("name", "li"), ("_count", "3"), ("_sort", "-_lastUpdated")]
    assert params[3][0] == "_cursor"
    second = store.search("Patient", params)
    assert second.self_link == page.next_link
    ids = _ids(_walk(store, "name=li&_count=3&_sort=-_lastUpdated"))
    assert len(ids) == 10 and len(set(ids)) == 10


def test_deleted_between_pages(store: MiniStore) -> None:
    first = store.search("Patient", "_count=10")
    store.delete("Patient", "p15")
    store.delete("Patient", "p05")  # already seen
    rest = _walk(store, "", start=store.search("Patient", parse_qsl(first.next_link or "")))
    ids = _ids([first, *rest])
    assert len(ids) == len(set(ids))
    assert set(ids) == set(ORIGINAL) - {"p15"}


def test_cursor_validation(store: MiniStore) -> None:
    page = store.search("Patient", "_count=5&_sort=family")
    cursor = dict(parse_qsl(page.next_link or ""))["_cursor"]
    with pytest.raises(BadRequest, match="different search"):
        store.search("Patient", [("_sort", "-family"), ("_cursor", cursor)])
    with pytest.raises(BadRequest, match="different search"):
        store.search("Observation", [("_sort", "family"), ("_cursor", cursor)])
    with pytest.raises(BadRequest, match="_cursor"):
        store.search("Patient", [("_cursor", "not-a-cursor!")])
    with pytest.raises(BadRequest, match="_cursor"):
        store.search("Patient", [("_sort", "family"), ("_cursor", cursor[:-4])])


def test_count_bounds(store: MiniStore) -> None:
    assert len(store.search("Patient").matches) == 20  # the default page size
    page = store.search("Patient", "_count=5000")
    assert len(page.matches) == 50 and page.warnings and "5000" in page.warnings[0].diagnostics
    assert store.search("Patient", "_count=0").matches == []
