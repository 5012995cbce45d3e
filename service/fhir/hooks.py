"""Seams where domain packages plug into the store without the store knowing them.

* :class:`WriteHooks`: checks and follow-up writes around every create/update/patch/delete,
  on every path (REST, transaction, batch, internal), inside the write's own transaction.
  The referral package enforces its Task state machine here; capacity assigns pools here.
* :class:`AccessPolicy`: who may see and change what. The store asks it on every read,
  search and write; the security package provides the real one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa

from service.fhir.access import AccessContext

if TYPE_CHECKING:
    from service.fhir.store import StoreTransaction


@dataclass
class WriteEvent:
    """One write about to happen (before hooks) or just done (after hooks)."""

    tx: "StoreTransaction"
    resource_type: str
    resource_id: str
    method: str  # POST | PUT | PATCH | DELETE
    resource: dict[str, Any] | None  # the new content; None for a deletion. Before-hooks may change it.
    previous: dict[str, Any] | None  # the current content; None for a create

    @property
    def ctx(self) -> AccessContext:
        return self.tx.ctx


WriteHook = Callable[[WriteEvent], None]
ANY_TYPE = "*"  # register a hook for every resource type (e.g. Provenance on every write)


class WriteHooks:
    """Per resource type: ``before`` hooks may refuse (raise FhirError) or complete the
    resource; ``after`` hooks run once it is stored and may write more through ``event.tx``."""

    def __init__(self) -> None:
        self._before: dict[str, list[WriteHook]] = defaultdict(list)
        self._after: dict[str, list[WriteHook]] = defaultdict(list)
        self._reads_store: set[str] = set()
        self._wanted: set[str] = set()  # types with a hook of their own, ANY_TYPE included

    def before(self, resource_type: str, hook: WriteHook, *, pure: bool = False) -> None:
        """``pure=True`` promises the hook looks only at the resource itself (a format check),
        never at other stored resources, so a Bundle may run it before writing its entries."""
        self._before[resource_type].append(hook)
        self._wanted.add(resource_type)
        if not pure:
            self._reads_store.add(resource_type)

    def after(self, resource_type: str, hook: WriteHook) -> None:
        self._after[resource_type].append(hook)
        self._wanted.add(resource_type)

    def in_order(self, resource_type: str) -> bool:
        """Whether writes of this type must run one by one, in Bundle order: its own hooks read
        other resources (a referral routes on its Patient) or write more (a Task). Hooks for
        every type (audit, boundaries) do not count: they only look at the resource at hand."""
        return resource_type in self._reads_store or resource_type in self._after

    def wants(self, resource_type: str) -> bool:
        """Whether any hook runs for a write of this type (asked on every write)."""
        return ANY_TYPE in self._wanted or resource_type in self._wanted

    def run_before(self, event: WriteEvent) -> None:
        for hook in (*self._before.get(event.resource_type, ()), *self._before.get(ANY_TYPE, ())):
            hook(event)

    def run_after(self, event: WriteEvent) -> None:
        for hook in (*self._after.get(event.resource_type, ()), *self._after.get(ANY_TYPE, ())):
            hook(event)


class AccessPolicy(Protocol):
    """Authorization decided in one place, from the caller's access context.

    ``authorize`` checks the interaction itself (SMART scopes); reads and searches are then
    restricted by one SQL clause (so totals, includes and history obey the same rule); writes
    by a check on the old and new content. Internal callers (``ctx.system``) skip all three.
    """

    def authorize(self, ctx: AccessContext, interaction: str, resource_type: str) -> None:
        """Raise Forbidden unless the caller may do ``interaction`` (read | vread | search |
        history | create | update | patch | delete) on ``resource_type`` at all."""

    def visible(self, ctx: AccessContext, resource_type: str, type_col: sa.ColumnElement,
                id_col: sa.ColumnElement) -> sa.ColumnElement | None:
        """A WHERE clause over (type, id) selecting what the caller may see; None: no limit.
        What is not visible answers 404, so its existence is not revealed."""

    def visibility_key(self, ctx: AccessContext) -> Hashable | None:
        """A value equal for two callers only when :meth:`visible` gives them the same clause
        (SQL and bound values) for every type and pair of columns, so that statements built
        under one caller's clause may serve the other; None: no such promise. Optional: a
        policy without it has every restricted search built per request."""

    def check_write(self, ctx: AccessContext, resource_type: str, resource: dict[str, Any] | None,
                    previous: dict[str, Any] | None) -> None:
        """Raise Forbidden when the caller may not make this change."""


class OpenPolicy:
    """No restriction: internal callers, and every caller until the security package lands."""

    def authorize(self, ctx: AccessContext, interaction: str, resource_type: str) -> None:
        return None

    def visible(self, ctx: AccessContext, resource_type: str, type_col: sa.ColumnElement,
                id_col: sa.ColumnElement) -> sa.ColumnElement | None:
        return None

    def visibility_key(self, ctx: AccessContext) -> Hashable | None:
        return ("open",)

    def check_write(self, ctx: AccessContext, resource_type: str, resource: dict[str, Any] | None,
                    previous: dict[str, Any] | None) -> None:
        return None
