"""Searches sorted by one date parameter: the order the spec asks for, on every page.

On PostgreSQL such a search walks the date index (``execute._page_rows_by_date``) instead of
computing every match's sort key, when its criteria are on the sort parameter alone; otherwise,
and on SQLite, the generic page query runs. Both must give this
order: descending by the latest end of a resource's values, ascending by the earliest start,
resources without a value last, ties by id — through forward and backward pages.

Goals with several targets give several values for ``target-date``; year-only dates are
ranges (``2020`` ends after ``2020-06-15``, and with ``2020-12-31``); some Goals have no target
at all.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from sqlalchemy.engine import Engine

from service.fhir.indexing.dates import date_range
from service.fhir.search import SearchPage
from tests.test_search_support import MiniStore

DUE = ["2020-03-01", "2020", "2021-01-15", "2019-12-31", "2020-03-01", "2020-06-15", "2021"]


#: Values that tie with another of the same resource: the same end (descending key), the same
#: start (ascending key).
TIES = {2: ["2020", "2020-12-31"], 3: ["2020-01-01", "2020"]}


def _goal(i: int) -> dict:
    dues = [] if i % 8 == 0 else TIES.get(i % 8) or [DUE[(i * k + k) % len(DUE)] for k in range(1, 1 + i % 3 + 1)]
    goal: dict = {"resourceType": "Goal", "id": f"g{i:02d}", "lifecycleStatus": "active" if i % 3 else "completed",
                  "description": {"text": f"goal {i}"}, "subject": {"reference": "Patient/p1"}}
    if dues:
        goal["target"] = [{"dueDate": d} for d in dues]
    return goal


GOALS = [_goal(i) for i in range(40)]


#: Filters: none; another parameter (PostgreSQL then starts from its matches: the generic page);
#: the sort parameter itself (the walk). ``ge2020-03-01`` keeps a Goal with any target that day
#: or ending later: every value but 2019-12-31 and 2020-01-01.
FILTERS = {
    None: lambda goal: True,
    "lifecycle-status=active": lambda goal: goal["lifecycleStatus"] == "active",
    "target-date=ge2020-03-01": lambda goal: any(t["dueDate"] not in ("2019-12-31", "2020-01-01")
                                                  for t in goal.get("target", [])),
}


def _expected(descending: bool, criteria: str | None = None) -> list[str]:
    def key(goal: dict) -> tuple:
        ranges = [date_range(t["dueDate"]) for t in goal.get("target", [])]
        if not ranges:
            return (1, 0, goal["id"])  # no value: last, by id
        value = max(high for _, high in ranges) if descending else min(low for low, _ in ranges)
        return (0, -value if descending else value, goal["id"])
    chosen = [g for g in GOALS if FILTERS[criteria](g)]
    return [g["id"] for g in sorted(chosen, key=key)]


@pytest.fixture
def store(clean_db: Engine) -> MiniStore:
    s = MiniStore(clean_db)
    s.put_all(GOALS)
    return s


def _walk(store: MiniStore, query: str, direction: str = "next", start: SearchPage | None = None) -> list[SearchPage]:
    page = start or store.search("Goal", query)
    pages = [page]
    while (link := page.next_link if direction == "next" else page.previous_link) is not None:
        page = store.search("Goal", parse_qsl(link, keep_blank_values=True))
        pages.append(page)
        assert len(pages) < 50, "paging does not terminate"
    return pages


def _ids(pages: list[SearchPage]) -> list[str]:
    return [rid for page in pages for _, rid, _ in page.matches]


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("criteria", list(FILTERS))
def test_pages_follow_the_date_order(store: MiniStore, descending: bool, criteria: str | None) -> None:
    query = f"_sort={'-' if descending else ''}target-date&_count=3"
    if criteria:
        query += f"&{criteria}"
    expected = _expected(descending, criteria)
    assert len(expected) > 12 and any("target" not in g for g in GOALS)
    forward = _walk(store, query)
    assert _ids(forward) == expected
    assert all(len(p.matches) == 3 for p in forward[:-1])
    backward = _walk(store, query, direction="previous", start=forward[-1])
    assert _ids(list(reversed(backward))) == expected
    assert store.ids("Goal", query.replace("_count=3", "_count=100")) == expected  # one page, same order


def test_a_page_that_ends_among_the_valueless(store: MiniStore) -> None:
    """Paging on from a resource without a value, and back across the boundary."""
    expected = _expected(True)
    valued = sum(1 for g in GOALS if "target" in g)
    first = store.search("Goal", f"_sort=-target-date&_count={valued + 2}")
    assert [m[1] for m in first.matches] == expected[:valued + 2]
    rest = _walk(store, "", start=first)
    assert _ids(rest) == expected
    back = _walk(store, "", direction="previous", start=rest[-1])
    assert _ids(list(reversed(back))) == expected
