"""Alembic environment. Run through ``yilian db upgrade`` (service/migrate.py), which passes
the database URL from settings; the same migrations serve SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import context

from service import models  # noqa: F401  (registers every table)
from service.fhir import tables
from service.fhir.db import create_engine
from service.migrate import include_object

config = context.config
target_metadata = tables.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", include_object=include_object)
    with context.begin_transaction():
        context.run_migrations()
    if connection.in_transaction():
        connection.commit()


run_migrations()
