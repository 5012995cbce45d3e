"""Running a parsed search: matches (keyset-paged), totals and _include/_revinclude.

Paging never uses OFFSET. The first page pins a *snapshot*, the highest change sequence at
that moment; every page only considers resources whose ``created_seq`` is at or below it, so a
resource created while a client pages never shifts rows between pages. Rows are ordered by the
sort keys plus ``id`` (unique), and each page starts strictly after the last row of the page
before, so an update that does not change a sort key cannot cause duplicates or gaps either.
(An update that *changes* a sort key moves that resource: it may then be seen twice or not at
all, as with any keyset pagination over live data.)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import sqlalchemy as sa

from service.fhir.errors import BadRequest, Issue
from service.fhir.search import cursor as cursor_codec
from service.fhir.search import shapes
from service.fhir.search.dialect import Dialect
from service.fhir.search.model import (
    ID_TYPE,
    Cursor,
    DateValue,
    IncludeSpec,
    KnownTotal,
    ParamClause,
    SearchPage,
    SearchRequest,
)
from service.fhir.search.parse import base_url_setting, parse_search
from service.fhir.search.sql import (
    DATE,
    REFERENCE,
    RESOURCE,
    VERSION,
    Builder,
    keyset_after,
    live,
    named_alias,
    order_by,
)
from service.fhir.searchparams import get_param
from service.fhir.statements import Prepared, StatementCache

#: ``visible(resource_type, type_column, id_column)`` → extra WHERE condition (authorization),
#: None when the caller may see every resource of that type.
Visible = Callable[[str, sa.ColumnElement, sa.ColumnElement], sa.ColumnElement | None]

#: The highest change sequence: a first page's snapshot, read in its own query.
_SNAPSHOT = sa.select(sa.func.max(VERSION.c.seq)).scalar_subquery().label("snapshot")

#: Rounds of ``:iterate`` includes, and the most resources one page may include.
MAX_INCLUDE_ROUNDS = 4
MAX_INCLUDES = 1000
_CHUNK = 500  # ids per IN list: far below both databases' bound-parameter limits


@dataclass
class _Plan:
    """The statements of one search, built from a request whose values may be bound
    parameters (``shapes.template``), so that one plan serves every search of its shape."""

    r: sa.FromClause
    where: list[sa.ColumnElement]  # without the snapshot: totals add it
    page: sa.Select | None  # None when only a count is asked for
    # A kept plan's statements as prepared statements, when they qualify (see _kept_plan):
    prepared_page: Prepared | None = None
    prepared_total: Prepared | None = None  # the count up to a snapshot, bound as _SNAPSHOT_PARAM
    prepared_upto: Prepared | None = None  # the same, of at most _UPTO_PARAM matches

    def count(self, snapshot: Any, upto: Any = None) -> sa.Select:
        """``count(*)`` of the matches created up to ``snapshot`` (all when None), stopping at
        ``upto`` when given: a capped count reads at most that many index entries."""
        if upto is None:
            return sa.select(sa.func.count()).select_from(self.r).where(*self._up_to(snapshot))
        return sa.select(sa.func.count()).select_from(self._matches(snapshot).limit(upto).subquery("upto"))

    def _up_to(self, snapshot: Any) -> list[sa.ColumnElement]:
        return self.where if snapshot is None else [*self.where, self.r.c.created_seq <= snapshot]

    def _matches(self, snapshot: Any) -> sa.Select:
        return sa.select(sa.literal(1)).select_from(self.r).where(*self._up_to(snapshot))

    def page_rows(self, conn: sa.Connection, params: dict[str, Any]) -> list[Sequence[Any]]:
        assert self.page is not None
        if self.prepared_page is not None:
            return self.prepared_page.rows(conn, params)
        return list(conn.execute(self.page, params))

    def total(self, conn: sa.Connection, params: dict[str, Any], snapshot: int | None, *,
              upto: int | None = None) -> int:
        """The matches up to ``snapshot``: all of them, or at most ``upto``."""
        prepared = self.prepared_total if upto is None else self.prepared_upto
        if snapshot is not None and prepared is not None:
            bound = {**params, _SNAPSHOT_PARAM: snapshot} if upto is None else \
                {**params, _SNAPSHOT_PARAM: snapshot, _UPTO_PARAM: upto}
            return int(prepared.scalar(conn, bound))
        return int(conn.execute(self.count(snapshot, upto), params).scalar_one())

    def estimate(self, conn: sa.Connection, params: dict[str, Any], snapshot: int | None) -> int | None:
        """PostgreSQL's planner's estimate of the matches (its plan, not a count: no index
        entry is read); None on databases without one (SQLite)."""
        if conn.dialect.name != "postgresql":
            return None
        query = self._matches(snapshot).params(params)
        compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        # The values travel as bound parameters, as for the search itself (never as SQL text).
        plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled.string}", compiled.params).scalar_one()
        if isinstance(plan, (str, bytes)):
            plan = orjson.loads(plan)
        return int(plan[0]["Plan"]["Plan Rows"])


#: The snapshot's parameter in a kept plan's count (no search value is bound under this name),
#: and the cap of a capped count.
_SNAPSHOT_PARAM = "yilian_snapshot"
_UPTO_PARAM = "yilian_upto"

#: Plans (and conditional-match statements) of templated searches by shape and visibility,
#: see ``shapes``.
_PLANS: StatementCache[Any] = StatementCache(1000)


def execute_search(conn: sa.Connection, request: SearchRequest, *, visible: Visible | None = None,
                   visible_key: Hashable | None = None) -> SearchPage:
    """Run ``request`` on ``conn`` and return one page. ``visible`` restricts every resource
    returned or counted (matches, total and included resources); ``visible_key``, when given,
    is equal for two callers only when ``visible`` gives them the same clauses (so that their
    searches may share statements)."""
    rt = request.resource_type
    builder = Builder(Dialect.for_connection(conn), base_url=base_url_setting(), visible=visible)
    fp = cursor_codec.fingerprint(rt, request.sort)
    cursor = request.cursor
    # The first page reads the snapshot in its page query (no extra round trip): there it holds
    # for every row by construction. Later pages pin to the cursor's.
    snapshot: int | None = cursor.snapshot if cursor is not None else None
    plan, params = _plan_for(builder, request, visible, visible_key)

    warnings = list(request.warnings)
    self_link = _query_string(request.link_params, cursor_codec.encode(cursor, fp) if cursor else None)
    page = SearchPage(rt, [], [], None, self_link, warnings=warnings, summary_count=request.summary_count,
                      summary=request.summary, elements=request.elements)

    if plan.page is None:
        page.total = plan.total(conn, params, snapshot)
        return page

    rows = plan.page_rows(conn, params)
    if snapshot is None and rows:
        snapshot = int(rows[0][-1])
        rows = [row[:-1] for row in rows]
    more = len(rows) > request.count
    rows = rows[: request.count]
    backward = cursor is not None and cursor.backward
    if backward:
        rows.reverse()
    has_previous = more if backward else cursor is not None
    has_next = True if backward else more
    page.matches = [(rt, row[0], row[1]) for row in rows]

    known: KnownTotal | None = None
    if request.total != "none":
        if cursor is None and not more:
            known = KnownTotal("exact", len(rows))  # the whole result is on this first page
        else:  # totals count what the pages will show: nothing created after the snapshot
            known = _known_total(conn, plan, params, request, snapshot)
        if known.kind == "more":
            warnings.append(_more_than(known.value))
        else:
            page.total = known.value

    if rows and has_next:
        page.next_link = _query_string(request.link_params, cursor_codec.encode(
            Cursor(snapshot, tuple(rows[-1][2:]), False, known), fp))
    if rows and has_previous:
        page.previous_link = _query_string(request.link_params, cursor_codec.encode(
            Cursor(snapshot, tuple(rows[0][2:]), True, known), fp))

    if request.includes and page.matches:
        page.includes, truncated = _collect_includes(conn, builder, request.includes,
                                                     [(t, i) for t, i, _ in page.matches], visible)
        if truncated:
            warnings.append(Issue("warning", "too-costly",
                                  f"More than {MAX_INCLUDES} resources to include; the rest were left out"))
    return page


def _known_total(conn: sa.Connection, plan: _Plan, params: dict[str, Any], request: SearchRequest,
                 snapshot: int | None) -> KnownTotal:
    """What a page that does not hold the whole result says of the total.

    ``_total=accurate`` counts every match; without ``_total`` the count stops past
    ``request.exact_total_limit`` (the total is then left out); ``_total=estimate`` counts as
    far, then asks the planner. Later pages take what the first page learnt from their cursor,
    so that paging through a large result does not count it again on every page."""
    mode, limit = request.total, request.exact_total_limit
    carried = request.cursor.total if request.cursor is not None else None
    if carried is not None:
        if carried.kind == "exact" or (carried.kind == "estimate" and mode == "estimate"):
            return carried
        if mode is None:  # the first page found more than its limit
            return KnownTotal("more", limit)
        if mode == "estimate":
            return _estimate(conn, plan, params, snapshot, at_least=carried.value + 1)
    if mode == "accurate":
        return KnownTotal("exact", plan.total(conn, params, snapshot))
    counted = plan.total(conn, params, snapshot, upto=limit + 1)
    if counted <= limit:
        return KnownTotal("exact", counted)
    if mode is None:
        return KnownTotal("more", limit)
    return _estimate(conn, plan, params, snapshot, at_least=limit + 1)


def _estimate(conn: sa.Connection, plan: _Plan, params: dict[str, Any], snapshot: int | None, *,
              at_least: int) -> KnownTotal:
    guess = plan.estimate(conn, params, snapshot)
    if guess is None:  # no planner to ask: an exact count is an estimate too
        return KnownTotal("exact", plan.total(conn, params, snapshot))
    return KnownTotal("estimate", max(guess, at_least))  # at least what was counted


def _more_than(limit: int) -> Issue:
    return Issue("information", "informational",
                 f"More than {limit:,} matches: Bundle.total is left out. Ask _total=accurate to have them "
                 "all counted, or _total=estimate for the database's estimate", ("_total",))


def _plan_for(builder: Builder, request: SearchRequest, visible: Visible | None,
              visible_key: Hashable | None) -> tuple[_Plan, dict[str, Any]]:
    """The plan for ``request`` and the values to run it with: shared by every search of the
    same shape (and the same visibility) when ``shapes.template`` can parametrise it, else
    built for this request."""
    rt = request.resource_type
    r = named_alias(RESOURCE, "r")
    templated = shapes.template(request)
    if templated is None:
        return _build_plan(builder, request, r, _boundary(visible, rt, r)), {}
    shape, parametrised, params = templated
    if visible is not None and visible_key is None:
        boundary = _boundary(visible, rt, r)  # no key: only a caller without a boundary shares
        if boundary is not None:
            return _build_plan(builder, request, r, boundary), {}
        visible = None
    key = (shape, builder.dialect, builder.base_url, None if visible is None else visible_key)
    plan = _PLANS.get(key, lambda: _kept_plan(builder, parametrised, r, _boundary(visible, rt, r)))
    return plan, params


def _boundary(visible: Visible | None, resource_type: str, r: sa.FromClause) -> sa.ColumnElement | None:
    return None if visible is None else visible(resource_type, r.c.resource_type, r.c.id)


def _kept_plan(builder: Builder, request: SearchRequest, r: sa.FromClause,
               boundary: sa.ColumnElement | None) -> _Plan:
    """A plan that serves every search of its shape: its page and count statements run as
    prepared statements on PostgreSQL (``Prepared``). Through SQLAlchemy each run derived the
    statement's cache key again — a walk of its whole tree — and built a result object:
    measured in process, 16 % of the server's CPU for a search by identifier."""
    plan = _build_plan(builder, request, r, boundary)
    if builder.dialect.name != "postgresql":
        return plan
    if plan.page is not None:
        plan.prepared_page = Prepared.if_plain(plan.page)
    snapshot = sa.bindparam(_SNAPSHOT_PARAM, type_=sa.BigInteger)
    plan.prepared_total = Prepared.if_plain(plan.count(snapshot))
    plan.prepared_upto = Prepared.if_plain(plan.count(snapshot, sa.bindparam(_UPTO_PARAM, type_=sa.Integer)))
    return plan


def _build_plan(builder: Builder, request: SearchRequest, r: sa.FromClause,
                boundary: sa.ColumnElement | None) -> _Plan:
    rt, cursor = request.resource_type, request.cursor
    where = [*live(r, rt)]
    where += [builder.condition(rt, r, clause) for clause in request.clauses]
    if boundary is not None:
        where.append(boundary)
    if request.summary_count or request.count == 0:
        return _Plan(r, where, None)
    page_where = where if cursor is None else [*where, r.c.created_seq <= cursor.snapshot]

    # Sort keys, then id as the unique tiebreaker.
    keys: list[tuple[sa.ColumnElement, bool, bool]] = []  # (expression, descending, nullable)
    for spec in request.sort:
        expr, nullable = builder.sort_key(rt, r, spec)
        keys.append((expr, spec.descending, nullable))
    kinds = [s.type for s in request.sort]
    if not any(s.type == ID_TYPE for s in request.sort):
        keys.append((r.c.id, False, False))
        kinds.append(ID_TYPE)
    backward = cursor is not None and cursor.backward
    after = cursor_codec.restore_key(cursor.key, kinds) if cursor is not None else None
    walk = _date_walk(builder, rt, request)
    if walk is not None:
        page_rows = _page_rows_by_date(r, page_where, walk, after, backward, request.count + 1)
    else:
        page_rows = _page_rows(r, page_where, keys, after, backward, request.count + 1)
    pg_keys = [(page_rows.c[f"k{i}"], descending, nullable) for i, (_, descending, nullable) in enumerate(keys)]
    columns = [page_rows.c.rid, builder.dialect.json_text(VERSION.c.content), *(k for k, _, _ in pg_keys)]
    if cursor is None:
        columns.append(_SNAPSHOT)
    page = (
        sa.select(*columns)
        .select_from(page_rows.join(VERSION, VERSION.c.seq == page_rows.c.rseq))
        .order_by(*order_by(pg_keys, backward))
    )
    return _Plan(r, where, page)


def _page_rows(r: sa.FromClause, where: list[sa.ColumnElement], keys: list[tuple[sa.ColumnElement, bool, bool]],
               after: Sequence[object] | None, backward: bool, limit: int) -> sa.Subquery:
    """pg: one page of matching resources (id, seq, sort keys k0, k1 ...), ordered, starting
    strictly after the sort key ``after`` (a cursor's). The LIMIT keeps it a separate step, so
    stored JSON is joined for the page's rows only."""
    if all(getattr(expr, "table", None) is r for expr, _, _ in keys):
        # Sort keys that are columns of r (the default: id): one level, the keyset test and
        # ORDER BY on the columns themselves. Each subquery level costs Python a column
        # collection to build (measured: a tenth of a search's CPU).
        query = sa.select(r.c.id.label("rid"), r.c.seq.label("rseq"),
                          *(expr.label(f"k{i}") for i, (expr, _, _) in enumerate(keys))).where(*where)
        if after is not None:
            query = query.where(keyset_after(keys, after, backward))
        return query.order_by(*order_by(keys, backward)).limit(limit).subquery("pg")
    # m: matching resources with their computed sort keys, named so that the keyset test and
    # ORDER BY can use them (a WHERE cannot refer to a select's labels).
    inner = (sa.select(r.c.id.label("rid"), r.c.seq.label("rseq"),
                       *(expr.label(f"k{i}") for i, (expr, _, _) in enumerate(keys)))
             .where(*where).subquery("m"))
    m_keys = [(inner.c[f"k{i}"], descending, nullable) for i, (_, descending, nullable) in enumerate(keys)]
    query = sa.select(inner)
    if after is not None:
        query = query.where(keyset_after(m_keys, after, backward))
    return query.order_by(*order_by(m_keys, backward)).limit(limit).subquery("pg")


@dataclass(frozen=True)
class _DateWalk:
    """A search sorted by one date parameter, paged by walking that parameter's index."""

    resource_type: str
    param: str
    descending: bool


#: Criteria on the sort parameter that a walk meets at its start: matching resources come
#: first in the walk's order (descending by end: ``ge``, ``gt``; ascending by start: ``le``, ``lt``).
_WALK_PREFIXES = {True: frozenset({"ge", "gt"}), False: frozenset({"le", "lt"})}


def _date_walk(builder: Builder, resource_type: str, request: SearchRequest) -> _DateWalk | None:
    """The walk for ``request`` when its only sort key is a date parameter with rows of its
    own (PostgreSQL: there the generic page computed every match's key before its LIMIT,
    250 ms for 50,000 AuditEvents sorted by date), and its criteria, if any, are on that
    parameter and met where the walk starts (``date=ge..&_sort=-date``).

    Otherwise the generic page: with other criteria PostgreSQL starts from their matches
    anyway (one index probe fewer per match there), and a walk would pass every resource the
    criteria leave out before reaching the first match (``birthdate=ge1990&_sort=birthdate``
    from the earliest birth date on: 440 ms for 10,000 Patients)."""
    if builder.dialect.name != "postgresql" or len(request.sort) != 1:
        return None
    spec = request.sort[0]
    if spec.type != "date":
        return None
    met_first = _WALK_PREFIXES[spec.descending]
    for clause in request.clauses:
        if not (isinstance(clause, ParamClause) and clause.code == spec.code and not clause.negate
                and clause.modifier is None
                and all(isinstance(v, DateValue) and v.prefix in met_first for v in clause.values)):
            return None
    param = get_param(resource_type, spec.code)
    if param is None or param.keys != (spec.code,):
        return None
    return _DateWalk(resource_type, spec.code, spec.descending)


def _page_rows_by_date(r: sa.FromClause, where: list[sa.ColumnElement], walk: _DateWalk,
                       after: Sequence[object] | None, backward: bool, limit: int) -> sa.Subquery:
    """``_page_rows`` for a search sorted by one date parameter, with the same rows in the same
    order: the key of a resource is its latest end (descending) or earliest start (ascending),
    resources without a value come last, ties go by id.

    The resources with a value are read in the order of the date index (``ix_date_high`` /
    ``ix_date_low``), each from its *key row*, the one no other row of that resource beats, and
    the walk stops after ``limit``; those without a value come from the resource table in id
    order, ``limit`` at most, and (walking forward, where they come last) only when the valued
    ones did not fill the page: finding them reads every match. The page is the first
    ``limit`` of both."""
    rt, desc = walk.resource_type, walk.descending
    s, other = named_alias(DATE, "ws"), named_alias(DATE, "wo")
    key = s.c.high if desc else s.c.low
    if desc:  # the latest end; of two rows ending together, the earlier start
        beats = sa.or_(other.c.high > s.c.high, sa.and_(other.c.high == s.c.high, other.c.low < s.c.low))
    else:  # the earliest start; of two rows starting together, the later end
        beats = sa.or_(other.c.low < s.c.low, sa.and_(other.c.low == s.c.low, other.c.high > s.c.high))
    beaten = sa.exists().where(other.c.resource_type == rt, other.c.resource_id == s.c.resource_id,
                               other.c.param == walk.param, beats)
    # Not nullable here, so that ORDER BY is the index's own order (a NULLS LAST would sort).
    valued_keys = [(key, desc, False), (r.c.id, False, False)]
    valued = (sa.select(r.c.id.label("rid"), r.c.seq.label("rseq"), key.label("k0"), r.c.id.label("k1"))
              .select_from(s.join(r, sa.and_(r.c.resource_type == s.c.resource_type, r.c.id == s.c.resource_id)))
              .where(s.c.resource_type == rt, s.c.param == walk.param, ~beaten, *where))
    if after is not None:
        valued = valued.where(keyset_after(valued_keys, after, backward))
    valued_page = valued.order_by(*order_by(valued_keys, backward)).limit(limit).cte("wv")

    has_value = sa.exists().where(other.c.resource_type == rt, other.c.resource_id == r.c.id,
                                  other.c.param == walk.param)
    missing = (sa.select(r.c.id.label("rid"), r.c.seq.label("rseq"), sa.null().label("k0"), r.c.id.label("k1"))
               .where(*where, ~has_value))
    if after is not None:  # NULL keys sort last: after a valued key, every one of them
        k0, k1 = after[0], after[1]
        if k0 is None:
            missing = missing.where(r.c.id < k1 if backward else r.c.id > k1)
        elif backward:
            missing = missing.where(sa.false())
    if not backward:  # forward, they follow the valued ones: wanted only if those leave room
        missing = missing.where(sa.select(sa.func.count()).select_from(valued_page).scalar_subquery() < limit)
    missing = missing.order_by(r.c.id.desc() if backward else r.c.id.asc()).limit(limit)

    both = sa.union_all(sa.select(valued_page), missing).subquery("m")
    m_keys = [(both.c.k0, desc, True), (both.c.k1, False, False)]
    return sa.select(both).order_by(*order_by(m_keys, backward)).limit(limit).subquery("pg")


def _query_string(params: list[tuple[str, str]], cursor: str | None) -> str:
    items = list(params) + ([("_cursor", cursor)] if cursor else [])
    return urlencode(items, safe="/:|,*")


# -- _include / _revinclude ---------------------------------------------------------------------


def _collect_includes(conn: sa.Connection, builder: Builder, specs: list[IncludeSpec],
                      matches: list[tuple[str, str]], visible: Visible | None
                      ) -> tuple[list[tuple[str, str, str]], bool]:
    """Resources referenced by (``_include``) or referring to (``_revinclude``) the matches.

    Non-iterate specs apply to the matches only; ``:iterate`` specs also apply, round after
    round, to what the previous round included, until nothing new turns up.
    """
    seen: set[tuple[str, str]] = set(matches)
    included: list[tuple[str, str, str]] = []
    frontier = list(matches)
    for round_no in range(MAX_INCLUDE_ROUNDS + 1):
        active = [s for s in specs if round_no == 0 or s.iterate]
        if not active or not frontier:
            break
        candidates: dict[tuple[str, str], None] = {}
        for spec in active:
            for key in _include_candidates(conn, builder, spec, frontier):
                if key not in seen:
                    candidates[key] = None
        found = _fetch(conn, builder, list(candidates), visible)
        frontier = []
        for key in candidates:
            if key in found:
                seen.add(key)
                if len(included) >= MAX_INCLUDES:
                    return included, True
                included.append((key[0], key[1], found[key]))
                frontier.append(key)
    return included, False


def _include_candidates(conn: sa.Connection, builder: Builder, spec: IncludeSpec,
                        frontier: list[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    ref = REFERENCE
    if spec.reverse:
        by_type = _group(frontier, spec.target_type)
        for target_type, ids in by_type.items():
            for chunk in _chunks(ids):
                rows = conn.execute(
                    sa.select(ref.c.resource_type, ref.c.resource_id)
                    .where(ref.c.resource_type == spec.source_type, ref.c.param == spec.code,
                           ref.c.target_type == target_type, ref.c.target_id.in_(chunk), builder.local(ref))
                    .order_by(ref.c.resource_id)
                )
                yield from ((t, i) for t, i in rows)
        return
    ids = [i for t, i in frontier if t == spec.source_type]
    for chunk in _chunks(ids):
        query = sa.select(ref.c.target_type, ref.c.target_id).where(
            ref.c.resource_type == spec.source_type, ref.c.resource_id.in_(chunk),
            ref.c.target_type.is_not(None), ref.c.target_id.is_not(None), builder.local(ref))
        if spec.code is not None:  # None is '*': every reference parameter
            query = query.where(ref.c.param == spec.code)
        if spec.target_type is not None:
            query = query.where(ref.c.target_type == spec.target_type)
        yield from ((t, i) for t, i in conn.execute(query.order_by(ref.c.target_type, ref.c.target_id)))


def _fetch(conn: sa.Connection, builder: Builder, keys: list[tuple[str, str]], visible: Visible | None
           ) -> dict[tuple[str, str], str]:
    """The stored JSON of the live, visible resources among ``keys``."""
    out: dict[tuple[str, str], str] = {}
    for resource_type, ids in _group(keys, None).items():
        r = named_alias(RESOURCE, "inc")
        for chunk in _chunks(ids):
            query = (
                sa.select(r.c.id, builder.dialect.json_text(VERSION.c.content))
                .select_from(r.join(VERSION, VERSION.c.seq == r.c.seq))
                .where(*live(r, resource_type), r.c.id.in_(chunk))
            )
            boundary = None if visible is None else visible(resource_type, r.c.resource_type, r.c.id)
            if boundary is not None:
                query = query.where(boundary)
            for rid, text in conn.execute(query):
                out[(resource_type, rid)] = text
    return out


def _group(keys: Iterable[tuple[str, str]], only_type: str | None) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for t, i in keys:
        if only_type is None or t == only_type:
            groups.setdefault(t, []).append(i)
    return groups


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


# -- conditional operations ---------------------------------------------------------------------


def find_matches(conn: sa.Connection, resource_type: str, query: str, *, limit: int = 2,
                 visible: Visible | None = None, visible_key: Hashable | None = None) -> list[str]:
    """Ids of live resources matching ``query`` (``identifier=sys|123&...``), at most ``limit``;
    with ``visible``, only resources the caller may see (and chains / ``_has`` through them).

    For conditional create/update/delete and conditional references: parsing is strict (an
    unknown parameter is a BadRequest, never ignored) and a query without any criterion is
    refused rather than matching everything.
    """
    pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True)
    request = parse_search(resource_type, pairs, strict=True)
    if not request.clauses:
        raise BadRequest(f"The conditional query '{query}' has no search criteria")
    builder = Builder(Dialect.for_connection(conn), base_url=base_url_setting(), visible=visible)
    r = named_alias(RESOURCE, "r")
    templated = shapes.template(request)
    if templated is not None and visible is not None and visible_key is None:
        boundary = _boundary(visible, resource_type, r)  # no key: only a caller without a boundary shares
        if boundary is None:
            visible = None
        else:
            templated = None
    if templated is None:
        stmt, params = _match_statement(builder, request, r, _boundary(visible, resource_type, r), limit), {}
    else:  # the same shapes as searches (identifier=sys|value ...): one statement per shape
        shape, parametrised, params = templated
        key = ("match", shape, limit, builder.dialect, builder.base_url, None if visible is None else visible_key)
        stmt = _PLANS.get(key, lambda: _kept_match(builder, parametrised, r, _boundary(visible, resource_type, r),
                                                limit))
        if isinstance(stmt, Prepared):
            return [row[0] for row in stmt.rows(conn, params)]
    return list(conn.execute(stmt, params).scalars())


def _kept_match(builder: Builder, request: SearchRequest, r: sa.FromClause, boundary: sa.ColumnElement | None,
                limit: int) -> Prepared | sa.Select:
    """The statement every conditional match of its shape runs: prepared when it qualifies."""
    stmt = _match_statement(builder, request, r, boundary, limit)
    return (Prepared.if_plain(stmt) or stmt) if builder.dialect.name == "postgresql" else stmt


def _match_statement(builder: Builder, request: SearchRequest, r: sa.FromClause, boundary: sa.ColumnElement | None,
                     limit: int) -> sa.Select:
    rt = request.resource_type
    where = [*live(r, rt), *(builder.condition(rt, r, c) for c in request.clauses)]
    if boundary is not None:
        where.append(boundary)
    return sa.select(r.c.id).where(*where).order_by(r.c.id).limit(limit)
