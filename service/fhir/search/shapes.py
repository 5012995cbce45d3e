"""Searches of one shape share one SQL statement; only their values change.

Building a search's SQLAlchemy statement (and its cache key) cost more CPU than PostgreSQL
spent running it: ``Patient?identifier=sys|A`` and ``Patient?identifier=sys|B`` built the same
statement twice. :func:`template` splits a request into its *shape* — resource type,
parameters, modifiers, which parts of each value are present, page size — and its values, and
gives back the request with every value replaced by a bound parameter (``:p0``, ``:p1`` ...).
The engine builds the statement from that once per shape and runs it with the values.

Only values that the SQL layer compares as they are take part: tokens (``system|code``,
``_id``), local references (``subject=Patient/1``), strings by prefix (``name=张``: the
folded prefix and its upper bound, computed here) and ``:exact``, dates (``start=ge2026-12-07``:
the range's two ends; the prefix is part of the shape), plus ``:missing``; a sort is part of the
shape. Anything else the builder computes with (``ap`` dates, ``_lastUpdated``, numbers,
``:contains`` patterns, chains, ``_has``), includes or a later page is built per request as
before: :func:`template` answers None.
A caller with a boundary shares statements only with callers of the same visibility
(``AccessPolicy.visibility_key``, applied in ``execute``).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from service.fhir.search.dialect import prefix_upper_bound
from service.fhir.search.model import (
    ID_TYPE,
    Clause,
    DateValue,
    MissingClause,
    ParamClause,
    PrefixRange,
    ReferenceValue,
    SearchRequest,
    TextValue,
    TokenValue,
    Value,
)

#: Parameter types templated, with the modifiers that may come along (None: any).
_TEMPLATED_MODIFIERS = {"token": {None, "not"}, "reference": None, "string": {None, "exact"}, "date": {None},
                        ID_TYPE: None}


class _Values:
    """Collects the values of one request as named bound parameters, in order."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def bind(self, value: str | int) -> Any:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return sa.bindparam(name)


def template(request: SearchRequest) -> tuple[Hashable, SearchRequest, dict[str, Any]] | None:
    """(shape, the request with bound parameters for values, their values), or None when
    this request is built per request (see the module docstring)."""
    if request.cursor is not None or request.includes:
        return None
    values = _Values()
    shapes: list[Hashable] = []
    clauses: list[Clause] = []
    for clause in request.clauses:
        if isinstance(clause, MissingClause):
            shapes.append(clause)
            clauses.append(clause)
            continue
        if not isinstance(clause, ParamClause) or clause.type not in _TEMPLATED_MODIFIERS:
            return None
        modifiers = _TEMPLATED_MODIFIERS[clause.type]
        if modifiers is not None and clause.modifier not in modifiers:
            return None
        templated: list[Value] = []
        for value in clause.values:
            shaped = _template_value(clause, value, values)
            if shaped is None:
                return None
            templated.append(shaped[1])
            shapes.append(shaped[0])
        shapes.append((clause.code, clause.type, clause.modifier, clause.negate, len(clause.values)))
        clauses.append(replace(clause, values=tuple(templated)))
    shape = (request.resource_type, tuple(shapes), tuple(request.sort), request.count, request.summary_count)
    return shape, replace(request, clauses=clauses), values.params


def _template_value(clause: ParamClause, value: Value, values: _Values) -> tuple[Hashable, Value] | None:
    if isinstance(value, TextValue) and clause.type == "string":
        if clause.modifier == "exact":
            return ("exact",), TextValue(values.bind(value.text), "")
        if not value.normalized:
            return None  # an empty prefix matches every value: rare, built as before
        upper = prefix_upper_bound(value.normalized)
        return (("prefix", upper is None),
                PrefixRange(values.bind(value.normalized), None if upper is None else values.bind(upper)))
    if isinstance(value, TokenValue):
        # None (any system / any code) leaves the test out: part of the shape, not a value.
        return (("token", value.system is None, value.code is None),
                TokenValue(None if value.system is None else values.bind(value.system),
                           None if value.code is None else values.bind(value.code)))
    if isinstance(value, DateValue) and value.prefix != "ap":  # ap widens by a distance from now
        return ("date", value.prefix), DateValue(value.prefix, values.bind(value.low), values.bind(value.high))
    if isinstance(value, ReferenceValue) and value.url is None and value.target_id is not None:
        # The type decides which tests are made (and is one of few): part of the shape.
        return ("reference", value.target_type), ReferenceValue(value.target_type, values.bind(value.target_id))
    return None
