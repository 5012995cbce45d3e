"""FHIR date/dateTime/instant strings as closed ranges of epoch milliseconds (UTC).

A FHIR date is an interval at its precision: ``2024`` is the whole year, ``2024-03-01`` the whole
day. Values without a zone are local time of the deployment, which is China: a fixed +08:00
(China has kept UTC+8 without daylight saving since 1991; a fixed offset keeps index and query
folding identical and independent of the tz database). The query engine uses the same function
for search values, so ``birthdate=2024-03-01`` and a stored ``2024-03-01`` share one range.
"""

from __future__ import annotations

import re

#: Open ends of a Period: the smallest and largest 64-bit integers (Java's Long.MIN/MAX_VALUE).
DATE_MIN = -(2**63)
DATE_MAX = 2**63 - 1

#: Offset, in minutes, applied to values that carry no zone: Asia/Shanghai, +08:00.
DEFAULT_OFFSET_MINUTES = 8 * 60

_DATE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_DAY_MS = 86_400_000


def _is_leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def _days_in_month(y: int, m: int) -> int:
    return 29 if m == 2 and _is_leap(y) else _DAYS_IN_MONTH[m - 1]


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm): pure
    integer arithmetic, valid for years 0000-9999 where datetime would overflow at the ends."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def date_range(value: str) -> tuple[int, int]:
    """``value`` at its precision → (first, last) epoch millisecond, both inclusive.

    >>> date_range("2024-03-01")  # 2024-02-29T16:00:00Z .. 2024-03-01T15:59:59.999Z
    (1709222400000, 1709308799999)

    Raises ValueError for anything that is not a FHIR date, dateTime or instant.
    """
    m = _DATE.match(value.strip()) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"not a FHIR date/dateTime: {value!r}")
    ys, ms, ds, hs, mins, ss, frac, zone = m.groups()
    y = int(ys)
    month = int(ms) if ms else 1
    day = int(ds) if ds else 1
    if not 1 <= month <= 12 or not 1 <= day <= _days_in_month(y, month):
        raise ValueError(f"invalid date: {value!r}")
    hour = int(hs) if hs else 0
    minute = int(mins) if mins else 0
    second = int(ss) if ss else 0
    if hour > 23 or minute > 59 or second > 60:
        raise ValueError(f"invalid time: {value!r}")
    second = min(second, 59)  # a leap second folds onto :59
    millis = 0
    if frac:
        millis = int(frac[:3].ljust(3, "0"))

    # Length of the interval the value denotes, in ms.
    if ms is None:
        span = (_days_from_civil(y + 1, 1, 1) - _days_from_civil(y, 1, 1)) * _DAY_MS
    elif ds is None:
        span = _days_in_month(y, month) * _DAY_MS
    elif hs is None:
        span = _DAY_MS
    elif ss is None:
        span = 60_000
    elif not frac:
        span = 1000
    else:
        span = 10 ** max(0, 3 - len(frac))

    if zone is None:
        offset = DEFAULT_OFFSET_MINUTES
    elif zone == "Z":
        offset = 0
    else:
        offset = int(zone[1:3]) * 60 + int(zone[4:6])
        if zone[0] == "-":
            offset = -offset
    low = (
        _days_from_civil(y, month, day) * _DAY_MS
        + ((hour * 60 + minute - offset) * 60 + second) * 1000
        + millis
    )
    return low, low + span - 1
