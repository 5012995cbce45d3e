"""The ASGI application: ``create_app()`` wires settings, the store and the routers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.responses import Response
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from service import __version__
from service.api import capacity as capacity_api
from service.api import errors, rest
from service.api import referral as referral_api
from service.api.deps import access_context
from service.api.fastpath import FastPath
from service.capacity import install as install_capacity
from service.config import Settings, get_settings
from service.fhir.db import create_engine
from service.fhir.hooks import WriteHooks
from service.fhir.store import Clock, ResourceStore, utc_now
from service.referral import install as install_referral
from service.security import build_policy
from service.security import install as install_security
from service.security.boundaries_install import install as install_boundaries
from service.security.oauth.config import SecuritySettings

log = logging.getLogger("yilian")


def create_app(settings: Settings | None = None, *, engine: Engine | None = None, clock: Clock = utc_now,
               security: SecuritySettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = engine or create_engine(settings.database_url, pool_size=settings.database_pool_size)
    app = FastAPI(
        title="Yilian FHIR gateway",
        version=__version__,
        description="FHIR R4 (4.0.1) gateway for medical alliances: two-way referral, reserved capacity, "
        "record sharing. Resources are exchanged as application/fhir+json.",
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.engine = engine
    hooks = WriteHooks()
    app.state.store = ResourceStore(engine, clock=clock, hooks=hooks, policy=build_policy(settings))
    # Innermost middleware first: the fast path answers inside the privacy middleware.
    app.add_middleware(FastPath)  # read, search and create without FastAPI's router (service/api/fastpath.py)
    install_boundaries(app, hooks)  # resident IDs, audit trail, masking (service/security/boundaries_install.py)
    errors.install(app)
    # Security first: /fhir/.well-known/smart-configuration before /fhir/{resource_type}.
    install_security(app, settings, engine, security)
    # Every router that serves callers checks the token first (a router-level dependency runs
    # before the endpoint's own), so an anonymous request is refused before its body is read.
    authenticated = [Depends(access_context)]
    app.include_router(capacity_api.router, dependencies=authenticated)  # before the FHIR router: $find is no id
    install_capacity(app, hooks)
    app.include_router(referral_api.router, prefix="/fhir", tags=["Referral"], dependencies=authenticated)
    install_referral(app, hooks)
    app.include_router(rest.router, prefix="/fhir", tags=["FHIR"], dependencies=authenticated)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    if settings.bench_floor:
        _add_bench_floor(app)
    pool = engine.pool
    threads = settings.request_threads or (pool.size() if isinstance(pool, QueuePool) else None)
    if threads:
        _limit_request_threads(app, threads)
    _freeze_after_startup(app)
    return app


def _freeze_after_startup(app: FastAPI) -> None:
    """Once the application has started, move everything built so far out of the cyclic
    garbage collector's sight (``gc.freeze``). Those ~260,000 objects (search parameter
    definitions and their compiled accessors, validation tables, SQLAlchemy metadata and
    statements) live as long as the process, yet each full collection walked all of them
    again: measured, the collector took a third of the audit drain's CPU time, in pauses that
    land on whichever request happens to allocate. Reference counting still frees everything
    as before; only cycles among the frozen objects would never be collected, and they are
    never garbage."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[Any]:
        async with inner(application) as state:
            gc.collect()
            gc.freeze()
            yield state

    app.router.lifespan_context = lifespan


def _limit_request_threads(app: FastAPI, threads: int) -> None:
    """At most ``threads`` requests run their synchronous part at once (anyio's default is 40).
    Nearly all of them hold a pooled database connection meanwhile: with more threads than
    pooled connections the rest either wait for one inside a thread or, worse, open an overflow
    connection for one request and close it again (a PostgreSQL backend started per request,
    measured at ~7 % of a create's CPU under 32 concurrent clients), while more threads only
    contend for the GIL. Requests beyond the limit wait in the event loop, where waiting is free."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[Any]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        async with inner(application) as state:
            yield state

    app.router.lifespan_context = lifespan


def _add_bench_floor(app: FastAPI) -> None:
    """The benchmark floor: stored JSON by primary key with no FHIR processing at all."""
    import sqlalchemy as sa

    from service.fhir.db import read_transaction
    from service.fhir.tables import ResourceRow, ResourceVersion

    resource, version = ResourceRow.__table__, ResourceVersion.__table__
    query = (sa.select(sa.cast(version.c.content, sa.Text))
             .select_from(resource.join(version, version.c.seq == resource.c.seq))
             .where(resource.c.resource_type == sa.bindparam("t"), resource.c.id == sa.bindparam("i")))
    engine = app.state.engine

    @app.get("/bench/floor/{resource_type}/{resource_id}", include_in_schema=False)
    def floor(resource_type: str, resource_id: str) -> Response:
        # One round trip, as our reads: in a transaction (BEGIN, SELECT, ROLLBACK) the floor was
        # three on PostgreSQL and slower than the FHIR read it is the floor of.
        with read_transaction(engine) as conn:
            text = conn.execute(query, {"t": resource_type, "i": resource_id}).scalar_one()
        return Response(text.encode(), media_type="application/fhir+json")
