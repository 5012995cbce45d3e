"""Bundle.total without counting millions: exact up to a limit, carried from page to page.

A search without ``_total`` counts its matches only up to ``YILIAN_EXACT_TOTAL_LIMIT``: below
it Bundle.total is exact, above it the total is left out and an informational issue says so.
``_total=accurate`` counts them all, ``_total=estimate`` asks PostgreSQL's planner beyond the
limit (SQLite has no planner estimate: it counts). Whatever the first page learnt travels in
its cursors, so later pages never count again. Here the limit is 10 and the store holds 50
Patients, 10 of each family.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qsl

import httpx
import pytest
from sqlalchemy.engine import Engine

from service.config import get_settings
from service.fhir.errors import BadRequest
from service.fhir.search import SearchPage
from service.fhir.search import cursor as cursor_codec
from service.fhir.search.model import Cursor, KnownTotal
from tests.test_search_support import MiniStore

LIMIT = 10
FAMILIES = ["Wang", "Li", "Zhang", "Chen", "Zhao"]  # no name a prefix of another


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("YILIAN_EXACT_TOTAL_LIMIT", str(LIMIT))
    get_settings.cache_clear()
    yield LIMIT
    get_settings.cache_clear()


@pytest.fixture
def store(clean_db: Engine, limit: int) -> MiniStore:
    s = MiniStore(clean_db)
    s.put_all([{"resourceType": "Patient", "id": f"p{i:02d}", "name": [{"family": FAMILIES[i % 5]}]}
               for i in range(50)])
    return s


def _next(store: MiniStore, page: SearchPage) -> SearchPage:
    assert page.next_link is not None
    return store.search("Patient", parse_qsl(page.next_link, keep_blank_values=True))


def _notes(page: SearchPage) -> list[str]:
    return [i.diagnostics for i in page.warnings if i.severity == "information"]


def test_without_total_the_count_stops_past_the_limit(store: MiniStore) -> None:
    exactly = store.search("Patient", "family=Wang&_count=3")
    assert exactly.total == LIMIT and _notes(exactly) == []
    above = store.search("Patient", "family=Wang,Li&_count=3")
    assert above.total is None
    assert _notes(above) == [f"More than {LIMIT} matches: Bundle.total is left out. Ask _total=accurate to "
                             "have them all counted, or _total=estimate for the database's estimate"]
    assert above.warnings[0].expression == ("_total",)
    assert store.search("Patient", "_count=100").total == 50  # the whole result on one page: known anyway


def test_accurate_and_count_requests_count_everything(store: MiniStore) -> None:
    assert store.search("Patient", "_count=7&_total=accurate").total == 50
    assert store.search("Patient", "_summary=count").total == 50
    assert store.search("Patient", "_count=0").total == 50
    assert store.search("Patient", "_count=7&_total=none").total is None


def test_later_pages_take_the_total_from_the_cursor(store: MiniStore) -> None:
    first = store.search("Patient", "family=Wang&_count=3&_total=accurate")
    assert first.total == 10
    store.put({"resourceType": "Patient", "id": "p00", "name": [{"family": "Zhou"}]})  # no longer a Wang
    second = _next(store, first)
    assert second.total == 10  # from the cursor: not counted again (a count would say 9)
    assert store.search("Patient", "family=Wang&_count=3&_total=accurate").total == 9
    assert _next(store, second).previous_link is not None


def test_more_than_the_limit_is_carried_too(store: MiniStore) -> None:
    first = store.search("Patient", "family=Wang,Li&_count=3")
    assert first.total is None and _notes(first)
    for i in range(0, 50, 5):  # every Wang becomes a Zhou: 10 matches left, an exact count now
        store.put({"resourceType": "Patient", "id": f"p{i:02d}", "name": [{"family": "Zhou"}]})
    second = _next(store, first)
    assert second.total is None and _notes(second)  # carried: not counted again
    assert store.search("Patient", "family=Wang,Li&_count=3").total == 10


def test_estimate(store: MiniStore, clean_db: Engine) -> None:
    assert store.search("Patient", "family=Wang&_count=3&_total=estimate").total == 10  # within the limit: exact
    for query, matches in (("_count=7&_total=estimate", 50), ("family=Wang,Li&_count=3&_total=estimate", 20)):
        page = store.search("Patient", query)
        if clean_db.dialect.name == "postgresql":  # the planner's figure, never below what was counted
            assert page.total is not None and page.total > LIMIT
        else:
            assert page.total == matches  # no planner estimate: counted
        assert _notes(page) == []
        assert _next(store, page).total == page.total


def test_cursor_round_trip_and_a_forged_total() -> None:
    fp = cursor_codec.fingerprint("Patient", [])
    for known in (None, KnownTotal("exact", 7), KnownTotal("estimate", 12000), KnownTotal("more", 1000)):
        cursor = Cursor(5, ("p01",), False, known)
        assert cursor_codec.decode(cursor_codec.encode(cursor, fp), fp) == cursor
    import base64

    import orjson
    for bad in (["exact"], ["many", 3], ["exact", -1], ["exact", "7"], "7"):
        raw = base64.urlsafe_b64encode(orjson.dumps({"v": 1, "s": 5, "k": ["p01"], "f": fp, "t": bad})).decode()
        with pytest.raises(BadRequest):
            cursor_codec.decode(raw, fp)


async def test_the_bundle_says_why_it_has_no_total(client: httpx.AsyncClient, store: MiniStore) -> None:
    response = await client.get("/Patient", params={"family": "Wang,Li", "_count": "3"})
    assert response.status_code == 200
    bundle = response.json()
    assert "total" not in bundle
    outcome = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert [i["severity"] for i in outcome[0]["resource"]["issue"]] == ["information"]
    assert outcome[0]["resource"]["issue"][0]["expression"] == ["_total"]
    following = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    second = (await client.get(following)).json()
    assert "total" not in second and sum(e["search"]["mode"] == "match" for e in second["entry"]) == 3
    counted = (await client.get("/Patient", params={"family": "Wang,Li", "_total": "accurate"})).json()
    assert counted["total"] == 20
