"""Alembic migrations go up (and down and up again) on an empty database of each kind."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import sqlalchemy as sa

from service import models  # noqa: F401  (every table module)
from service.fhir import tables
from service.fhir.db import create_engine, is_postgres
from service.migrate import downgrade, include_object, upgrade


def _empty_database(database_url: str, tmp_path: Path) -> tuple[str, sa.Engine | None]:
    """A brand-new database of the same kind as the test database."""
    if not database_url.startswith("postgres"):
        return f"sqlite:///{tmp_path / 'fresh.db'}", None
    name = f"yilian_mig_{uuid4().hex[:8]}"
    admin = create_engine(database_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return database_url.rsplit("/", 1)[0] + "/" + name, admin


def test_migrations_up_down_up_on_an_empty_database(database_url: str, tmp_path: Path) -> None:
    url, admin = _empty_database(database_url, tmp_path)
    try:
        upgrade(url)
        engine = create_engine(url)
        names = set(sa.inspect(engine).get_table_names())
        assert set(tables.metadata.tables) <= names
        assert "alembic_version" in names
        downgrade(url)
        assert set(tables.metadata.tables).isdisjoint(sa.inspect(engine).get_table_names())
        upgrade(url)
        assert set(tables.metadata.tables) <= set(sa.inspect(engine).get_table_names())
        engine.dispose()
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
            admin.dispose()


def test_migrated_schema_matches_the_models(engine: sa.Engine) -> None:
    """A model change without a migration would make autogenerate find differences."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": include_object})
        diff = compare_metadata(context, tables.metadata)
    assert diff == [], f"models and migrations differ (postgres={is_postgres(engine)}): {diff}"
