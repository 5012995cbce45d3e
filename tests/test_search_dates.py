"""Date prefixes against ranges, exact to the millisecond; zone-less values are Asia/Shanghai.

Search ``2020-01-01`` is [2020-01-01T00:00:00.000+08:00, 2020-01-01T23:59:59.999+08:00].
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from service.fhir.errors import BadRequest
from tests.conftest import empty_store
from tests.test_search_support import MiniStore

EFFECTIVE = {
    "last_ms": {"effectiveDateTime": "2020-01-01T23:59:59.999+08:00"},  # the day's last millisecond
    "next_ms": {"effectiveDateTime": "2020-01-02T00:00:00.000+08:00"},  # the next day's first
    "day": {"effectiveDateTime": "2020-01-01"},
    "month": {"effectiveDateTime": "2020-01"},
    "period": {"effectivePeriod": {"start": "2019-12-31T12:00:00+08:00", "end": "2020-01-01T12:00:00+08:00"}},
    "open": {"effectivePeriod": {"start": "2020-01-01T12:00:00+08:00"}},  # no end
    "utc_sec": {"effectiveDateTime": "2019-12-31T16:00:00Z"},  # = 2020-01-01T00:00:00+08:00 (a second)
    "before_ms": {"effectiveDateTime": "2019-12-31T15:59:59.999Z"},  # the previous day's last ms
    "far": {"effectiveDateTime": "2010-06-01"},
}


@pytest.fixture(scope="module")
def store(engine: sa.Engine) -> MiniStore:
    empty_store(engine)
    s = MiniStore(engine)
    s.put_all([{"resourceType": "Observation", "id": key, "status": "final", "code": {"text": "x"}, **value}
               for key, value in EFFECTIVE.items()])
    s.put({"resourceType": "Patient", "id": "lu1"}, at=datetime(2024, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC))
    s.put({"resourceType": "Patient", "id": "lu2"}, at=datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC))
    s.put({"resourceType": "Patient", "id": "lu3"}, at=datetime(2024, 1, 1, 0, 0, 0, 999_900, tzinfo=UTC))
    return s


@pytest.mark.parametrize("query, expected", [
    ("2020-01-01", {"last_ms", "day", "utc_sec"}),
    ("eq2020-01-01", {"last_ms", "day", "utc_sec"}),
    ("gt2020-01-01", {"next_ms", "month", "open"}),
    ("lt2020-01-01", {"period", "before_ms", "far"}),
    ("ge2020-01-01", {"last_ms", "next_ms", "day", "month", "open", "utc_sec"}),
    ("le2020-01-01", {"last_ms", "day", "period", "utc_sec", "before_ms", "far"}),
    ("sa2020-01-01", {"next_ms"}),
    ("eb2020-01-01", {"before_ms", "far"}),
    ("ne2020-01-01", {"next_ms", "month", "period", "open", "before_ms", "far"}),
    ("ap2020-01-01", set(EFFECTIVE) - {"far"}),
    ("ap1900-01-01", set()),
    # millisecond precision
    ("2020-01-01T23:59:59.999+08:00", {"last_ms"}),
    ("gt2020-01-01T23:59:59.999+08:00", {"next_ms", "month", "open"}),
    ("ge2020-01-02T00:00:00.000+08:00", {"next_ms", "month", "open"}),
    ("lt2020-01-02T00:00:00.000+08:00", {"last_ms", "day", "period", "open", "utc_sec", "before_ms", "far",
                                         "month"}),
    ("sa2020-01-01T23:59:59.998+08:00", {"last_ms", "next_ms"}),
    ("eb2020-01-01T00:00:00.000+08:00", {"before_ms", "far"}),
    # second precision: [00:00:00.000, 00:00:00.999]
    ("2019-12-31T16:00:00Z", {"utc_sec"}),
    ("2020-01-01T00:00:00", {"utc_sec"}),  # no zone: +08:00
    ("2020-01-01T00:00:00+08:00", {"utc_sec"}),
    ("2020-01-01T00:00:00%2B08:00", {"utc_sec"}),
    ("2020-01-01T00:00:00 08:00", {"utc_sec"}),  # '+' decoded to a space by form parsing
    # minute and month precision
    ("2020-01-01T12:00", set()),
    ("2020-01", {"last_ms", "next_ms", "day", "month", "utc_sec"}),
    ("gt2020-01", {"open"}),
    ("2020", {"last_ms", "next_ms", "day", "month", "utc_sec"}),
])
def test_date_prefixes(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("Observation", "date=" + query) == expected


def test_date_or_and(store: MiniStore) -> None:
    assert store.id_set("Observation", "date=sa2020-01-01,eb2020-01-01") == {"next_ms", "before_ms", "far"}
    assert store.id_set("Observation", "date=ge2020-01-01&date=le2020-01-01") == {"last_ms", "day", "utc_sec"}


def test_date_sort(store: MiniStore) -> None:
    # ascending by the start of each range, ties by id
    assert store.ids("Observation", "_sort=date") == [
        "far", "period", "before_ms", "day", "month", "utc_sec", "open", "last_ms", "next_ms"]
    # descending by the end of each range: an open end is the latest
    assert store.ids("Observation", "_sort=-date") == [
        "open", "month", "next_ms", "day", "last_ms", "period", "utc_sec", "before_ms", "far"]


@pytest.mark.parametrize("query, expected", [
    ("2024-01-01T08:00:00+08:00", {"lu1", "lu3"}),  # the whole second .000-.999
    ("2024-01-01T00:00:00Z", {"lu1", "lu3"}),
    ("gt2024-01-01T08:00:00+08:00", {"lu2"}),
    ("ge2024-01-01T08:00:01+08:00", {"lu2"}),
    ("lt2024-01-01T08:00:00.500+08:00", set()),  # lu1 is at .500 exactly
    ("le2024-01-01T08:00:00.500+08:00", {"lu1"}),
    ("2024-01-01T08:00:00.500+08:00", {"lu1"}),
    ("2024-01-01T08:00:00.999+08:00", {"lu3"}),  # .9999 lies within the millisecond .999
    ("gt2024-01-01T08:00:00.999+08:00", {"lu2"}),
    ("ne2024-01-01T08:00:00+08:00", {"lu2"}),
    ("2024-01-01", {"lu1", "lu2", "lu3"}),
    ("sa2024-01-01", set()),
    ("eb2024-01-02", {"lu1", "lu2", "lu3"}),
])
def test_last_updated(store: MiniStore, query: str, expected: set[str]) -> None:
    assert store.id_set("Patient", "_lastUpdated=" + query) == expected


def test_last_updated_sort(store: MiniStore) -> None:
    assert store.ids("Patient", "_sort=_lastUpdated") == ["lu1", "lu3", "lu2"]
    assert store.ids("Patient", "_sort=-_lastUpdated") == ["lu2", "lu3", "lu1"]


@pytest.mark.parametrize("value", ["2020-13-01", "xx2020", "2020-01-01T25:00", "yesterday", "gt", "20200101"])
def test_bad_dates(store: MiniStore, value: str) -> None:
    with pytest.raises(BadRequest, match="date"):
        store.search("Observation", [("date", value)])
