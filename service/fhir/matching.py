"""Set-based resolution of the conditional queries of a Bundle.

A Synthea-style transaction carries hundreds of ``ifNoneExist: identifier=sys|value`` and
conditional references ``Patient?identifier=sys|value``. Asking the search engine once per
entry costs one round trip each; :class:`Matcher` answers every plain token equality of the
same parameter with one indexed query, and falls back to the engine for anything else.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING
from urllib.parse import unquote

import sqlalchemy as sa

from service.fhir.searchparams import get_param
from service.fhir.tables import TokenIndex
from service.fhir.token_sets import SHARED_TOKEN_TYPES

if TYPE_CHECKING:
    from service.fhir.store import StoreTransaction

TOKENS = TokenIndex.__table__
# One parameter, no modifier, one value with an explicit system: `identifier=sys|123`.
_SIMPLE_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)=([^&,]+\|[^&,]+)$")
_CHUNK = 400  # (system, code) pairs per IN list: far below the databases' parameter limits

Query = tuple[str, str]  # (resource type, query string)


class Matcher:
    """Answers ``find(type, query)`` from a prefetched cache when it can."""

    def __init__(self, tx: "StoreTransaction") -> None:
        self.tx = tx
        self._cache: dict[Query, list[str]] = {}

    def prefetch(self, queries: set[Query]) -> None:
        groups: dict[tuple[str, str], list[tuple[Query, str, str]]] = defaultdict(list)
        for resource_type, query in queries:
            simple = _simple_token(resource_type, query)
            if simple is not None:
                param, system, code = simple
                groups[(resource_type, param)].append(((resource_type, query), system, code))
        for (resource_type, param), items in groups.items():
            for start in range(0, len(items), _CHUNK):
                self._fetch(resource_type, param, items[start:start + _CHUNK])

    def find(self, resource_type: str, query: str) -> list[str]:
        cached = self._cache.get((resource_type, query))
        return cached if cached is not None else self.tx.find(resource_type, query)

    def remember(self, resource_type: str, query: str, resource_id: str) -> None:
        """A conditional create of this Bundle answers later references with its query."""
        self._cache[(resource_type, query)] = [resource_id]

    def _fetch(self, resource_type: str, param: str, items: list[tuple[Query, str, str]]) -> None:
        rows = self.tx.conn.execute(
            sa.select(TOKENS.c.system, TOKENS.c.code, TOKENS.c.resource_id)
            .where(TOKENS.c.resource_type == resource_type, TOKENS.c.param == param,
                   sa.tuple_(TOKENS.c.system, TOKENS.c.code).in_([(s, c) for _, s, c in items]),
                   self.tx.visible(resource_type, TOKENS.c.resource_type, TOKENS.c.resource_id))
            .distinct()
        ).all()
        found: dict[tuple[str, str], list[str]] = defaultdict(list)
        for system, code, resource_id in rows:
            found[(system, code)].append(resource_id)
        for key, system, code in items:
            self._cache[key] = sorted(found.get((system, code), []))[:2]


def _simple_token(resource_type: str, query: str) -> tuple[str, str, str] | None:
    match = _SIMPLE_TOKEN.match(query)
    if match is None:
        return None
    param = get_param(resource_type, match.group(1))
    if param is None or param.type != "token" or param.column or resource_type in SHARED_TOKEN_TYPES:
        return None  # not a row of ``idx_token``: the search engine answers it
    system, _, code = unquote(match.group(2)).partition("|")
    return (param.code, system, code) if system and code else None
