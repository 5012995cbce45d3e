"""``parse_search``: turn ``[(name, value), ...]`` into a validated :class:`SearchRequest`.

Unknown parameters are a warning by default (the spec lets servers ignore them; the warning
tells the client its filter was not applied) and an error with ``strict=True``, which the API
uses for ``Prefer: handling=strict`` and which conditional operations always use: ignoring a
criterion there would update or delete the wrong resource. Malformed values and unsupported
modifiers are always errors, because silently dropping them widens the result.
"""

from __future__ import annotations

from collections.abc import Iterable

from service.fhir.errors import BadRequest, Issue
from service.fhir.search import cursor as cursor_codec
from service.fhir.search.model import (
    ID_TYPE,
    LAST_UPDATED_TYPE,
    ChainClause,
    Clause,
    HasClause,
    IncludeSpec,
    MissingClause,
    ParamClause,
    SearchRequest,
    SortSpec,
    TokenValue,
)
from service.fhir.search.values import (
    or_values,
    parse_bool,
    parse_date,
    parse_number,
    parse_quantity,
    parse_reference,
    parse_text,
    parse_token,
    parse_uri,
    unescape,
)

#: Hops allowed in ``a.b.c`` chains and nested ``_has`` (the spec's examples use two).
MAX_DEPTH = 3
#: A chain through a reference that may point at more types than this needs a ``:Type``.
MAX_CHAIN_TARGETS = 20

_SILENT = frozenset({"_format", "_pretty"})  # answered by the API layer
_UNSUPPORTED = frozenset({"_text", "_content", "_list", "_query", "_filter", "_type", "_contained",
                          "_containedType", "_score", "_security-label"})
_SORTABLE = frozenset({"date", "string", "token", "number", "quantity", "uri", ID_TYPE, LAST_UPDATED_TYPE})
_UNSUPPORTED_MODIFIERS = frozenset({"in", "not-in", "above", "below", "of-type", "code-text", "iterate"})


class UnknownParameter(Exception):
    """A parameter (or chained / sorted / included parameter) this server does not know."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason


def _settings() -> tuple[int, int, int]:
    """(default page size, largest page size, exact total limit)."""
    try:
        from service.config import get_settings

        s = get_settings()
        return s.default_page_size, s.max_page_size, s.exact_total_limit
    except (ImportError, ValueError):  # settings unreadable: the documented defaults
        return 20, 1000, 1000


def base_url_setting() -> str | None:
    try:
        from service.config import get_settings

        return get_settings().base_url
    except (ImportError, ValueError):
        return None


# -- search parameter registry ------------------------------------------------------------------


def _supported_types() -> frozenset[str]:
    from service.fhir.searchparams import supported_types

    return frozenset(supported_types())


def _lookup(resource_type: str, code: str):  # -> SearchParam | None
    from service.fhir.searchparams import params_for

    try:
        return params_for(resource_type).get(code)
    except (KeyError, ValueError):
        return None


def _targets(sp) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    return tuple(getattr(sp, "targets", None) or ())


# -- entry point --------------------------------------------------------------------------------


def parse_search(resource_type: str, params: Iterable[tuple[str, str]], *, strict: bool = False) -> SearchRequest:
    """Validate a type-level search. See the module docstring for the error policy."""
    if resource_type not in _supported_types():
        raise BadRequest(f"Resource type '{resource_type}' is not supported for search")
    default_count, max_count, exact_total_limit = _settings()
    request = SearchRequest(resource_type, count=default_count, exact_total_limit=exact_total_limit)
    cursor_raw: str | None = None

    def unknown(name: str, reason: str) -> None:
        if strict:
            raise BadRequest(f"{reason} (parameter '{name}')", expression=name)
        request.warnings.append(Issue("warning", "not-supported", f"{reason}; parameter '{name}' was ignored",
                                      (name,)))

    for name, raw in params:
        if name == "_cursor":
            cursor_raw = raw
            continue
        request.link_params.append((name, raw))
        base, _, modifier = name.partition(":")
        if base in _SILENT:
            continue
        if raw == "":  # 'name=' carries no criterion: ignore it, as other servers do
            continue
        try:
            if base == "_count":
                request.count = _parse_count(raw, max_count, request)
            elif base == "_sort":
                request.sort.extend(_parse_sort(resource_type, name, modifier, raw))
            elif base in ("_include", "_revinclude"):
                spec = _parse_include(resource_type, name, base == "_revinclude", modifier, raw)
                if spec is not None:
                    request.includes.append(spec)
            elif base == "_total":
                if raw not in ("none", "estimate", "accurate"):
                    raise BadRequest(f"_total must be none, estimate or accurate, not '{raw}'", expression="_total")
                request.total = raw
            elif base == "_summary":
                if raw not in ("true", "text", "data", "count", "false"):
                    raise BadRequest(f"_summary must be true, text, data, count or false, not '{raw}'",
                                     expression="_summary")
                request.summary = None if raw == "false" else raw
            elif base == "_elements":
                request.elements = tuple(e.strip() for e in raw.split(",") if e.strip())
            elif base in _UNSUPPORTED:
                raise UnknownParameter(name, f"Search parameter '{base}' is not supported")
            else:
                request.clauses.append(parse_clause(resource_type, name, raw))
        except UnknownParameter as exc:
            unknown(exc.name, exc.reason)

    request.clauses.sort(key=_selectivity_rank)
    if cursor_raw:
        request.cursor = cursor_codec.decode(cursor_raw, cursor_codec.fingerprint(resource_type, request.sort))
    return request


def _parse_count(raw: str, max_count: int, request: SearchRequest) -> int:
    try:
        count = int(raw)
    except ValueError:
        raise BadRequest(f"_count must be a non-negative integer, not '{raw}'", expression="_count") from None
    if count < 0:
        raise BadRequest(f"_count must be a non-negative integer, not '{raw}'", expression="_count")
    if count > max_count:
        request.warnings.append(Issue("information", "informational",
                                      f"_count={count} exceeds the maximum page size; using {max_count}",
                                      ("_count",)))
        count = max_count
    return count


# -- criteria -----------------------------------------------------------------------------------


def parse_clause(resource_type: str, name: str, raw: str, depth: int = 0) -> Clause:
    """One criterion ``name=raw`` on ``resource_type``: plain, modified, chained or ``_has``."""
    if name == "_has" or name.startswith("_has:"):
        return _parse_has(resource_type, name, raw, depth)
    head, dot, rest = name.partition(".")
    code, _, modifier_text = head.partition(":")
    modifier = modifier_text or None
    if code == "_id":
        if dot:
            raise BadRequest("_id cannot be chained", expression=name)
        return _parse_id(name, modifier, raw)
    if code == "_lastUpdated":
        if dot:
            raise BadRequest("_lastUpdated cannot be chained", expression=name)
        if modifier == "missing":
            raise BadRequest("_lastUpdated:missing is not meaningful: every resource has one", expression=name)
        if modifier:
            raise _bad_modifier(name, modifier)
        return ParamClause(code, LAST_UPDATED_TYPE, tuple(parse_date(name, v) for v in or_values(raw)))
    sp = _lookup(resource_type, code)
    if sp is None:
        raise UnknownParameter(name, f"Unknown search parameter '{code}' for {resource_type}")
    if dot:
        return _parse_chain(resource_type, name, code, modifier, sp, rest, raw, depth)
    return _parse_simple(resource_type, name, code, modifier, sp, raw)


def _parse_has(resource_type: str, name: str, raw: str, depth: int) -> Clause:
    parts = name.split(":", 3)
    if len(parts) < 4 or not all(parts[1:]):
        raise BadRequest(f"'{name}' must look like _has:Type:reference:parameter", expression=name)
    _, source_type, ref_code, rest = parts
    if depth >= MAX_DEPTH:
        raise BadRequest(f"'{name}' nests _has more than {MAX_DEPTH} levels deep", expression=name)
    if source_type not in _supported_types():
        raise UnknownParameter(name, f"Unknown resource type '{source_type}' in _has")
    sp = _lookup(source_type, ref_code)
    if sp is None:
        raise UnknownParameter(name, f"Unknown search parameter '{ref_code}' for {source_type} in _has")
    if sp.type != "reference":
        raise BadRequest(f"{source_type}:{ref_code} in '{name}' is not a reference parameter", expression=name)
    targets = _targets(sp)
    if targets and resource_type not in targets:
        raise BadRequest(f"{source_type}:{ref_code} cannot refer to {resource_type} (in '{name}')", expression=name)
    return HasClause(source_type, ref_code, parse_clause(source_type, rest, raw, depth + 1))


def _parse_chain(resource_type: str, name: str, code: str, modifier: str | None, sp, rest: str,  # type: ignore[no-untyped-def]
                 raw: str, depth: int) -> Clause:
    if sp.type != "reference":
        raise BadRequest(f"'{code}' is not a reference parameter and cannot be chained (in '{name}')",
                         expression=name)
    if depth >= MAX_DEPTH:
        raise BadRequest(f"'{name}' chains more than {MAX_DEPTH} references", expression=name)
    declared = _targets(sp)
    if modifier is not None:
        _check_type_modifier(name, modifier, declared)
        candidates: tuple[str, ...] = (modifier,)
    else:
        candidates = declared or tuple(sorted(_supported_types()))
        if len(candidates) > MAX_CHAIN_TARGETS:
            raise BadRequest(f"'{name}' is ambiguous: '{code}' may refer to any resource type; "
                             f"name the type, as in {code}:Patient.{rest}", expression=name)
    targets: list[tuple[str, Clause]] = []
    for target in candidates:
        if target not in _supported_types():
            continue
        try:
            targets.append((target, parse_clause(target, rest, raw, depth + 1)))
        except UnknownParameter:
            continue
    if not targets:
        raise UnknownParameter(name, f"'{rest.split(':')[0].split('.')[0]}' is not a search parameter of "
                                     f"{' or '.join(candidates) if len(candidates) < 6 else 'the types ' + code + ' refers to'}")
    return ChainClause(code, tuple(targets))


def _check_type_modifier(name: str, modifier: str, declared: tuple[str, ...]) -> None:
    if modifier not in _supported_types():
        raise _bad_modifier(name, modifier)
    if declared and modifier not in declared:
        raise BadRequest(f"'{name}': the reference cannot point at a {modifier} (allowed: {', '.join(declared)})",
                         expression=name)


def _bad_modifier(name: str, modifier: str) -> BadRequest:
    return BadRequest(f"Unsupported modifier ':{modifier}' in search parameter '{name}'", expression=name)


def _parse_id(name: str, modifier: str | None, raw: str) -> Clause:
    if modifier not in (None, "not"):
        raise _bad_modifier(name, modifier)  # type: ignore[arg-type]
    ids = tuple(TokenValue(None, unescape(v)) for v in or_values(raw) if v)
    return ParamClause("_id", ID_TYPE, ids, modifier, negate=modifier == "not")


def _parse_simple(resource_type: str, name: str, code: str, modifier: str | None, sp, raw: str) -> Clause:  # type: ignore[no-untyped-def]
    ptype: str = sp.type
    if ptype in ("composite", "special"):
        raise UnknownParameter(name, f"{ptype.capitalize()} search parameter '{code}' is not supported")
    if modifier == "missing":
        codes: tuple[tuple[str, str], ...] = ((ptype, code),)
        if ptype == "reference":
            codes += (("token", f"{code}:identifier"),)
        return MissingClause(codes, parse_bool(name, raw))
    raws = or_values(raw)
    if ptype == "token":
        if modifier == "text":
            return ParamClause(code, ptype, tuple(parse_text(name, v) for v in raws), modifier)
        if modifier in (None, "not"):
            return ParamClause(code, ptype, tuple(parse_token(name, v) for v in raws), modifier,
                               negate=modifier == "not")
    elif ptype == "string":
        if modifier in (None, "exact", "contains"):
            return ParamClause(code, ptype, tuple(parse_text(name, v) for v in raws), modifier)
    elif ptype == "date":
        if modifier is None:
            return ParamClause(code, ptype, tuple(parse_date(name, v) for v in raws))
    elif ptype == "number":
        if modifier is None:
            return ParamClause(code, ptype, tuple(parse_number(name, v) for v in raws))
    elif ptype == "quantity":
        if modifier is None:
            return ParamClause(code, ptype, tuple(parse_quantity(name, v) for v in raws))
    elif ptype == "uri":
        if modifier in (None, "above", "below"):
            return ParamClause(code, ptype, tuple(parse_uri(name, v) for v in raws), modifier)
    elif ptype == "reference":
        if modifier == "identifier":
            return ParamClause(f"{code}:identifier", "token", tuple(parse_token(name, v) for v in raws))
        declared = _targets(sp)
        if modifier is not None and modifier not in _UNSUPPORTED_MODIFIERS:
            _check_type_modifier(name, modifier, declared)
        if modifier is None or modifier in _supported_types():
            base = base_url_setting()
            return ParamClause(code, ptype, tuple(parse_reference(name, v, type_modifier=modifier, targets=declared,
                                                                  base_url=base) for v in raws), modifier)
    else:
        raise UnknownParameter(name, f"Search parameter '{code}' has unsupported type '{ptype}'")
    raise _bad_modifier(name, modifier or "")


def _selectivity_rank(clause: Clause) -> int:
    """Cheap planning: put the criteria most likely to be selective first.

    Both databases plan the final SQL themselves, but SQLite drives nested IN-subqueries in
    the order written, so an identifier or ``_id`` lookup first keeps the work small.
    """
    if isinstance(clause, ParamClause):
        if clause.negate:
            return 8
        if clause.type == ID_TYPE:
            return 0
        if clause.type == "token" and clause.modifier is None:
            full = all(isinstance(v, TokenValue) and v.system and v.code for v in clause.values)
            return 1 if full else 2
        if clause.type == "reference":
            return 2
        if clause.type in ("uri", "date", "number", "quantity") or clause.modifier == "exact":
            return 3
        if clause.modifier in ("contains", "text"):
            return 5
        return 4
    if isinstance(clause, (ChainClause, HasClause)):
        return 6
    return 7 if not clause.missing else 9


# -- result parameters --------------------------------------------------------------------------


def _parse_sort(resource_type: str, name: str, modifier: str, raw: str) -> list[SortSpec]:
    if modifier not in ("", "asc", "desc"):
        raise _bad_modifier(name, modifier)
    specs: list[SortSpec] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        descending = modifier == "desc"
        if item.startswith("-"):
            descending, item = True, item[1:]
        if item == "_id":
            specs.append(SortSpec("_id", ID_TYPE, descending))
            continue
        if item == "_lastUpdated":
            specs.append(SortSpec("_lastUpdated", LAST_UPDATED_TYPE, descending))
            continue
        sp = _lookup(resource_type, item)
        if sp is None:
            raise UnknownParameter(f"_sort={item}", f"Unknown sort parameter '{item}' for {resource_type}")
        if sp.type not in _SORTABLE:
            raise UnknownParameter(f"_sort={item}", f"Cannot sort by {sp.type} parameter '{item}'")
        specs.append(SortSpec(item, sp.type, descending))
    return specs


def _parse_include(resource_type: str, name: str, reverse: bool, modifier: str, raw: str) -> IncludeSpec | None:
    if modifier not in ("", "iterate", "recurse"):
        raise _bad_modifier(name, modifier)
    iterate = modifier in ("iterate", "recurse")
    base = "_revinclude" if reverse else "_include"
    if raw == "*":
        if reverse:
            raise UnknownParameter(name, "_revinclude=* is not supported")
        return IncludeSpec(resource_type, None, None, iterate, reverse)
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise BadRequest(f"{base} must be Type:parameter[:targetType], not '{raw}'", expression=name)
    source, code = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if source not in _supported_types():
        raise UnknownParameter(name, f"Unknown resource type '{source}' in {base}={raw}")
    if code == "*":
        if reverse:
            raise UnknownParameter(name, f"{base}={raw} is not supported")
        return IncludeSpec(source, None, target, iterate, reverse)
    sp = _lookup(source, code)
    if sp is None:
        raise UnknownParameter(name, f"Unknown search parameter '{code}' for {source} in {base}={raw}")
    if sp.type != "reference":
        raise BadRequest(f"{base}={raw}: '{code}' is not a reference parameter", expression=name)
    if target is not None:
        if target not in _supported_types():
            raise BadRequest(f"{base}={raw}: unknown resource type '{target}'", expression=name)
        declared = _targets(sp)
        if declared and target not in declared:
            raise BadRequest(f"{base}={raw}: {source}:{code} cannot refer to {target}", expression=name)
    return IncludeSpec(source, code, target, iterate, reverse)
