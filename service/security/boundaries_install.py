"""Wiring of the privacy half of issue #4 into the app: boundaries, audit, resident IDs.

``create_app`` builds the store with ``service.security.build_policy`` (which includes
:class:`~service.security.policy.BoundaryPolicy`) and calls :func:`install` once the store
exists.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.config import Settings
from service.fhir.hooks import WriteHooks
from service.security import audit, resident_id
from service.security.masking import install_log_filter
from service.security.policy import BoundaryPolicy


def install(app: FastAPI, hooks: WriteHooks) -> None:
    """Register on ``hooks`` (the store's): resident-ID validation, the boundary write checks
    (once, whoever registers them first), the audit trail of writes and the immutability of
    audit records; on ``app``: the privacy middleware (resident-ID masking, audit of reads and
    refusals through the durable queue) and the log filter."""
    settings: Settings = app.state.settings
    boundaries = BoundaryPolicy(settings)
    resident_id.install(hooks)
    boundaries.install_hooks(hooks)
    audit.install(app, hooks, policy=boundaries, settings=settings)
    install_log_filter()
