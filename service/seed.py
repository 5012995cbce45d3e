"""Loading the demo alliance into a database (``yilian demo-data``)."""

from __future__ import annotations

import sqlalchemy as sa

from service.fhir import bundles, tables
from service.fhir.access import AccessContext
from service.fhir.db import create_engine
from service.fhir.store import ResourceStore


def load_demo_data(database_url: str, *, if_empty: bool = False) -> int:
    """Write the demo transaction Bundle; returns how many entries it wrote (0 if skipped)."""
    from service.demo import demo_bundle

    engine = create_engine(database_url)
    try:
        if if_empty:
            with engine.connect() as conn:
                if conn.execute(sa.select(tables.ResourceRow.__table__.c.id).limit(1)).first() is not None:
                    return 0
        bundle = demo_bundle()
        store = ResourceStore(engine)
        bundles.process_bundle(store, AccessContext.internal("demo-data"), bundle, base_url="")
        return len(bundle.get("entry", []))
    finally:
        engine.dispose()
