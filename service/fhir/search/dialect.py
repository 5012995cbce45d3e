"""The only place where SQLite and PostgreSQL differ for search.

* Stored JSON is selected as text (``CAST(content AS TEXT)``), so the API can send it without
  parsing and re-serialising (JSONB on PostgreSQL renders as compact, valid JSON).
* String prefix matching is a range comparison ``value >= p AND value < next(p)`` where
  ``next(p)`` increments the last code point. That is exact in code-point order and can use the
  ``(resource_type, param, value)`` b-tree index on both databases. SQLite's BINARY collation
  and PostgreSQL's ``C`` / ``C.UTF-8`` collations *are* code-point order (probed once per
  engine). Under a linguistic collation (``en_US.UTF-8``, ICU) a range is not a prefix test
  (ignorable punctuation, contractions), so there we compare ``value COLLATE "C"``; that stays
  correct but needs an expression index ``(resource_type, param, (value COLLATE "C"))`` (or the
  column declared ``COLLATE "C"``) to be fast.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import sqlalchemy as sa

_cache: weakref.WeakKeyDictionary[sa.Engine, Dialect] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Dialect:
    name: str
    #: PostgreSQL database whose default collation is not code-point ordered.
    needs_c_collation: bool = False

    @classmethod
    def for_connection(cls, conn: sa.Connection) -> Dialect:
        engine = conn.engine
        found = _cache.get(engine)
        if found is None:
            found = cls._detect(conn)
            _cache[engine] = found
        return found

    @classmethod
    def _detect(cls, conn: sa.Connection) -> Dialect:
        name = conn.dialect.name
        if name != "postgresql":
            return cls(name)
        return cls(name, needs_c_collation=not codepoint_ordered(conn))

    def json_text(self, column: sa.ColumnElement) -> sa.ColumnElement:
        return sa.cast(column, sa.Text)

    def codepoint(self, column: sa.ColumnElement) -> sa.ColumnElement:
        """``column`` compared in code-point order."""
        return column.collate("C") if self.needs_c_collation else column

    def starts_with(self, column: sa.ColumnElement, prefix: str) -> sa.ColumnElement:
        """Index-friendly ``column`` starts with ``prefix`` (exact, case-sensitive)."""
        if prefix == "":
            return column.is_not(None)
        return self.prefix_range(column, prefix, prefix_upper_bound(prefix))

    def prefix_range(self, column: sa.ColumnElement, low: object, high: object | None) -> sa.ColumnElement:
        """``low <= column < high`` in code-point order (no upper bound when ``high`` is None):
        a prefix's range, its bounds literal or bound parameters."""
        col = self.codepoint(column)
        return col >= low if high is None else sa.and_(col >= low, col < high)

    def contains(self, column: sa.ColumnElement, fragment: str) -> sa.ColumnElement:
        """``column`` contains ``fragment`` (LIKE with escaping; case-sensitive on both sides
        because the indexed values and the fragment are already case-folded)."""
        if fragment == "":
            return column.is_not(None)
        return column.contains(fragment, autoescape=True)


def codepoint_ordered(conn: sa.Connection) -> bool:
    """Whether the database's default collation compares text in code-point order (SQLite's
    BINARY, PostgreSQL's C and C.UTF-8). Probed rather than read from ``datcollate``: an ICU
    database reports 'C.UTF-8' there too. Code-point order puts upper case before lower case
    and accented letters after 'z'."""
    if conn.dialect.name != "postgresql":
        return True
    return bool(conn.execute(sa.text("SELECT 'B' < 'a' AND 'é' > 'z' AND 'Z' < 'a'")).scalar())


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``, in code-point
    order; None when there is none (prefix made only of U+10FFFF)."""
    chars = list(prefix)
    while chars:
        point = ord(chars[-1])
        if point < 0x10FFFF:
            point += 1
            if 0xD800 <= point <= 0xDFFF:  # surrogates cannot be stored: skip past them
                point = 0xE000
            chars[-1] = chr(point)
            return "".join(chars)
        chars.pop()
    return None
