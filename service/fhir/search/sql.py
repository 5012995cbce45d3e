"""Criteria → SQL. Only index tables and the ``resource`` table are ever read here.

Every criterion becomes ``r.id IN (SELECT resource_id FROM idx_x WHERE resource_type = :t
AND param = :p AND <value test>)`` (or ``NOT IN`` for ``:not`` / ``:missing=true``); AND-ed
criteria are AND-ed membership tests, OR-ed values are OR-ed inside one subquery. Index rows
exist only for current versions of live resources, so an index subquery already answers "which
live resources of this type match", and chains / ``_has`` compose such subqueries.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from service.fhir import tables, token_sets
from service.fhir.search.dialect import Dialect
from service.fhir.search.model import (
    ID_TYPE,
    LAST_UPDATED_TYPE,
    ChainClause,
    Clause,
    DateValue,
    HasClause,
    MissingClause,
    NumberValue,
    ParamClause,
    PrefixRange,
    QuantityValue,
    ReferenceValue,
    SortSpec,
    TextValue,
    TokenValue,
    UriValue,
)
from service.fhir.searchparams import get_param

RESOURCE: sa.Table = tables.ResourceRow.__table__  # type: ignore[attr-defined]
VERSION: sa.Table = tables.ResourceVersion.__table__  # type: ignore[attr-defined]
TOKEN: sa.Table = tables.TokenIndex.__table__  # type: ignore[attr-defined]
STRING: sa.Table = tables.StringIndex.__table__  # type: ignore[attr-defined]
DATE: sa.Table = tables.DateIndex.__table__  # type: ignore[attr-defined]
REFERENCE: sa.Table = tables.ReferenceIndex.__table__  # type: ignore[attr-defined]
NUMBER: sa.Table = tables.NumberIndex.__table__  # type: ignore[attr-defined]
QUANTITY: sa.Table = tables.QuantityIndex.__table__  # type: ignore[attr-defined]
URI: sa.Table = tables.UriIndex.__table__  # type: ignore[attr-defined]

INDEX_BY_TYPE: dict[str, sa.Table] = {
    "token": TOKEN, "string": STRING, "date": DATE, "reference": REFERENCE,
    "number": NUMBER, "quantity": QUANTITY, "uri": URI,
}

_MS = timedelta(milliseconds=1)

#: ``visible(resource_type, type_column, id_column)`` → the caller's visibility as a WHERE clause,
#: None when the caller may see every resource of that type.
Visible = Callable[[str, sa.ColumnElement, sa.ColumnElement], sa.ColumnElement | None]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms_to_datetime(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


@functools.lru_cache(maxsize=4096)
def named_alias(table: sa.Table, name: str) -> sa.Alias:
    """``table.alias(name)``, built once per process. Aliases are immutable and may appear in
    any number of statements; building one (a proxy per column) was a fifth of a simple
    search's CPU. Names are unique within a statement (see ``Builder._name``)."""
    alias = table.alias(name)
    alias.c  # noqa: B018  (build the column collection now, not racily on first use)
    return alias


def live(r: sa.FromClause, resource_type: str) -> list[sa.ColumnElement]:
    """The rows of ``r`` that are current, non-deleted resources of ``resource_type``."""
    return [r.c.resource_type == resource_type, r.c.deleted == sa.false()]


class Builder:
    """Builds WHERE conditions for one database dialect."""

    def __init__(self, dialect: Dialect, base_url: str | None = None, visible: Visible | None = None) -> None:
        self.dialect = dialect
        self.base_url = base_url.rstrip("/") + "/" if base_url else None
        # The caller's visibility: a chain (``subject.name=``) or ``_has`` must not test
        # resources the caller may not see, or their content would leak through the matches.
        self.visible = visible
        self._aliases = 0

    def _seen(self, resource_type: str, type_col: sa.ColumnElement, id_col: sa.ColumnElement) -> sa.ColumnElement:
        clause = None if self.visible is None else self.visible(resource_type, type_col, id_col)
        return sa.true() if clause is None else clause

    def local(self, ref: sa.FromClause) -> sa.ColumnElement:
        """The reference row points into this server: relative, or absolute under our base.

        The indexer also fills type/id for ``https://elsewhere/fhir/Patient/1``; that is another
        server's Patient 1 and must not chain, include or match as our ``Patient/1``.
        """
        if self.base_url:
            return sa.or_(ref.c.url.is_(None), ref.c.url.startswith(self.base_url, autoescape=True))
        return ref.c.url.is_(None)

    # -- composition --------------------------------------------------------------------------

    def condition(self, resource_type: str, r: sa.FromClause, clause: Clause) -> sa.ColumnElement:
        """``clause`` as a condition on the resource row ``r`` (a ``resource`` alias)."""
        if isinstance(clause, ParamClause):
            if clause.type == ID_TYPE:
                ids = [v.code for v in clause.values if isinstance(v, TokenValue)]
                return r.c.id.not_in(ids) if clause.negate else r.c.id.in_(ids)
            if clause.type == LAST_UPDATED_TYPE:
                return sa.or_(*(self._instant(r.c.last_updated, v) for v in clause.values
                                if isinstance(v, DateValue)))
            subquery = self.index_ids(resource_type, clause)
            return r.c.id.not_in(subquery) if clause.negate else r.c.id.in_(subquery)
        if isinstance(clause, MissingClause):
            having = sa.union_all(*(self._param_rows(resource_type, ptype, code) for ptype, code in clause.codes))
            return r.c.id.not_in(having) if clause.missing else r.c.id.in_(having)
        return r.c.id.in_(self.ids(resource_type, clause))

    def ids(self, resource_type: str, clause: Clause) -> sa.Select:
        """The ids of live ``resource_type`` resources matching ``clause``, as a subquery."""
        if isinstance(clause, ParamClause) and not clause.negate and clause.type in INDEX_BY_TYPE:
            return self.index_ids(resource_type, clause)
        if isinstance(clause, ChainClause):
            ref = named_alias(REFERENCE, self._name("ref"))
            per_target = [
                sa.and_(ref.c.target_type == target, ref.c.target_id.in_(self.ids(target, inner)),
                        self._seen(target, ref.c.target_type, ref.c.target_id))
                for target, inner in clause.targets
            ]
            return sa.select(ref.c.resource_id).where(
                ref.c.resource_type == resource_type, ref.c.param == clause.code, sa.or_(*per_target),
                self.local(ref))
        if isinstance(clause, HasClause):
            # The referenced id may belong to a deleted or never-created resource: check it.
            ref = named_alias(REFERENCE, self._name("has"))
            target = named_alias(RESOURCE, self._name("hr"))
            return (
                sa.select(target.c.id)
                .select_from(ref.join(target, sa.and_(target.c.resource_type == ref.c.target_type,
                                                      target.c.id == ref.c.target_id)))
                .where(ref.c.resource_type == clause.source_type, ref.c.param == clause.ref_code,
                       ref.c.target_type == resource_type, target.c.deleted == sa.false(), self.local(ref),
                       ref.c.resource_id.in_(self.ids(clause.source_type, clause.inner)),
                       self._seen(clause.source_type, ref.c.resource_type, ref.c.resource_id))
            )
        r = named_alias(RESOURCE, self._name("r"))
        return sa.select(r.c.id).where(*live(r, resource_type), self.condition(resource_type, r, clause))

    def index_ids(self, resource_type: str, clause: ParamClause) -> sa.Select:
        """Ids having an index row of ``clause.code`` that matches any of its values (ignores
        ``negate``: the caller turns this into NOT IN)."""
        t = index_rows(resource_type, clause.type, self._name("i"))
        tests = [self._value_test(t, clause, v) for v in clause.values]
        return sa.select(t.c.resource_id).where(
            t.c.resource_type == resource_type, _param_is(t.c.param, resource_type, clause.code), sa.or_(*tests))

    def _param_rows(self, resource_type: str, ptype: str, code: str) -> sa.Select:
        t = index_rows(resource_type, ptype, self._name("m"))
        return sa.select(t.c.resource_id).where(t.c.resource_type == resource_type,
                                                _param_is(t.c.param, resource_type, code))

    def _name(self, stem: str) -> str:
        self._aliases += 1
        return f"{stem}{self._aliases}"

    # -- value tests --------------------------------------------------------------------------

    def _value_test(self, t: sa.FromClause, clause: ParamClause, value: object) -> sa.ColumnElement:
        kind = clause.type
        if kind == "token":
            if isinstance(value, TextValue):
                return self.dialect.starts_with(t.c.text, value.normalized)
            assert isinstance(value, TokenValue)
            tests = []
            if value.system is not None:
                tests.append(t.c.system == value.system)
            if value.code is not None:
                tests.append(t.c.code == value.code)
            return sa.and_(*tests)
        if kind == "string":
            if isinstance(value, PrefixRange):  # a prefix as bound parameters (search.shapes)
                return self.dialect.prefix_range(t.c.value, value.low, value.high)
            assert isinstance(value, TextValue)
            if clause.modifier == "exact":
                return t.c.exact == value.text
            if clause.modifier == "contains":
                return self.dialect.contains(t.c.value, value.normalized)
            return self.dialect.starts_with(t.c.value, value.normalized)
        if kind == "date":
            assert isinstance(value, DateValue)
            return date_test(t.c.low, t.c.high, value)
        if kind == "number":
            assert isinstance(value, NumberValue)
            return number_test(t.c.value, value.prefix, value.value, value.low, value.high)
        if kind == "quantity":
            assert isinstance(value, QuantityValue)
            tests = [number_test(t.c.value, value.prefix, value.value, value.low, value.high)]
            if value.system is not None:
                tests.append(t.c.system == value.system)
            if value.code is not None:
                tests.append(t.c.code == value.code)
            return sa.and_(*tests)
        if kind == "reference":
            assert isinstance(value, ReferenceValue)
            if value.url is not None:
                return t.c.url == value.url
            tests = [t.c.target_id == value.target_id, self.local(t)]
            target_type = value.target_type or (clause.modifier if clause.modifier else None)
            if target_type:
                tests.append(t.c.target_type == target_type)
            return sa.and_(*tests)
        if kind == "uri":
            assert isinstance(value, UriValue)
            if clause.modifier == "below":
                return self.dialect.starts_with(t.c.value, value.value)
            if clause.modifier == "above":
                return t.c.value.in_(uri_ancestors(value.value))
            return t.c.value == value.value
        raise AssertionError(f"no value test for {kind}")

    def _instant(self, column: sa.ColumnElement, value: DateValue) -> sa.ColumnElement:
        """A date test against a point in time (``resource.last_updated``).

        The column holds microseconds; the search range is whole milliseconds, so the high
        bound is used as the exclusive ``high + 1 ms``.
        """
        low = ms_to_datetime(value.low)
        end = ms_to_datetime(value.high) + _MS
        p = value.prefix
        if p == "eq":
            return sa.and_(column >= low, column < end)
        if p == "ne":
            return sa.or_(column < low, column >= end)
        if p in ("gt", "sa"):
            return column >= end
        if p in ("lt", "eb"):
            return column < low
        if p == "ge":
            return column >= low
        if p == "le":
            return column < end
        lo, hi = approximate(value)
        return sa.and_(column >= ms_to_datetime(lo), column < ms_to_datetime(hi) + _MS)

    # -- sorting ------------------------------------------------------------------------------

    def sort_key(self, resource_type: str, r: sa.FromClause, spec: SortSpec) -> tuple[sa.ColumnElement, bool]:
        """The sort expression for ``spec`` and whether it can be NULL.

        Repeating values sort by the lowest value ascending and the highest descending (a date
        range by its start ascending, its end descending), as the spec recommends.
        """
        if spec.type == ID_TYPE:
            return r.c.id, False
        if spec.type == LAST_UPDATED_TYPE:
            return r.c.last_updated, False
        t = index_rows(resource_type, spec.type, self._name("s"))
        if spec.type == "date":
            column = t.c.high if spec.descending else t.c.low
        elif spec.type == "token":
            column = t.c.code
        else:
            column = t.c.value
        agg = sa.func.max(column) if spec.descending else sa.func.min(column)
        # ``param || ''`` keeps the planner on the owner index (resource_type, resource_id): a
        # resource has a handful of rows. Without statistics SQLite otherwise picks the lookup
        # index (resource_type, param) and reads every row of the parameter for every resource.
        key = (
            sa.select(agg)
            .where(t.c.resource_type == resource_type, t.c.resource_id == r.c.id,
                   _param_is(t.c.param.concat(""), resource_type, spec.code))
            .correlate(r)
            .scalar_subquery()
        )
        return key, True


def index_rows(resource_type: str, ptype: str, name: str) -> sa.FromClause:
    """The index rows of ``resource_type``'s parameters of type ``ptype``, named ``name``:
    an alias of their table; token rows of the types that share them come from their sets."""
    if ptype == "token" and resource_type in token_sets.SHARED_TOKEN_TYPES:
        return token_sets.named_shared_rows(name)
    return named_alias(INDEX_BY_TYPE[ptype], name)


def _param_is(column: sa.ColumnElement, resource_type: str, code: str) -> sa.ColumnElement:
    """Rows of parameter ``code``: its own, or those it shares with others (``phonetic`` reads
    ``name``'s rows, ``address`` also ``address-city``'s: searchparams.share_string_rows)."""
    param = get_param(resource_type, code)
    keys = param.keys if param is not None else (code,)
    return column == keys[0] if len(keys) == 1 else column.in_(keys)


# -- comparison semantics (R4 3.1.1.5.6) ----------------------------------------------------------


def date_test(low: sa.ColumnElement, high: sa.ColumnElement, value: DateValue) -> sa.ColumnElement:
    """Prefix semantics between the search range [sl, sh] and the indexed range [low, high]."""
    sl, sh, p = value.low, value.high, value.prefix
    contained = sa.and_(low >= sl, high <= sh)
    if p == "eq":
        return contained
    if p == "ne":
        return sa.or_(low < sl, high > sh)
    if p == "gt":  # the range above the search value overlaps the target
        return high > sh
    if p == "lt":
        return low < sl
    if p == "ge":
        return sa.or_(high > sh, contained)
    if p == "le":
        return sa.or_(low < sl, contained)
    if p == "sa":  # starts after: entirely above the search range
        return low > sh
    if p == "eb":  # ends before
        return high < sl
    lo, hi = approximate(value)  # ap: ranges overlap within a tolerance
    return sa.and_(low <= hi, high >= lo)


def approximate(value: DateValue) -> tuple[int, int]:
    """``ap`` widens the search range by 10% of its distance from now (at least a day)."""
    now_ms = int(time.time() * 1000)
    middle = (value.low + value.high) // 2
    slack = max(abs(now_ms - middle) // 10, 86_400_000)
    return value.low - slack, value.high + slack


def number_test(column: sa.ColumnElement, prefix: str, value: float, low: float, high: float) -> sa.ColumnElement:
    """Number/quantity semantics: ``eq`` means within the precision of the search value
    (``100`` matches 99.5 <= x < 100.5); ordered prefixes compare with the value itself."""
    if prefix == "eq":
        return sa.and_(column >= low, column < high)
    if prefix == "ne":
        return sa.or_(column < low, column >= high)
    if prefix in ("gt", "sa"):
        return column > value
    if prefix in ("lt", "eb"):
        return column < value
    if prefix == "ge":
        return column >= value
    if prefix == "le":
        return column <= value
    slack = abs(value) * 0.1  # ap: within 10%
    return sa.and_(column >= min(low, value - slack), column <= max(high, value + slack))


def uri_ancestors(uri: str) -> list[str]:
    """``:above``: the uri itself and every path prefix of it (``http://x/a/b`` → ``http://x/a``)."""
    out = [uri]
    head, sep, _ = uri.rpartition("/")
    while sep and head and not head.endswith("/") and "://" in head and not head.endswith(":/"):
        out.append(head)
        head, sep, _ = head.rpartition("/")
    return out


def keyset_after(keys: Sequence[tuple[sa.ColumnElement, bool, bool]], values: Sequence[object],
                 backward: bool) -> sa.ColumnElement:
    """Rows strictly after (``backward``: strictly before) ``values`` in the sort order.

    ``keys`` are (column, descending, nullable). NULL sort keys always sort last, so the
    comparison of a nullable key spells out where NULLs are. Expanded lexicographic form:
    ``k1 > v1 OR (k1 = v1 AND (k2 > v2 OR ...))``.
    """
    result: sa.ColumnElement = sa.false()
    for (column, descending, nullable), value in reversed(list(zip(keys, values))):
        ascending = descending == backward  # direction of the walk for this key
        nulls_ahead = not backward  # NULLs come after everything when walking forward
        if value is None:
            beyond = column.is_not(None) if not nulls_ahead else sa.false()
            equal = column.is_(None)
        else:
            beyond = column > value if ascending else column < value
            if nullable and nulls_ahead:
                beyond = sa.or_(beyond, column.is_(None))
            equal = column == value
        result = sa.or_(beyond, sa.and_(equal, result))
    return result


def order_by(keys: Sequence[tuple[sa.ColumnElement, bool, bool]], backward: bool) -> list[sa.ColumnElement]:
    out = []
    for column, descending, nullable in keys:
        ascending = descending == backward
        ordered = column.asc() if ascending else column.desc()
        if nullable:
            ordered = ordered.nulls_first() if backward else ordered.nulls_last()
        out.append(ordered)
    return out
