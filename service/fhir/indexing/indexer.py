"""index_resource: every search parameter value of one resource, as rows for the idx_* tables.

Per resource type we build a *plan* once: for each indexable parameter its compiled accessor
(see paths.py) and its converter (see values.py). Indexing a resource is then running the plan,
with no FHIRPath parsing and, for nearly all parameters, no FHIRPath evaluation at all.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from service.fhir.indexing.paths import Accessor, UnionAccessor, compile_expression
from service.fhir.indexing.values import ADDRESS_PARTS, CONVERTERS, NAME_PARTS, Collector, Converter, string_converter

log = logging.getLogger(__name__)


@dataclass
class IndexRows:
    """The index rows of one resource, without resource_type/resource_id (the store adds them).

    tokens:      param, system ("" if none), code (str|None), text (normalised display or None)
    strings:     param, value (normalised), exact (as written)
    dates:       param, low, high (epoch ms UTC, closed range)
    references:  param, target_type, target_id, url
    numbers:     param, value, low, high
    quantities:  param, value, low, high, system, code
    uris:        param, value
    token_sets:  digest (filled by the store for the types whose token rows are shared, in
                 place of ``tokens``: ``service.fhir.token_sets``)

    ``Reference.identifier`` values are token rows under param ``"<code>:identifier"``.
    """

    tokens: list[dict] = field(default_factory=list)
    strings: list[dict] = field(default_factory=list)
    dates: list[dict] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    numbers: list[dict] = field(default_factory=list)
    quantities: list[dict] = field(default_factory=list)
    uris: list[dict] = field(default_factory=list)
    token_sets: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.__dict__.values())


@dataclass(frozen=True)
class PlanEntry:
    code: str
    type: str
    accessor: Accessor
    convert: Converter


@lru_cache(maxsize=None)
def plan_for(resource_type: str) -> tuple[PlanEntry, ...]:
    """The compiled parameters of ``resource_type`` that produce index rows.

    Column parameters (_id, _lastUpdated), composites (searched through their components'
    rows), special parameters and parameters that read another's rows are not indexed.
    """
    from service.fhir.searchparams import params_for  # late: searchparams imports this package

    plan = []
    for p in params_for(resource_type).values():
        convert = CONVERTERS.get(p.type)
        if convert is None or p.column or not p.expression or not p.writes_rows:
            continue
        if p.parts_left:
            convert = string_converter(tuple(x for x in NAME_PARTS if x not in p.parts_left),
                                       tuple(x for x in ADDRESS_PARTS if x not in p.parts_left))
        plan.append(PlanEntry(p.code, p.type, compile_expression(p.expression, resource_type), convert))
    return tuple(plan)


def index_resource(resource: dict[str, Any]) -> IndexRows:
    """All index rows of ``resource`` (plain FHIR JSON), de-duplicated.

    A resource type without parameters gives empty rows. A value a converter cannot read is
    skipped, and a parameter that fails outright is logged and skipped: indexing never rejects
    a write that validation accepted.
    """
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise ValueError("resource has no resourceType")
    col = Collector()
    for entry in plan_for(resource_type):
        try:
            for fhir_type, values in entry.accessor(resource):
                for v in values:
                    entry.convert(col, entry.code, fhir_type, v)
        except Exception:  # pragma: no cover - defensive; converters are written not to raise
            log.exception("indexing %s.%s failed", resource_type, entry.code)
    # dict displays over de-duplicated tuples: the cheapest way to the documented row dicts.
    return IndexRows(
        tokens=[{"param": p, "system": s, "code": c, "text": t} for p, s, c, t in dict.fromkeys(col.tokens)],
        strings=[{"param": p, "value": v, "exact": e} for p, v, e in dict.fromkeys(col.strings)],
        dates=[{"param": p, "low": lo, "high": hi} for p, lo, hi in dict.fromkeys(col.dates)],
        references=[
            {"param": p, "target_type": t, "target_id": i, "url": u} for p, t, i, u in dict.fromkeys(col.references)
        ],
        numbers=[{"param": p, "value": v, "low": lo, "high": hi} for p, v, lo, hi in dict.fromkeys(col.numbers)],
        quantities=[
            {"param": p, "value": v, "low": lo, "high": hi, "system": s, "code": k}
            for p, v, lo, hi, s, k in dict.fromkeys(col.quantities)
        ],
        uris=[{"param": p, "value": v} for p, v in dict.fromkeys(col.uris)],
    )


def accessor_stats(resource_types: list[str] | None = None) -> dict[str, int]:
    """How many compiled parameters run as direct accessors and how many need FHIRPath.

    Counted per (resource type, parameter) and per union member.
    """
    from service.fhir.searchparams import supported_types

    counts: Counter[str] = Counter()
    for rt in resource_types or supported_types():
        for entry in plan_for(rt):
            a = entry.accessor
            counts["params_direct" if a.direct else "params_fallback"] += 1
            members = a.members if isinstance(a, UnionAccessor) else [a]
            for m in members:
                counts["members_direct" if m.direct else "members_fallback"] += 1
    return dict(counts)


def fallback_expressions(resource_types: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(resource type, code, expression) of every union member evaluated with FHIRPath."""
    from service.fhir.searchparams import supported_types

    out = []
    for rt in resource_types or supported_types():
        for entry in plan_for(rt):
            a = entry.accessor
            for m in a.members if isinstance(a, UnionAccessor) else [a]:
                if not m.direct:
                    out.append((rt, entry.code, m.expression))
    return out
