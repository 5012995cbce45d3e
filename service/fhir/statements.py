"""Statements built once and kept.

Building a SQLAlchemy statement — and the cache key SQLAlchemy derives from it on every
execution of a new object — costs more CPU than PostgreSQL spends running a short one. Where
the statement depends only on something that repeats (a search's shape, a caller's
boundary), it is built once and kept here, under that key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from service.fhir.db import execute_prepared

T = TypeVar("T")

_UNSET = object()


class StatementCache(Generic[T]):
    """A map from key to a built value, emptied whenever it grows past ``bound`` (keys repeat:
    a few hundred shapes and callers, not millions). Safe across request threads: building a
    value twice is harmless, and every look-up is one dictionary operation."""

    def __init__(self, bound: int) -> None:
        self._items: dict[Hashable, T] = {}
        self._bound = bound
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        found = self._items.get(key, _UNSET)
        if found is _UNSET:
            value = build()
            with self._lock:
                if len(self._items) >= self._bound:
                    self._items.clear()
                self._items[key] = value
            return value
        return found  # type: ignore[return-value]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: PostgreSQL's own placeholders ($1, $2 ...): what psycopg sends as they are.
_NUMERIC_DOLLAR = PGDialect_psycopg(paramstyle="numeric_dollar")


class Prepared:
    """A Core statement built once and run, on PostgreSQL, as a prepared statement past
    SQLAlchemy's execution machinery.

    Executing even a cached statement through SQLAlchemy derives its cache key by walking the
    whole statement, processes the parameters and builds a result object on every call: for a
    primary-key look-up that is more CPU than PostgreSQL spends, and a booking runs a dozen of
    them (for a boundary check with twenty joins, the walk alone is most of it). Here the
    statement is compiled once to ``$n`` placeholders, and psycopg runs it as a prepared
    statement (``execute_prepared``); on SQLite it goes through SQLAlchemy as always.

    Rows come back as tuples (``mapping`` gives the first as a dict by column key). For
    statements whose parameters are plain values: no expanding ``IN`` lists, no JSON.
    """

    def __init__(self, statement: sa.Executable) -> None:
        self.statement = statement
        self.keys: tuple[str, ...] = tuple(statement.exported_columns.keys())  # type: ignore[attr-defined]
        self._compiled: tuple[str, tuple[str, ...], dict[str, Any]] | None = None

    @classmethod
    def if_plain(cls, statement: sa.Executable) -> Prepared | None:
        """``statement`` as a Prepared when it qualifies — no expanding ``IN`` lists, no
        parameter or result value that SQLAlchemy would convert on PostgreSQL — else None
        (run it through SQLAlchemy). For statements built at run time, such as searches'."""
        compiled = statement.compile(dialect=_NUMERIC_DOLLAR)
        if compiled.post_compile_params or compiled.literal_execute_params or any(compiled._bind_processors.values()):
            return None
        for entry in compiled._result_columns:
            try:
                if entry.type._cached_result_processor(_NUMERIC_DOLLAR, None):
                    return None
            except (TypeError, sa.exc.SQLAlchemyError):  # depends on the column's database type
                return None
        prepared = cls(statement)
        prepared._compiled = _parts(compiled)
        return prepared

    def _postgres(self) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        if self._compiled is None:
            self._compiled = _parts(self.statement.compile(dialect=_NUMERIC_DOLLAR))
        return self._compiled

    def rows(self, conn: sa.Connection, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        values = params or {}
        if conn.dialect.name != "postgresql":
            result = conn.execute(self.statement, dict(values))
            return [tuple(row) for row in result] if result.returns_rows else []
        sql, names, fixed = self._postgres()
        return execute_prepared(conn, sql, [values[name] if name in values else fixed[name] for name in names])

    def first(self, conn: sa.Connection, params: Mapping[str, Any] | None = None) -> tuple[Any, ...] | None:
        found = self.rows(conn, params)
        return found[0] if found else None

    def scalar(self, conn: sa.Connection, params: Mapping[str, Any] | None = None) -> Any:
        row = self.first(conn, params)
        return None if row is None else row[0]

    def mapping(self, conn: sa.Connection, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        row = self.first(conn, params)
        return None if row is None else dict(zip(self.keys, row, strict=True))


def _parts(compiled: sa.engine.Compiled) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """The SQL text, its parameters' names in ``$n`` order, and the values fixed at build time."""
    names = tuple(compiled.positiontup or ())  # type: ignore[attr-defined]
    fixed = {name: bind.effective_value for name, bind in compiled.binds.items()  # type: ignore[attr-defined]
             if not bind.required}
    return compiled.string, names, fixed
