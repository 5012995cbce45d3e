"""The parsed form of a FHIR search: what ``parse_search`` produces and the engine consumes.

Parsing and SQL generation are kept apart so that every value is validated (and every
BadRequest raised) before a connection is touched, and so that the SQL layer only ever sees
typed values, never raw query-string text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.fhir.errors import Issue

#: Comparison prefixes of number, date and quantity values (R4 3.1.1.5.6).
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

#: Pseudo parameter types answered from the ``resource`` table instead of an index table.
ID_TYPE = "_id"
LAST_UPDATED_TYPE = "_lastUpdated"


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenValue:
    """``system|code``. ``system=None``: any system; ``""``: no system. ``code=None``: any code."""

    system: str | None
    code: str | None


@dataclass(frozen=True)
class TextValue:
    """A free-text value: string parameters and ``token:text`` (``normalized`` = folded form)."""

    text: str
    normalized: str


@dataclass(frozen=True)
class PrefixRange:
    """A string prefix as the range [low, high) in code-point order (``high`` None: no upper
    bound). Never parsed from a query: ``shapes.template`` passes a prefix's bounds this way,
    as bound parameters, since the builder cannot compute the upper bound of a parameter."""

    low: object
    high: object | None


@dataclass(frozen=True)
class DateValue:
    """A date search value as the closed range [low, high] in epoch milliseconds (UTC)."""

    prefix: str
    low: int
    high: int


@dataclass(frozen=True)
class NumberValue:
    """A number; [low, high] is the range implied by its precision (``100`` → 99.5..100.5)."""

    prefix: str
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class QuantityValue:
    prefix: str
    value: float
    low: float
    high: float
    system: str | None  # None: any system
    code: str | None  # None: any unit


@dataclass(frozen=True)
class ReferenceValue:
    """A local reference (``target_type`` may be None when not implied) or an absolute ``url``."""

    target_type: str | None
    target_id: str | None
    url: str | None = None


@dataclass(frozen=True)
class UriValue:
    value: str


Value = TokenValue | TextValue | PrefixRange | DateValue | NumberValue | QuantityValue | ReferenceValue | UriValue


# -- clauses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamClause:
    """One occurrence of a parameter: its values are OR-ed (commas), occurrences are AND-ed.

    ``code`` is the parameter as written to the index (``subject:identifier`` for a
    reference's identifier, indexed as a token). ``type`` is the FHIR search parameter type,
    or ``_id`` / ``_lastUpdated``. ``negate`` is ``:not``: resources with no matching value.
    """

    code: str
    type: str
    values: tuple[Value, ...]
    modifier: str | None = None
    negate: bool = False


@dataclass(frozen=True)
class MissingClause:
    """``param:missing=true|false``: resources without / with any value for the parameter.

    ``codes`` lists every index key of the parameter (a reference also has its
    ``<code>:identifier`` token rows); ``tables`` the matching parameter types.
    """

    codes: tuple[tuple[str, str], ...]  # (param type, index param code)
    missing: bool


@dataclass(frozen=True)
class ChainClause:
    """``ref.param=value``: the reference ``code`` points at a resource matching ``inner``.

    One inner clause per target type on which the chained parameter exists.
    """

    code: str
    targets: tuple[tuple[str, Clause], ...]


@dataclass(frozen=True)
class HasClause:
    """``_has:Source:ref:param=value``: a ``Source`` whose ``ref`` points here matches ``inner``."""

    source_type: str
    ref_code: str
    inner: Clause


Clause = ParamClause | MissingClause | ChainClause | HasClause


# -- result parameters --------------------------------------------------------------------------


@dataclass(frozen=True)
class SortSpec:
    code: str  # parameter code, or _id / _lastUpdated
    type: str
    descending: bool = False


@dataclass(frozen=True)
class IncludeSpec:
    """``_include`` (reverse=False) or ``_revinclude`` (reverse=True).

    ``source_type`` is the type that holds the reference ``code`` (``None`` code: every
    reference parameter of the type, for ``*``); ``target_type`` restricts the referenced type.
    """

    source_type: str
    code: str | None
    target_type: str | None = None
    iterate: bool = False
    reverse: bool = False


@dataclass(frozen=True)
class KnownTotal:
    """What the first page of a search learnt of its total: ``exact`` (``value`` matches),
    ``estimate`` (about ``value``) or ``more`` (more than ``value``, not counted further).
    Its cursors carry it, so that later pages do not count the matches again."""

    kind: str  # exact | estimate | more
    value: int

    KINDS = ("exact", "estimate", "more")


@dataclass(frozen=True)
class Cursor:
    """Where a page starts: after (or, for ``backward``, before) the row with sort ``key``.

    ``snapshot`` is the change sequence pinned by the first page: later pages ignore resources
    created after it. ``total`` is what the first page knew of the total, if anything.
    """

    snapshot: int
    key: tuple
    backward: bool = False
    total: KnownTotal | None = None


@dataclass
class SearchRequest:
    resource_type: str
    clauses: list[Clause] = field(default_factory=list)
    sort: list[SortSpec] = field(default_factory=list)
    includes: list[IncludeSpec] = field(default_factory=list)
    count: int = 20
    #: none | estimate | accurate; None (no ``_total``): exact up to ``exact_total_limit``
    #: matches, left out above it (see ``execute``).
    total: str | None = None
    exact_total_limit: int = 1000
    summary: str | None = None  # true | text | data | count | false
    elements: tuple[str, ...] = ()
    cursor: Cursor | None = None
    #: The parameters to repeat in self/next/previous links (without ``_cursor``).
    link_params: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)

    @property
    def summary_count(self) -> bool:
        return self.summary == "count"


@dataclass
class SearchPage:
    """One page of results. Links are query strings (``name=value&...``) without the base."""

    resource_type: str
    matches: list[tuple[str, str, str]]  # (type, id, stored JSON text)
    includes: list[tuple[str, str, str]]
    total: int | None
    self_link: str
    next_link: str | None = None
    previous_link: str | None = None
    warnings: list[Issue] = field(default_factory=list)
    summary_count: bool = False
    #: ``_summary`` / ``_elements`` as requested; ``searchset_bundle`` applies them.
    summary: str | None = None
    elements: tuple[str, ...] = ()
