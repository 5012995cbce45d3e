"""Statements built once and kept.

Building a SQLAlchemy statement — and the cache key SQLAlchemy derives from it on every
execution of a new object — costs more CPU than PostgreSQL spends running a short one. Where
the statement depends only on something that repeats (a search's shape, a caller's
boundary), it is built once and kept here, under that key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

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
