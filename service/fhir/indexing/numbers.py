"""Numbers with the precision they were written with.

FHIR number search is precision-aware: ``100`` means [99.5, 100.5), ``100.0`` means
[99.95, 100.05). We store the implied range so the query engine can test containment and
overlap in SQL.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

_NUMBER = re.compile(r"^([+-]?)(\d+)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$")


def number_range(value: str) -> tuple[float, float]:
    """The interval implied by a decimal's written precision: half a unit of its last digit.

    ``"100"`` → (99.5, 100.5); ``"1.50"`` → (1.495, 1.505); ``"1e2"`` → (50.0, 150.0) (one
    significant figure). Raises ValueError for text that is not a decimal.
    """
    text = value.strip() if isinstance(value, str) else ""
    m = _NUMBER.match(text)
    if not m:
        raise ValueError(f"not a decimal: {value!r}")
    decimals = len(m.group(3) or "")
    exponent = int(m.group(4) or 0)
    exact = Decimal(text)
    half = Decimal(5).scaleb(exponent - decimals - 1)
    return float(exact - half), float(exact + half)


def number_text(value: Any) -> str | None:
    """A JSON number as the text it was written as, when that can still be known.

    ``json`` hands us int/float (``1.50`` arrives as ``1.5``); a Decimal-parsing loader keeps
    trailing zeros. Booleans are not numbers even though ``bool`` subclasses ``int``.
    """
    if type(value) is bool:
        return None
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return value.strip()
    return None
