"""What the application does to its process once it has started (``service.app``)."""

from __future__ import annotations

import gc

import sqlalchemy as sa

from service.app import create_app
from service.config import Settings


async def test_objects_built_at_startup_are_frozen_out_of_the_garbage_collector(
        engine: sa.Engine, database_url: str) -> None:
    """The definitions, validation tables and statements built at startup live as long as the
    process; a full collection walking them again is a pause on some request (creates under
    load: p99 236-275 ms with them, 116-121 ms without). After startup they are frozen."""
    app = create_app(Settings(database_url=database_url, auth="off"), engine=engine)
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        async with app.router.lifespan_context(app):
            frozen = gc.get_freeze_count()
            assert frozen > 10_000, frozen  # the app's own objects at least, not just a handful
            cycle: list[object] = []
            cycle.append(cycle)  # garbage made while serving is still collected
            del cycle
            assert gc.collect() >= 1 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        app.state.audit_queue.close()
