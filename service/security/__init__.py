"""Security: who may call the gateway, and what they may see and change.

Two halves make the store's :class:`~service.fhir.hooks.AccessPolicy`:

* :class:`~service.security.scopes.ScopePolicy` (SMART scopes in the access token: which
  interactions on which types, restricted scopes, the patient compartment of patient/ scopes);
* ``BoundaryPolicy`` from :mod:`service.security.policy` (organization boundaries inside the
  alliance), when that module is present.

:func:`build_policy` combines them: an interaction must pass both ``authorize`` checks, a row
must satisfy both ``visible`` clauses (AND), a write both ``check_write`` checks. With
``YILIAN_AUTH=off`` (development only) there are no tokens, so the scope half is left out.

:func:`install` wires the OAuth endpoints, the admin API and the runtime into an app.
Everything is imported lazily: ``service.models`` imports ``service.security.tables`` and
must not pull the whole package in.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from service.fhir.access import AccessContext
from service.fhir.hooks import AccessPolicy, OpenPolicy

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy.engine import Engine

    from service.config import Settings
    from service.security.oauth.config import SecuritySettings

log = logging.getLogger("yilian.security")


class CombinedPolicy:
    """Several access policies that must all agree."""

    def __init__(self, *policies: AccessPolicy) -> None:
        self.policies = policies

    def authorize(self, ctx: AccessContext, interaction: str, resource_type: str) -> None:
        for policy in self.policies:
            policy.authorize(ctx, interaction, resource_type)

    def visible(self, ctx: AccessContext, resource_type: str, type_col: sa.ColumnElement,
                id_col: sa.ColumnElement) -> sa.ColumnElement | None:
        clauses = [c for c in (p.visible(ctx, resource_type, type_col, id_col) for p in self.policies) if c is not None]
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else sa.and_(*clauses)

    def visibility_key(self, ctx: AccessContext) -> Hashable | None:
        keys = tuple(getattr(p, "visibility_key", lambda _ctx: None)(ctx) for p in self.policies)
        return None if any(k is None for k in keys) else ("combined", keys)

    def check_write(self, ctx: AccessContext, resource_type: str, resource: dict[str, Any] | None,
                    previous: dict[str, Any] | None) -> None:
        for policy in self.policies:
            policy.check_write(ctx, resource_type, resource, previous)

    def install_hooks(self, hooks: Any) -> None:
        """Let members that check writes through store hooks (the boundary policy) register them."""
        for policy in self.policies:
            install = getattr(policy, "install_hooks", None)
            if callable(install):
                install(hooks)


def _boundary_policy(settings: Settings) -> AccessPolicy | None:
    """The organization-boundary half, if ``service.security.policy`` provides it.

    Convention: ``BoundaryPolicy(settings)`` when its constructor takes an argument (it needs
    to know whether authorization is off), else ``BoundaryPolicy()``."""
    try:
        from service.security.policy import BoundaryPolicy  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    parameters = [p for p in inspect.signature(BoundaryPolicy).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return BoundaryPolicy(settings) if parameters else BoundaryPolicy()  # type: ignore[no-any-return]


def build_policy(settings: Settings) -> AccessPolicy:
    from service.security.oauth.config import auth_enabled
    from service.security.scopes import ScopePolicy

    policies: list[AccessPolicy] = []
    if auth_enabled(settings):
        policies.append(ScopePolicy())
    boundary = _boundary_policy(settings)
    if boundary is not None:
        policies.append(boundary)
    if not policies:
        return OpenPolicy()
    return policies[0] if len(policies) == 1 else CombinedPolicy(*policies)


def install(app: FastAPI, settings: Settings, engine: Engine,
            security: SecuritySettings | None = None) -> None:
    """Add the security runtime, the OAuth and admin routers and their error handler.

    Call before the FHIR router is included: ``/fhir/.well-known/smart-configuration`` must
    be matched before ``/fhir/{resource_type}`` would swallow it."""
    from service.security.oauth import admin, router
    from service.security.oauth.config import auth_enabled
    from service.security.oauth.runtime import SecurityRuntime

    app.state.security = SecurityRuntime.create(settings, engine, security)
    app.include_router(router.router)
    app.include_router(admin.router)
    admin.install(app)
    if not auth_enabled(settings):
        log.warning("YILIAN_AUTH=off: authorization is DISABLED. Every caller may read and change every "
                    "resource. For local development only; never run like this with real data.")
